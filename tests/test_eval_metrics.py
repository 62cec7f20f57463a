"""Metrics, answer normalisation and answer parsing against hand-computed values."""

from __future__ import annotations

import pytest

from llava_jax.eval.answers import mmbench_letter, mme_yes_no, pope_yes_no, scienceqa_letter
from llava_jax.eval.judge import parse_score_pair, parse_unit_score
from llava_jax.eval.metrics import (
    binary_metrics,
    circular_accuracy,
    leave_one_out_accuracy,
    mean_std,
    mme_subtask_score,
    relative_score,
    textvqa_accuracy,
    vizwiz_accuracy,
    vqa_accuracy,
)
from llava_jax.eval.normalize import (
    CONTRACTIONS,
    evalai_answer,
    normalize_gqa,
    normalize_vqa,
    process_punctuation,
)
from llava_jax.eval.scienceqa import scienceqa_table


@pytest.mark.parametrize(
    "text, want",
    [
        ("Two", "2"),  # number words
        ("none", "0"),
        ("one two three", "1 2 3"),
        ("the dog", "dog"),  # articles
        ("A cat", "cat"),
        ("a an the", ""),
        ("dont", "don't"),  # contractions
        ("isnt it", "isn't it"),
        ("Im", "im"),  # capitalised keys never match after lower-casing (sic)
        ("somebody'd", "somebodyd"),  # the reversed entry (sic)
        ("yes.", "yes"),  # a period not before a digit goes
        ("2.5", "2.5"),  # a decimal point stays
        ("e.g.", "eg"),
        ("hot-dog", "hot dog"),  # glued punctuation becomes a space
        ("hot - dog", "hot dog"),  # punctuation touching a space is deleted
        ("red,white", "red white"),
        ("red, white", "red white"),
        ("1,000", "1000"),  # digit,digit: every mark is deleted, not spaced
        ("(yes)", "yes"),
        ("what?", "what"),
        ("it's", "it's"),  # apostrophes are not punctuation here
        ("50%", "50%"),  # nor is %
        ("  Two\tdogs\n", "2 dogs"),
    ],
)
def test_normalize_vqa(text, want):
    assert normalize_vqa(text) == want


def test_contraction_map_parses_whole():
    from llava_jax.eval.normalize import _CONTRACTIONS_TEXT

    pairs = [p for p in _CONTRACTIONS_TEXT.replace("\n", "|").split("|") if p.strip()]
    assert len(pairs) == len(CONTRACTIONS) == 120  # no key lost or repeated
    assert all("'" in v for k, v in CONTRACTIONS.items() if k != "somebody'd")
    assert CONTRACTIONS["wont"] == "won't" and CONTRACTIONS["y'all'dve"] == "y'all'd've"


def test_punctuation_is_judged_on_the_input_text():
    # "-" touches a space somewhere, so every "-" is deleted, even the glued one.
    assert process_punctuation("a-b - c") == "ab  c"


@pytest.mark.parametrize(
    "text, want",
    [
        ("It's a DOG's bone?", "it 's dog 's bone"),
        ("Yes, it is.", "yes it is"),
        ("1,000 people", "1000 people"),
        ("Unanswerable", "unanswerable"),
    ],
)
def test_evalai_answer(text, want):
    assert evalai_answer(text) == want


def _official_loop(answer, humans):
    """The evaluation script's loop, written out: leave each human out in turn."""
    accs = []
    for i in range(len(humans)):
        others = humans[:i] + humans[i + 1 :]
        accs.append(min(1.0, sum(h == answer for h in others) / 3))
    return sum(accs) / len(accs)


