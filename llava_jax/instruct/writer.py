"""LLaVA-Instruct-style samples from image contexts through an OpenAI-compatible LLM.

For each image: the system message of the response type, the few-shot (context, response)
pairs as user / assistant turns, then the image's context as the last user turn. The reply is
parsed into a LLaVA record,

    {"id": "000000033471", "image": "000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...]}

validated, and appended to the output JSONL as soon as it arrives. A rerun skips every image
already in the output, so an interrupted run resumes without duplicates (and, with the
client's cache, without paying twice for replies it had received).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llava_jax.eval.task import drop_partial_line
from llava_jax.instruct.coco import ImageContext, context_text
from llava_jax.instruct.prompts import DETAIL_INSTRUCTIONS, EXAMPLES, SYSTEM_MESSAGES

RESPONSE_TYPES = ("conversation", "detail", "complex")
# When the first this many replies are all the same lasting failure (a refused connection, a
# 404), every other request would fail alike: stop instead of spending each one's retries.
FAIL_FAST = 8


class ReplyError(ValueError):
    """A reply that does not make a sample; `reason` is the counted category."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class FewShot:
    system: str
    examples: tuple[tuple[str, str], ...]  # (context, response)


def load_few_shot(response_type: str, directory: str | os.PathLike | None = None) -> FewShot:
    """The system message and examples: built in, or from a directory laid out as LLaVA's
    `playground/data/prompts/<type>/`: `NNN_caps.txt` + `NNN_conv.txt` pairs and, optionally,
    `system_message.txt` (replacing the built-in system message)."""
    if response_type not in RESPONSE_TYPES:
        raise ValueError(f"unknown response type {response_type!r} (one of "
                         f"{', '.join(RESPONSE_TYPES)})")  # fmt: skip
    system = SYSTEM_MESSAGES[response_type]
    if directory is None:
        return FewShot(system, (EXAMPLES[response_type],))
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(2, "no such few-shot directory", str(directory))
    if (directory / "system_message.txt").is_file():
        system = (directory / "system_message.txt").read_text(encoding="utf-8").strip()
    examples = []
    for caps in sorted(directory.glob("*_caps.txt")):
        conv = caps.with_name(caps.name.replace("_caps.txt", "_conv.txt"))
        if not conv.is_file():
            raise ValueError(f"{caps}: no matching {conv.name}")
        examples.append((caps.read_text(encoding="utf-8").strip(),
                         conv.read_text(encoding="utf-8").strip()))  # fmt: skip
    if not examples:
        raise ValueError(f"{directory}: no NNN_caps.txt / NNN_conv.txt example pairs")
    return FewShot(system, tuple(examples))


def context_of(image: ImageContext, response_type: str) -> str:
    """The conversation type sees the captions only, as in the paper; the others the boxes
    too."""
    return context_text(image.captions, () if response_type == "conversation" else image.boxes)


