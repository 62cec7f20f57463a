"""The evaluation loop: greedy generation on the continuous-batching engine into a resumable
predictions file, then the task's metrics.

The output directory holds `predictions.jsonl` (one `{"question_id", "prompt", "answer"}`
per line, appended and flushed every `batch_size` answers), `run.json` (task, split and
model, so that a resumed run cannot silently mix two models), and `metrics.json`. A rerun
skips every question already in the predictions file, so an interrupted eval continues where
it stopped, and a predictions file written by other means is scored without loading a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from etils import epath

from llava_jax.eval import slots
from llava_jax.eval.task import (
    EvalDataError,
    Report,
    Sample,
    ScoreContext,
    Task,
    check_images,
    drop_partial_line,
)

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
RUN = "run.json"


class PredictionsFile:
    """An append-only JSONL of answers keyed by question id."""

    def __init__(self, path: Path):
        self.path = path

    def load(self) -> dict[str, str]:
        """The answers so far. A last line cut short by an interrupted write is dropped from
        the file (its question is simply asked again); any other bad line is an error."""
        data = drop_partial_line(self.path)
        answers: dict[str, str] = {}
        for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question_id, answer = str(row["question_id"]), row["answer"]
            except (ValueError, KeyError, TypeError):
                raise EvalDataError(
                    f"{self.path}:{number}: not a prediction line "
                    '({"question_id": ..., "answer": ...})'
                ) from None
            if not isinstance(answer, str):  # 123 would be scored as the text "123"
                raise EvalDataError(
                    f"{self.path}:{number}: the answer is {json.dumps(answer)}, not a string"
                )
            answers[question_id] = answer
        return answers

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _check_run(out_dir: Path, run: dict[str, Any]) -> None:
    """Refuses to resume predictions made for another task, split or model."""
    path = out_dir / RUN
    if path.is_file():
        before = json.loads(path.read_text())
        for key in ("task", "split", "model"):
            if run.get(key) is not None and before.get(key) not in (None, run[key]):
                raise EvalDataError(
                    f"{out_dir} holds predictions for {key} {before[key]!r}, not {run[key]!r}; "
                    "pass another --out"
                )
        run = {**before, **{k: v for k, v in run.items() if v is not None}}
    path.write_text(json.dumps(run, indent=2) + "\n")


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut].strip()


def local_out_dir(out_dir: str | os.PathLike) -> Path:
    """The output folder, which must be local: answers are appended to predictions.jsonl as
    they come, so that a rerun resumes, and a bucket's objects cannot be appended to."""
    if "://" in os.fspath(out_dir):
        raise EvalDataError(
            f"--out {os.fspath(out_dir)}: must be a local folder (answers are appended as they "
            "come, which a bucket cannot do); copy it afterwards, e.g. `gcloud storage cp -r`"
        )
    return Path(out_dir)


def _image_key(sample: Sample) -> tuple[str, ...]:
    """The sample's images, named by path, or by content hash for image bytes."""
    return tuple(hashlib.blake2b(ref, digest_size=16).hexdigest() if isinstance(ref, bytes)
                 else str(ref) for ref in sample.images)  # fmt: skip


def generate_answers(
    pipeline: Any,
    samples: Sequence[Sample],
    out: PredictionsFile,
    batch_size: int,
    max_new_tokens: int,
    echo: Callable[[str], None] = print,
    prefix_cache_mb: float = 0.0,
) -> None:
    """Greedy answers for `samples` from an `Engine` of `batch_size` slots, appended to `out`
    every `batch_size` answers and at the end.

    A question is admitted (its prompt built, its images decoded) only when a slot is about
    to take it, and leaves its slot at its own last token: a long answer holds one slot, not
    a batch. Slots are as long as the longest prompt plus `max_new_tokens` (`slots.py`).
    """
    from llava_jax.inference.engine import Engine, Request
    from llava_jax.inference.prefix_cache import PrefixCache
    from llava_jax.media.image_processing import load_image

    sampling = pipeline.stop_config(max_new_tokens=max_new_tokens, temperature=0.0)
    max_length = slots.slot_length(pipeline, samples, max_new_tokens)
    cache = PrefixCache.for_model(pipeline.cfg, int(prefix_cache_mb * 1024 * 1024))
    engine = Engine(pipeline.generator, num_slots=batch_size, max_length=max_length,
                    prefix_cache=cache)  # fmt: skip
    queue = iter(samples)
    finished: list[tuple[Sample, Request]] = []
    rows: list[dict[str, Any]] = []
    start, written = time.perf_counter(), 0

    def admit(s: Sample) -> None:
        try:
            images = [load_image(ref) for ref in s.images]
            prompt = pipeline.prompt([{"role": "user", "content": s.text}], images)
            request = Request(prompt, sampling, on_finish=lambda r: finished.append((s, r)))
            engine.add(request)
        except ValueError as e:  # an unreadable image, a prompt over its slot, ...
            raise EvalDataError(f"question {s.question_id}: {e}") from None

    def flush() -> None:
        nonlocal written
        out.append(rows)
        written += len(rows)
        rows.clear()
        rate = written / (time.perf_counter() - start)
        echo(f"{written}/{len(samples)} answered ({rate:.2f} questions/s)")

    try:
        while written + len(rows) < len(samples):
            while engine.active + len(engine.waiting) < batch_size:
                s = next(queue, None)
                if s is None:
                    break
                admit(s)
            engine.step()
            for s, r in finished:
                if r.error is not None:
                    if isinstance(r.error, ValueError):  # the prompt's media, say
                        raise EvalDataError(f"question {s.question_id}: {r.error}") from None
                    raise r.error
                answer = _cut_at_stop(pipeline.decode(r.token_ids), sampling.stop_strings)
                rows.append({"question_id": s.question_id, "prompt": s.text, "answer": answer})
            finished.clear()
            if len(rows) >= batch_size:
                flush()
    finally:  # an error or an interrupt keeps the answers already made
        if rows:
            flush()