@pytest.mark.parametrize("matches, want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0)])
def test_leave_one_out_accuracy(matches, want):
    humans = ["cat"] * matches + ["dog"] * (10 - matches)
    assert leave_one_out_accuracy("cat", humans) == pytest.approx(want)
    assert _official_loop("cat", humans) == pytest.approx(want)


# (prediction, human answers, accuracy × 100) as GT-Vision-Lab/VQA vqaEval.py at a013f00 (2021)
# computes them (`VQAEval.evaluate`, run on each case; values copied from its `evalQA`).
VQA_OFFICIAL = [
    ("two", ["two"] * 4 + ["2"] * 2 + ["3"] * 4, 100.0),  # the 2016 script: 60
    ("none", ["nothing"] * 5 + ["none"] * 5, 100.0),  # the 2016 script: 0
    ("Yes", ["yes"] * 10, 0.0),  # agreeing humans: nothing is normalised
    ("yes", ["yes"] * 10, 100.0),
    (" two\n", ["two"] * 10, 100.0),  # whitespace is always stripped
    ("2", ["two"] * 10, 0.0),
    ("cat", ["cat."] * 3 + ["dog"] * 7, 90.0),
    ("cat", ["the cat", "a cat", "cat"] + ["dog"] * 7, 90.0),  # the 2016 script: 30
    ("two", ["2"] * 9 + ["3"], 100.0),
    ("Three", ["2"] * 9 + ["3"], 30.0),
    ("Cat.", ["cat"] + ["dog"] * 9, 30.0),
]


@pytest.mark.parametrize("answer, humans, want", VQA_OFFICIAL)
def test_vqa_accuracy_matches_the_2021_official_script(answer, humans, want):
    assert 100 * vqa_accuracy(answer, humans) == pytest.approx(want)


# The VizWiz evaluator (vizwiz.org, vqaEval.py `VQAEval`), run on each case: the prediction
# normalised in full, the human answers compared raw.
VIZWIZ_OFFICIAL = [
    ("coca cola", ["coca-cola"] * 5 + ["coke"] * 5, 0.0),  # ours used to say 100
    ("T-shirt", ["t-shirt"] * 10, 0.0),
    ("Dr. Pepper", ["dr. pepper"] * 10, 0.0),
    ("dr pepper", ["dr pepper"] * 10, 100.0),
    ("blue/white", ["blue/white"] * 10, 0.0),
    ("blue white", ["blue/white"] * 4 + ["blue"] * 6, 0.0),
    ("unanswerable", ["unanswerable"] * 10, 100.0),
    ("Two", ["2"] * 10, 100.0),
]


@pytest.mark.parametrize("answer, humans, want", VIZWIZ_OFFICIAL)
def test_vizwiz_accuracy_matches_the_official_evaluator(answer, humans, want):
    assert 100 * vizwiz_accuracy(answer, humans) == pytest.approx(want)


def test_textvqa_accuracy_normalises_both_sides():
    humans = ["Coca-Cola"] * 2 + ["coca cola"] + ["pepsi"] * 7
    assert textvqa_accuracy("coca cola", humans) == pytest.approx(0.9)
    assert textvqa_accuracy("COCA-COLA!", humans) == pytest.approx(0.9)
    assert textvqa_accuracy("pepsi", humans) == pytest.approx(1.0)


def test_gqa_normalisation():
    assert normalize_gqa(" Yes.") == "yes" and normalize_gqa("left") == "left"


# What LLaVA's llava/eval/eval_science_qa.py reads (its main loop, run on each case with four
# choices; None is its "FAILED", always wrong).
SCIENCEQA_OFFICIAL = [
    ("A", "A"), ("B. Texas", "B"), ("A. ", "A"), ("The answer is B.", "B"),
    ("I think The answer is C, yes", "C"),  # its "." matches any character
    ("B.", None), ("(A)", None), ("B) Texas", None), ("answer: C", None), ("Texas", None),
    ("The answer is B", None), ("the answer is B.", None), ("A.Texas", None), (" B", None),
    ("The answer is A. The answer is B.", None), ("The answer is E.", None), ("E", None),
]  # fmt: skip


@pytest.mark.parametrize("text, want", SCIENCEQA_OFFICIAL)
def test_scienceqa_letter_reads_only_what_the_official_script_reads(text, want):
    assert scienceqa_letter(text, 4) == want


# VLMEvalKit's `can_infer` (vlmeval/utils/matching_util.py at e8e78f0), run on each case with
# the options dog, cat, cow, bird; None is its False.
MMBENCH_OFFICIAL = [
    ("A is correct", "A"), ("**B**", "B"), ("Option B", "B"), ("C, cow", "C"), ("B,", "B"),
    ("B.", "B"), ("(C)", "C"), ("A cow", "A"), ("It is a cow.", "C"), ("cat", "B"),
    ("C cow is it not B", "C"),  # two letters: the option text decides
    ("The answer is A. No, B.", "A"),
    ("The correct answer is **D** because blah blah blah blah", "D"),
    ("Sorry, I can't help with images of people yet.", "Z"), ("Z", "Z"),
    ("I cannot tell, Z.", "Z"),
    ("I think it is a cow in the picture", None),  # longer than twice the options' text
    ("A dog is sitting there and it is big", None),  # "A" too far from the end
    ("It is a cat or a dog", None), ("X", None),
    ("Failed to obtain answer via API: cow", None),
]  # fmt: skip


@pytest.mark.parametrize("text, want", MMBENCH_OFFICIAL)
def test_mmbench_letter_matches_vlmevalkit_exact_matching(text, want):
    assert mmbench_letter(text, ["dog", "cat", "cow", "bird"]) == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("Yes", "yes"),
        ("Yes, there is a dog.", "yes"),
        ("No.", "no"),
        ("There is not a dog in the image.", "no"),
        ("yes. no", "yes"),  # only the first sentence counts
        ("Nope", "yes"),  # not a listed word (sic)
        ("no, none", "no"),
    ],
)
def test_pope_yes_no(text, want):
    assert pope_yes_no(text) == want