def build_messages(few_shot: FewShot, context: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": few_shot.system}]
    for example_context, response in few_shot.examples:
        messages.append({"role": "user", "content": example_context})
        messages.append({"role": "assistant", "content": response})
    messages.append({"role": "user", "content": context})
    return messages


_REFUSAL = re.compile(r"^\W*(i'?m sorry|sorry|i cannot|i can'?t|i am unable|as an ai)\b", re.I)
_MARKER = re.compile(r"^\s*(question|answer)\s*:\s*", re.IGNORECASE | re.MULTILINE)
_SEPARATOR = re.compile(r"^\s*={3,}\s*$", re.MULTILINE)


def parse_qa(reply: str) -> list[tuple[str, str]]:
    """ "Question: ... === Answer: ..." blocks -> [(question, answer)].

    A final question left without an answer (a reply cut at max_tokens) is dropped; anything
    else out of order is an error.
    """
    if not reply.strip():
        raise ReplyError("empty_reply")
    marks = list(_MARKER.finditer(reply))
    if not marks:
        raise ReplyError("no_question_answer", "no Question: / Answer: blocks")
    turns = []
    for mark, nxt in zip(marks, [*marks[1:], None], strict=True):
        text = reply[mark.end() : nxt.start() if nxt else len(reply)]
        turns.append((mark.group(1).lower(), _SEPARATOR.sub("", text).strip()))
    if turns[-1][0] == "question":
        turns = turns[:-1]
    kinds = [k for k, _ in turns]
    if not turns or kinds != ["question", "answer"] * (len(turns) // 2):
        raise ReplyError("not_alternating", "questions and answers do not alternate")
    if any(not text for _, text in turns):
        raise ReplyError("empty_turn", "an empty question or answer")
    return [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]


def detail_instruction(image_id: int, seed: int) -> str:
    """One of the paper's 16 instructions, drawn per image (the same on every rerun)."""
    return random.Random(f"{seed}:{image_id}").choice(DETAIL_INSTRUCTIONS)


def to_record(image: ImageContext, response_type: str, reply: str, seed: int) -> dict[str, Any]:
    """A LLaVA JSON record from a reply, or `ReplyError` with the reason it is unusable."""
    if response_type == "detail":
        text = reply.strip()
        if not text:
            raise ReplyError("empty_reply")
        if _REFUSAL.match(text):
            raise ReplyError("refusal", "the model declined")
        if _MARKER.search(text):
            raise ReplyError("not_a_description", "a Question:/Answer: reply to a detail prompt")
        pairs = [(detail_instruction(image.image_id, seed), text)]
    else:
        pairs = parse_qa(reply)
    conversations = []
    for i, (question, answer) in enumerate(pairs):
        if "<image>" in question or "<image>" in answer:
            raise ReplyError("image_token_in_text", "the reply contains an <image> placeholder")
        value = f"<image>\n{question}" if i == 0 else question
        conversations += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return {"id": Path(image.file_name).stem, "image": image.file_name,
            "conversations": conversations}  # fmt: skip


def done_ids(path: Path) -> set[str]:
    """Ids already written; a last line cut short by an interruption is removed."""
    data = drop_partial_line(path)
    ids = set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                ids.add(str(json.loads(line)["id"]))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{number}: not a LLaVA record with an id") from None
    return ids


@dataclasses.dataclass
class Summary:
    """What a `generate` call did.

    Attributes:
      written: samples appended to the output.
      skipped_done: images already in the output.
      rejected: reason -> replies dropped (`request_failed` for requests that got no reply).
      not_asked: images left out after a fail-fast stop.
      first_error: the first failed request's error, if any.
    """

    written: int
    skipped_done: int
    rejected: collections.Counter
    not_asked: int = 0
    first_error: str | None = None

    def format(self) -> str:
        why = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        line = (f"{self.written} samples written, {self.skipped_done} already there, "
                f"{sum(self.rejected.values())} rejected ({why})")  # fmt: skip
        if self.not_asked:
            line += f", {self.not_asked} not asked (the first {FAIL_FAST} requests failed alike)"
        return line

    def failure(self) -> str | None:
        """One line when requests failed and nothing was written, else None."""
        failed = self.rejected["request_failed"]
        if self.written or not failed:
            return None
        asked = sum(self.rejected.values())
        stopped = f", {self.not_asked} not asked" if self.not_asked else ""
        return (f"no sample generated: {failed} of {asked} requests failed{stopped}; first "
                f"error: {self.first_error}")  # fmt: skip


def _fails_alike(replies: Sequence[Any]) -> bool:
    """Whether `replies` are all the same failure, one not expected to pass on its own."""
    errors = {r.error for r in replies}
    return None not in errors and len(errors) == 1 and not any(r.transient for r in replies)


def generate(
    client: Any,
    images: Sequence[ImageContext],
    response_type: str,
    out: str | os.PathLike,
    few_shot: FewShot | None = None,
    params: dict[str, Any] | None = None,
    seed: int = 0,
    echo: Callable[[str], None] = print,
) -> Summary:
    """Generates one sample per image into `out` (JSONL), resuming.

    Args:
      client: a `ChatClient`.
      images: the contexts, e.g. from `coco.load_contexts`.
      response_type: conversation, detail or complex.
      out: the output JSONL; rejected replies go to `OUT.rejected.jsonl` with their reason.
      few_shot: system message and examples (default: built in).
      params: request parameters (temperature, max_tokens, ...).
      seed: draws the detail instruction.

    When the first `FAIL_FAST` requests all fail alike with an error that is not expected to
    pass (a refused connection, a 404), the rest are not asked (`Summary.not_asked`).
    """
    few_shot = few_shot or load_few_shot(response_type)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out)
    todo = [im for im in images if Path(im.file_name).stem not in done]
    bodies = [client.body(build_messages(few_shot, context_of(im, response_type)),
                          **(params or {})) for im in todo]  # fmt: skip
    rejected: collections.Counter = collections.Counter()
    written, answered, first, first_error = 0, 0, [], None
    echo(f"{len(images)} images, {len(images) - len(todo)} already in {out}; asking "
         f"{client.model} for {len(todo)}")  # fmt: skip
    rejects_path = out.with_name(out.name + ".rejected.jsonl")
    with (
        contextlib.closing(client.map(bodies)) as replies,  # closed early: the retries end
        open(out, "a", encoding="utf-8") as f,
        open(rejects_path, "w", encoding="utf-8") as r,
    ):
        for n, reply in enumerate(replies, 1):
            answered = n
            image = todo[reply.index]
            try:
                if reply.error is not None:
                    first_error = first_error or reply.error
                    raise ReplyError("request_failed", reply.error)
                record = to_record(image, response_type, reply.text, seed)
            except ReplyError as e:
                rejected[e.reason] += 1
                r.write(json.dumps({"image": image.file_name, "reason": e.reason,
                                    "detail": str(e), "reply": reply.text}) + "\n")  # fmt: skip
            else:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                written += 1
            if n % 100 == 0:
                echo(f"{n}/{len(todo)} replies")
            if n <= FAIL_FAST:
                first.append(reply)
            if n == FAIL_FAST < len(todo) and _fails_alike(first):
                echo(f"stopping: the first {FAIL_FAST} requests all failed with {reply.error}")
                break
    if not rejected:
        rejects_path.unlink()
    return Summary(written, len(images) - len(todo), rejected, len(todo) - answered, first_error)
