"""Reading the answer out of generated text: option letters and yes / no."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

LETTERS = string.ascii_uppercase
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."

# LLaVA's `llava/eval/eval_science_qa.py` (haotian-liu/LLaVA): its `--options` default and
# its pattern, whose unescaped "." takes any character after the letter.
SCIENCEQA_OPTIONS = "ABCDE"
_SCIENCEQA_STATED = re.compile(r"The answer is ([A-Z]).")


def scienceqa_letter(text: str, num_choices: int) -> str | None:
    """The option letter as LLaVA's `eval_science_qa.py` reads it, or None ("FAILED").

    Only three forms are read: the letter alone ("B"), the letter, a period and a space at
    the start ("B. ..."), or exactly one "The answer is B." anywhere; the letter must be one
    of the question's options. Anything else ("B.", "(B)", "answer: B", the option text) is
    wrong, as it is in the official number.
    """
    if text in SCIENCEQA_OPTIONS:
        letter = text
    elif len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        letter = text[0]
    else:
        stated = _SCIENCEQA_STATED.findall(text)
        letter = stated[0] if len(stated) == 1 else None
    return letter if letter is not None and letter in SCIENCEQA_OPTIONS[:num_choices] else None


# VLMEvalKit's exact matching (`vlmeval/utils/matching_util.py::can_infer`, open-compass/
# VLMEvalKit at e8e78f0), which its circular evaluation uses without an LLM judge.
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_OPTION_MARKS = str.maketrans(dict.fromkeys(".()[],:;!*#{}", " "))
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
NO_OPTION = "Z"  # VLMEvalKit's letter for a refusal: never right


def _option_named(answer: str, letters: Sequence[str]) -> str | None:
    """`can_infer_option`: one option letter standing as a word among the last four words,
    or "the answer is X"; "Z" for a refusal or a lone "Z"."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(refusal in answer for refusal in _REFUSALS):
        return NO_OPTION
    words = answer.translate(_OPTION_MARKS).split()
    named = [c for c in letters if c in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0]
    if not named and NO_OPTION in words:
        return NO_OPTION
    verbose = _VERBOSE_ANSWER.search(answer)
    if verbose and verbose.group(1).upper() in letters:
        return verbose.group(1).upper()
    return None


def _option_text_named(answer: str, options: Sequence[str]) -> str | None:
    """`can_infer_text`: the text of exactly one option inside a not too long answer."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(o) for o in options):
        return None
    named = [LETTERS[i] for i, o in enumerate(options) if o.lower() in answer]
    return named[0] if len(named) == 1 else None


def mmbench_letter(answer: str, options: Sequence[str]) -> str | None:
    """The option letter VLMEvalKit's exact matching reads from an answer, or None.

    "A is correct", "**B**", "Option B", "C, cow", "B," and the text of one option inside a
    sentence all count; "Z" is returned for a refusal (wrong, as there).

    Args:
      answer: the generated answer.
      options: the option texts, lettered A, B, C, ... in order.
    """
    return _option_named(answer, LETTERS[: len(options)]) or _option_text_named(answer, options)


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
