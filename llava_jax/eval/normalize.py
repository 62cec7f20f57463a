"""Answer normalisation of the official VQA evaluation, and of EvalAI's answer processor.

The VQA evaluation script (GT-Vision-Lab/VQA, `vqaEval.py`) compares a prediction with the
ten human answers, both after `process_punctuation` and `process_digit_article` when the
humans disagree (`metrics.vqa_accuracy` says when). The EvalAI answer
processor (`m4c_evaluator.py::EvalAIAnswerProcessor`, which LLaVA applies to every answer it
submits, and which the TextVQA evaluator applies to both sides) lower-cases and strips commas
and question marks first. The quirks of the originals are kept on purpose, because they decide
what counts as a match:

- punctuation is deleted when it touches a space (or the text has a digit-comma-digit) and
  replaced by a space otherwise, judged on the input text, one mark at a time;
- a period is deleted unless a digit follows it (the original's lookbehind is mistyped as a
  lookahead, `(?!<=\\d)`, so a preceding digit does not protect it), at most 32 times
  (`re.UNICODE` was passed as the `count` argument);
- the contraction map is applied after lower-casing, so its capitalised keys ("Im", "Ive")
  never match, and one entry is reversed ("somebody'd" -> "somebodyd").
"""

from __future__ import annotations

import re

# The VQA map of contractions written without the apostrophe, as "written -> canonical";
# kept exactly as the evaluation script has it.
_CONTRACTIONS_TEXT = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't
couldn'tve couldn't've | couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't
hadnt hadn't | hadnt've hadn't've | hadn'tve hadn't've | hasnt hasn't | havent haven't
hed he'd | hed've he'd've | he'dve he'd've | hes he's | howd how'd | howll how'll | hows how's
Id've I'd've | I'dve I'd've | Im I'm | Ive I've | isnt isn't | itd it'd | itd've it'd've
it'dve it'd've | itll it'll | let's let's | maam ma'am | mightnt mightn't
mightnt've mightn't've | mightn'tve mightn't've | mightve might've | mustnt mustn't
mustve must've | neednt needn't | notve not've | oclock o'clock | oughtnt oughtn't
ow's'at 'ow's'at | 'ows'at 'ow's'at | 'ow'sat 'ow's'at | shant shan't | shed've she'd've
she'dve she'd've | she's she's | shouldve should've | shouldnt shouldn't
shouldnt've shouldn't've | shouldn'tve shouldn't've | somebody'd somebodyd
somebodyd've somebody'd've | somebody'dve somebody'd've | somebodyll somebody'll
somebodys somebody's | someoned someone'd | someoned've someone'd've
someone'dve someone'd've | someonell someone'll | someones someone's | somethingd something'd
somethingd've something'd've | something'dve something'd've | somethingll something'll
thats that's | thered there'd | thered've there'd've | there'dve there'd've
therere there're | theres there's | theyd they'd | theyd've they'd've | they'dve they'd've
theyll they'll | theyre they're | theyve they've | twas 'twas | wasnt wasn't
wed've we'd've | we'dve we'd've | weve we've | werent weren't | whatll what'll
whatre what're | whats what's | whatve what've | whens when's | whered where'd
wheres where's | whereve where've | whod who'd | whod've who'd've | who'dve who'd've
wholl who'll | whos who's | whove who've | whyll why'll | whyre why're | whys why's
wont won't | wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've
wouldn'tve wouldn't've | yall y'all | yall'll y'all'll | y'allll y'all'll
yall'd've y'all'd've | y'alld've y'all'd've | y'all'dve y'all'd've | youd you'd
youd've you'd've | you'dve you'd've | youll you'll | youre you're | youve you've
"""
CONTRACTIONS: dict[str, str] = dict(
    pair.split() for pair in _CONTRACTIONS_TEXT.replace("\n", " | ").split("|") if pair.strip()
)
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")  # fmt: skip
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: see the module docstring
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The VQA script's punctuation step (tests decide each mark on the *input* text)."""
    out = text
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or glued:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    """Lower-cases, maps number words to digits, drops articles, restores contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def strip_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa(text: str) -> str:
    """The full normalisation of `vqaEval.py` (whitespace, punctuation, digits, articles)."""
    return process_digit_article(process_punctuation(strip_whitespace(text)))


def evalai_answer(text: str) -> str:
    """EvalAI's answer processor: lower-case, drop commas and question marks, split "'s",
    then `normalize_vqa`. LLaVA runs every VQAv2 / VizWiz / TextVQA answer through it."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalize_vqa(text)


def normalize_gqa(text: str) -> str:
    """GQA: LLaVA's `convert_gqa_for_eval.py` strips a final period and lower-cases; the GQA
    script then compares exactly."""
    return text.strip().rstrip(".").lower()
