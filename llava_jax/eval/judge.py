"""Asking an LLM judge about every answer, several times, with the replies kept on disk.

`judge_all` sends one request per (question, run) through a `ChatClient`, appends each raw
reply to `OUT/judge.jsonl` as it arrives (with the score parsed from it and the request's
key), and on a rerun keeps the readable replies to the very same requests, so an interrupted
judging resumes and nothing is paid for twice (the client's cache covers replies that were
received but not yet written), while a changed answer is judged again and an unreadable
reply is asked again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llava_jax.eval.task import EvalDataError, ScoreContext, drop_partial_line

JUDGE_FILE = "judge.jsonl"


def parse_score_pair(reply: str) -> tuple[float, float] | None:
    """LLaVA-Bench, as LLaVA's `llava/eval/eval_gpt_review_bench.py::parse_score`: the first
    line, commas turned into spaces, split on single spaces, must be exactly two numbers
    ("8 6", "8,6"); anything else ("Assistant 1: 8", "8  6", "8/10 6/10") is unreadable."""
    fields = reply.split("\n")[0].replace(",", " ").split(" ")
    if len(fields) != 2:
        return None
    try:
        return float(fields[0]), float(fields[1])
    except ValueError:
        return None


def parse_unit_score(reply: str) -> float | None:
    """MM-Vet, as its `mm-vet_evaluator.py`: the reply's first space-separated field, as a
    number in [0, 1] ("0.7", ".5", "1.0 because ..."); "Correctness: 0.7" or " 0.8" is
    unreadable (and so is "nan", which the original's range check lets through)."""
    try:
        value = float(reply.split(" ")[0].strip())
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None


def _load(path: Path) -> tuple[dict[str, dict[str, Any]], set[str]]:
    """The judgements on disk, by request key (`ChatClient.key`: the endpoint, judge model,
    messages, answer included, and parameters): the readable ones, and the keys of the
    requests whose last reply was unreadable (kept in the file, but asked again)."""
    readable, unreadable = {}, set()
    for line in drop_partial_line(path).decode("utf-8").splitlines():
        try:
            row = json.loads(line)
            key, score = row["request"], row["score"]
        except (ValueError, KeyError, TypeError):
            continue  # a line of an older layout, without its request key: judged again
        if score is None:
            unreadable.add(key)
        else:
            readable[key] = row
            unreadable.discard(key)
    return readable, unreadable


def judge_all(
    ctx: ScoreContext,
    requests: dict[str, list[dict[str, str]]],
    parse: Callable[[str], Any],
    params: dict[str, Any],
    only: set[tuple[str, int]] | None = None,
) -> dict[tuple[str, int], Any]:
    """Judges every question `ctx.judge_runs` times.

    A judgement on disk is reused only for the very same request, so a changed answer (or
    question, reference, judge, prompt) is judged again. An unreadable reply is asked again on
    every rerun, past the client's cache.

    Args:
      ctx: carries the client (`ctx.judge`), the run count and the output directory.
      requests: question id -> the chat messages for the judge.
      parse: reply -> score (None when the reply holds none).
      params: request parameters (temperature, max_tokens); run r also sends `seed=r`.
      only: the (question id, run) pairs to judge, when not all of them.

    Returns:
      (question id, run) -> parsed score, None for unreadable replies.
    """
    client = ctx.judge
    path = ctx.out_dir / JUDGE_FILE
    bodies = {(q, r): client.body(messages, seed=r, **params)
              for r in range(ctx.judge_runs) for q, messages in requests.items()
              if only is None or (q, r) in only}  # fmt: skip
    keys = {judged: client.key(body) for judged, body in bodies.items()}
    readable, unreadable = _load(path)
    scores = {judged: _as_score(readable[key]["score"]) for judged, key in keys.items()
              if key in readable}  # fmt: skip
    todo = [judged for judged in bodies if judged not in scores]
    again = [judged for judged in todo if keys[judged] in unreadable]
    for judged in again:
        client.drop_cached(bodies[judged])
    if todo:
        ctx.echo(f"judging {len(todo)} answers ({len(again)} unreadable before) with "
                 f"{client.model} at {client.url}")  # fmt: skip
    failures = []
    with open(path, "a", encoding="utf-8") as f:
        for reply in client.map([bodies[judged] for judged in todo]):
            q, r = todo[reply.index]
            if reply.error is not None:
                failures.append(reply.error)
                continue
            score = parse(reply.text)
            row = {"question_id": q, "run": r, "judge": client.model,
                   "request": keys[(q, r)], "reply": reply.text, "score": score}  # fmt: skip
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            scores[(q, r)] = _as_score(score)
    if failures:
        raise EvalDataError(f"{len(failures)} judge requests failed (rerun to retry; the "
                            f"replies so far are kept in {path}): {failures[0]}")  # fmt: skip
    return scores


def _as_score(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def runs_of(scores: dict[tuple[str, int], Any], runs: int) -> list[dict[str, Any]]:
    """Per run: question id -> score."""
    return [{q: v for (q, r), v in scores.items() if r == run} for run in range(runs)]


def unreadable(scores: dict[tuple[str, int], Any]) -> int:
    return sum(v is None for v in scores.values())
