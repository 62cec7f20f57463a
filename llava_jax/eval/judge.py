"""Asking an LLM judge about every answer, several times, with the replies kept on disk.

`judge_all` sends one request per (question, run) through a `ChatClient`, appends each raw
reply to `OUT/judge.jsonl` as it arrives (with the score parsed from it), and on a rerun
keeps the replies already there, so an interrupted judging resumes and nothing is paid for
twice (the client's cache covers replies that were received but not yet written).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llava_jax.eval.task import EvalDataError, ScoreContext, drop_partial_line

JUDGE_FILE = "judge.jsonl"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score_pair(reply: str) -> tuple[float, float] | None:
    """LLaVA-Bench: the first non-empty line holds the two scores ("8 6", "8, 6", "8/10 6/10"
    is not accepted: exactly two numbers)."""
    for line in reply.splitlines():
        if line.strip():
            numbers = _NUMBER.findall(line.replace(",", " "))
            return (float(numbers[0]), float(numbers[1])) if len(numbers) == 2 else None
    return None


def parse_unit_score(reply: str) -> float | None:
    """MM-Vet: the first number of the reply, which must lie in [0, 1]."""
    found = _NUMBER.search(reply)
    if found is None:
        return None
    value = float(found.group())
    return value if 0.0 <= value <= 1.0 else None


def _load(path: Path, judge: str) -> dict[tuple[str, int], dict[str, Any]]:
    """The replies of `judge` already on disk (another judge's replies are not reused)."""
    done = {}
    for line in drop_partial_line(path).decode("utf-8").splitlines():
        try:
            row = json.loads(line)
            if row["judge"] != judge:
                continue
            done[(str(row["question_id"]), int(row["run"]))] = row
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by an interruption: judged again
    return done


def judge_all(
    ctx: ScoreContext,
    requests: dict[str, list[dict[str, str]]],
    parse: Callable[[str], Any],
    params: dict[str, Any],
) -> dict[tuple[str, int], Any]:
    """Judges every question `ctx.judge_runs` times.

    Args:
      ctx: carries the client (`ctx.judge`), the run count and the output directory.
      requests: question id -> the chat messages for the judge.
      parse: reply -> score (None when the reply holds none).
      params: request parameters (temperature, max_tokens); run r also sends `seed=r`.

    Returns:
      (question id, run) -> parsed score, None for unreadable replies.
    """
    client = ctx.judge
    path = ctx.out_dir / JUDGE_FILE
    done = _load(path, client.model)
    todo = [(q, r) for r in range(ctx.judge_runs) for q in requests if (q, r) not in done]
    bodies = [client.body(requests[q], seed=r, **params) for q, r in todo]
    failures = []
    if todo:
        ctx.echo(f"judging {len(todo)} answers with {client.model} at {client.url}")
    with open(path, "a", encoding="utf-8") as f:
        for reply in client.map(bodies):
            q, r = todo[reply.index]
            if reply.error is not None:
                failures.append(reply.error)
                continue
            row = {"question_id": q, "run": r, "judge": client.model, "reply": reply.text,
                   "score": parse(reply.text)}  # fmt: skip
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            done[(q, r)] = row
    if failures:
        raise EvalDataError(f"{len(failures)} judge requests failed (rerun to retry; the "
                            f"replies so far are kept in {path}): {failures[0]}")  # fmt: skip
    return {key: _as_score(row["score"]) for key, row in done.items() if key[0] in requests}


def _as_score(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def runs_of(scores: dict[tuple[str, int], Any], runs: int) -> list[dict[str, Any]]:
    """Per run: question id -> score."""
    return [{q: v for (q, r), v in scores.items() if r == run} for run in range(runs)]


def unreadable(scores: dict[tuple[str, int], Any]) -> int:
    return sum(v is None for v in scores.values())