def evaluate(
    task: Task,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    load_pipeline: Callable[[], Any] | None = None,
    *,
    split: str | None = None,
    batch_size: int = 8,
    prefix_cache_mb: float = 1024.0,
    limit: int | None = None,
    max_new_tokens: int | None = None,
    model_name: str | None = None,
    judge: Any = None,
    judge_runs: int = 1,
    echo: Callable[[str], None] = print,
) -> Report:
    """Runs one task: answers the questions not yet answered, then scores all of them.

    Args:
      task: the benchmark.
      data_dir: the benchmark's directory, in its published layout.
      out_dir: where predictions, metrics and any submission or judge files go.
      load_pipeline: () -> `Pipeline`, called only if a question still needs an answer.
      split: the task's split (default: `task.default_split`).
      batch_size: the engine's slots: questions generated together.
      prefix_cache_mb: budget of the engine's prefix cache (0: off).
      limit: only the first N questions (also what is scored).
      max_new_tokens: override the task's answer length.
      model_name: recorded in run.json; a resume with another model is refused.
      judge: a `ChatClient` for the LLM-judged tasks.
      judge_runs: judge passes for mean and std.
    """
    split = split or task.default_split
    if task.splits and split not in task.splits:
        raise EvalDataError(
            f"{task.name}: unknown split {split!r} (one of {', '.join(task.splits)})"
        )
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if prefix_cache_mb < 0:
        raise ValueError(f"--prefix-cache-mb must be >= 0, got {prefix_cache_mb}")
    data_dir, out_dir = epath.Path(data_dir), local_out_dir(out_dir)
    samples = task.samples(data_dir, split)
    if limit is not None:
        samples = samples[:limit]
    ids = [s.question_id for s in samples]
    if len(set(ids)) != len(ids):
        raise EvalDataError(f"{data_dir}: question ids repeat within {task.name} {split}")
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_run(out_dir, {"task": task.name, "split": split, "model": model_name})
    out = PredictionsFile(out_dir / PREDICTIONS)
    done = out.load()
    pending = [s for s in samples if s.question_id not in done]
    echo(f"{task.name} {split}: {len(samples)} questions, {len(samples) - len(pending)} "
         f"already answered in {out.path}")  # fmt: skip
    # Questions about the same image come together, so the prefix cache still holds its
    # prompt's image tokens when the next one is admitted (the order within stays the task's).
    pending.sort(key=_image_key)
    if pending:
        if load_pipeline is None:
            raise EvalDataError(
                f"{len(pending)} questions have no answer in {out.path}; pass --model to answer"
            )
        check_images(pending)
        generate_answers(load_pipeline(), pending, out, batch_size,
                         max_new_tokens or task.max_new_tokens, echo, prefix_cache_mb)  # fmt: skip
        done = out.load()
    if task.needs_judge and judge is None:
        raise EvalDataError(f"{task.name} is scored by an LLM judge: the answers are in "
                            f"{out.path}; pass --judge-model to score them")  # fmt: skip
    answers = {s.question_id: done[s.question_id] for s in samples}
    ctx = ScoreContext(out_dir, data_dir, split, judge=judge, judge_runs=judge_runs, echo=echo)
    report = task.score(samples, answers, ctx)
    metrics = {"task": task.name, "split": split, "questions": len(samples), **report.metrics}
    (out_dir / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    return report