@pytest.mark.parametrize(
    "text, want",
    [("Yes", "yes"), ("no", "no"), ("No, it is not.", "no"), ("Yes it is", "yes"),
     ("The answer is yes", "other"), ("Not sure", "no"), ("maybe", "other")],
)  # fmt: skip
def test_mme_yes_no(text, want):
    assert mme_yes_no(text) == want


def test_binary_metrics():
    m = binary_metrics(["yes", "yes", "no", "no", "yes"], ["yes", "no", "no", "yes", "yes"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 1)
    assert m["accuracy"] == pytest.approx(60.0)
    assert m["precision"] == pytest.approx(200 / 3)
    assert m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3)
    assert m["yes_ratio"] == pytest.approx(60.0)


def test_mme_subtask_score():
    s = mme_subtask_score({"a.jpg": [True, True], "b.jpg": [True, False], "c.jpg": [False, False]})
    assert s["acc"] == pytest.approx(50.0)
    assert s["acc_plus"] == pytest.approx(100 / 3)
    assert s["score"] == pytest.approx(50 + 100 / 3)


def test_circular_accuracy():
    passes = {"1": [True] * 4, "2": [True, False, True, True], "3": [True, True]}
    assert circular_accuracy(passes) == pytest.approx(200 / 3)


def test_relative_score_and_spread():
    assert relative_score([(8, 6), (8, 8)]) == pytest.approx(87.5)
    assert mean_std([80.0, 90.0]) == pytest.approx((85.0, 5.0))
    with pytest.raises(ValueError):
        relative_score([(0, 1)])


# LLaVA's eval_gpt_review_bench.py::parse_score and summarize_gpt_review.py, run on each case.
LLAVA_BENCH_PARSE_OFFICIAL = [
    ("8 6\nAssistant 1 was ...", (8.0, 6.0)), ("8,6", (8.0, 6.0)), ("7.5 9", (7.5, 9.0)),
    ("Assistant 1: 8\nAssistant 2: 6", None),  # we used to read (1, 8)
    ("8  6", None), ("8, 6", None), ("8 6 ", None), ("8/10 6/10", None), ("Scores: 8 6", None),
    ("\n8 6", None),
]  # fmt: skip


@pytest.mark.parametrize("reply, want", LLAVA_BENCH_PARSE_OFFICIAL)
def test_llava_bench_reply_is_parsed_as_llava_does(reply, want):
    assert parse_score_pair(reply) == want


def test_llava_bench_relative_score_as_llava_summary():
    # Three reviews, one unreadable ([-1, -1]): means (5.0, 4.333) -> 86.66 (summary: 86.7).
    assert relative_score([(8, 6), (8, 8), (-1, -1)]) == pytest.approx(100 * 4.333 / 5.0)
    # Means rounded to 3 decimals before dividing: (7.6667, 6.3333) -> 6.333 / 7.667.
    assert relative_score([(8, 6), (7, 7), (8, 6)]) == pytest.approx(100 * 6.333 / 7.667)


# MM-Vet's mm-vet_evaluator.py: `float(content.split(" ")[0].strip())` in [0, 1], else asked
# again (None here).
MMVET_PARSE_OFFICIAL = [
    ("0.7", 0.7), (".5", 0.5), ("1.0 because it is right", 1.0), ("0.3\n", 0.3), ("0", 0.0),
    ("Correctness: 0.7", None), (" 0.8", None), ("1.5", None), ("-0.1", None), ("0.5,", None),
    ("wrong", None), ("", None),
]  # fmt: skip


@pytest.mark.parametrize("reply, want", MMVET_PARSE_OFFICIAL)
def test_mmvet_grade_is_parsed_as_the_official_evaluator(reply, want):
    assert parse_unit_score(reply) == want


def test_scienceqa_table():
    def meta(subject, hint, image, grade):
        return {"subject": subject, "hint": hint, "image": image, "grade": grade}

    rows = [
        (meta("natural science", "", "image.png", "grade2"), True),  # NAT IMG G1-6
        (meta("natural science", "ctx", "image.png", "grade8"), False),  # NAT TXT IMG G7-12
        (meta("social science", "ctx", None, "grade3"), True),  # SOC TXT G1-6
        (meta("language science", "", None, "grade10"), True),  # LAN NO G7-12
    ]
    t = scienceqa_table(rows)
    want = {"NAT": 50.0, "SOC": 100.0, "LAN": 100.0, "TXT": 50.0, "IMG": 50.0, "NO": 100.0,
            "G1-6": 100.0, "G7-12": 50.0, "Avg": 75.0}  # fmt: skip
    assert t == pytest.approx(want)
    assert scienceqa_table(rows[:1])["SOC"] is None
