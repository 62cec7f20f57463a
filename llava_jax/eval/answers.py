"""Reading the answer out of generated text: option letters and yes / no."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

LETTERS = string.ascii_uppercase
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."

# "A", "A.", "(A)", "A)", "A: text", "A. text": a letter standing alone at the start (not the
# article of "A dog ...").
_LEADING = re.compile(r"^(?:\(([A-Z])\)|([A-Z])(?:$|[.:)](?:\s|$)))")
# "The answer is A.", "answer: (B)", "Answer is C": LLaVA's "The answer is X." and variants.
_STATED = re.compile(r"\b(?i:answer)(?: is)?\s*:?\s*\(?([A-Z])\b(?!['’])")


def option_letter(text: str, options: Sequence[str]) -> str | None:
    """The option letter a model answered, or None when it cannot be read.

    Tried in order: a letter at the start ("B", "B.", "(B) ...", "B: ..."), "The answer is B"
    anywhere (one distinct letter only), then the text of exactly one option.

    Args:
      text: the generated answer.
      options: the option texts, lettered A, B, C, ... in order.
    """
    valid = LETTERS[: len(options)]
    text = text.strip()
    found = _LEADING.match(text)
    if found and (found.group(1) or found.group(2)) in valid:
        return found.group(1) or found.group(2)
    stated = {m for m in _STATED.findall(text) if m in valid}
    if len(stated) == 1:
        return stated.pop()
    bare = text.rstrip(".").strip().lower()
    named = [LETTERS[i] for i, o in enumerate(options) if o.strip().lower() == bare]
    return named[0] if len(named) == 1 else None


def pope_yes_no(text: str) -> str:
    """LLaVA's `eval_pope.py` rule: the first sentence, commas dropped, is "no" if it holds
    the word "No", "no" or "not", else "yes"."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def mme_yes_no(text: str) -> str:
    """MME's `calculation.py` rule: lower-cased; exactly "yes"/"no", else "yes" or "no" in
    the first four characters, else "other" (always wrong)."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"
