"""Token ids and label masks of `plain`, `vicuna_v1` and `qwen_1_5` conversations, clean and
reference (the original LLaVA code's masks), against arrays derived by hand.

The expected rows were worked out from the template text and the tiny tokenizer's BPE
(`llava_jax/tiny_tokenizer.py`: Metaspace with a "▁" prepended to the start of the text only,
merges applied lowest rank first), not by running the code under test. Each row is
(token, id, trained in clean mode, trained in reference mode). The tiny LLaVA-1.5 config has
3 x 3 patches per view without CLS: 9 image tokens.
"""

import io

import numpy as np
import pytest
from PIL import Image

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.data import masking
from llava_jax.data.image_config import ImageProcessorConfig
from llava_jax.data.schema import RawRecord, SkipSample
from llava_jax.data.templates import get_template
from llava_jax.data.transforms import SampleTransform
from llava_jax.tiny_tokenizer import build_tiny_tokenizer

CFG = LlavaConfig(
    vision=VisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        image_size=42, patch_size=14,
    ),
    text=TextConfig(
        vocab_size=160, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12,
    ),
    image_token_id=150,
)  # fmt: skip


def img(trained=0, ref=0):
    return [("<image>", 150, trained, ref)] * 9


ASSISTANT = [("▁A", 120, 0, 0), ("S", 50, 0, 0), ("SI", 139, 0, 0), ("ST", 140, 0, 0),
             ("ANT", 142, 0, 0), (":", 83, 0, 0)]  # fmt: skip

# "<image>" + "A cat" + "\n": BOS and image ignored, the caption and "\n" trained (both modes).
PLAIN = [("<s>", 1, 0, 0), *img(), ("A", 32, 1, 1), ("▁cat", 116, 1, 1), ("\n", 5, 1, 1)]

# "Hi. USER: <image>\nWhat is it? ASSISTANT: A cat</s>"
VICUNA_1 = [
    ("<s>", 1, 0, 0),
    ("▁", 4, 0, 0), ("H", 39, 0, 0), ("i", 14, 0, 0), (".", 81, 0, 0),
    ("▁", 4, 0, 0), ("USER", 137, 0, 0), (":", 83, 0, 0), ("▁", 4, 0, 0),
    *img(),
    ("\n", 5, 0, 0), ("W", 54, 0, 0), ("h", 13, 0, 0), ("at", 108, 0, 0),
    ("▁", 4, 0, 0), ("is", 111, 0, 0), ("▁i", 112, 0, 0), ("t", 25, 0, 0), ("?", 88, 0, 0),
    *ASSISTANT,
    ("▁A", 120, 1, 1), ("▁cat", 116, 1, 1), ("</s>", 2, 1, 1),
]  # fmt: skip
# + "USER: and ASSISTANT: 5</s>": no "▁" after "</s>"; "▁" before "5" is its own token.
VICUNA_2 = [
    *VICUNA_1,
    ("USER", 137, 0, 0), (":", 83, 0, 0), ("▁and", 134, 0, 0),
    *ASSISTANT,
    ("▁", 4, 1, 1), ("5", 63, 1, 1), ("</s>", 2, 1, 1),
]  # fmt: skip

# ChatML, no BOS. Reference: the whole assistant message trained, and "\n", <|im_start|>,
# <|im_end|> everywhere.
QWEN_1 = [
    ("<|im_start|>", 152, 0, 1),
    ("s", 24, 0, 0), ("y", 30, 0, 0), ("s", 24, 0, 0), ("t", 25, 0, 0), ("e", 10, 0, 0),
    ("m", 18, 0, 0), ("\n", 5, 0, 1), ("H", 39, 0, 0), ("i", 14, 0, 0), (".", 81, 0, 0),
    ("<|im_end|>", 153, 0, 1), ("\n", 5, 0, 1),
    ("<|im_start|>", 152, 0, 1), ("u", 26, 0, 0), ("s", 24, 0, 0), ("er", 105, 0, 0),
    ("\n", 5, 0, 1),
    *img(),
    ("\n", 5, 0, 1), ("W", 54, 0, 0), ("h", 13, 0, 0), ("at", 108, 0, 0),
    ("▁", 4, 0, 0), ("is", 111, 0, 0), ("▁i", 112, 0, 0), ("t", 25, 0, 0), ("?", 88, 0, 0),
    ("<|im_end|>", 153, 0, 1), ("\n", 5, 0, 1),
    ("<|im_start|>", 152, 0, 1), ("a", 6, 0, 1), ("s", 24, 0, 1), ("s", 24, 0, 1),
    ("is", 111, 0, 1), ("t", 25, 0, 1), ("an", 106, 0, 1), ("t", 25, 0, 1), ("\n", 5, 0, 1),
    ("A", 32, 1, 1), ("▁cat", 116, 1, 1), ("<|im_end|>", 153, 1, 1), ("\n", 5, 0, 1),
]  # fmt: skip
QWEN_2 = [
    *QWEN_1,
    ("<|im_start|>", 152, 0, 1), ("u", 26, 0, 0), ("s", 24, 0, 0), ("er", 105, 0, 0),
    ("\n", 5, 0, 1), ("an", 106, 0, 0), ("d", 9, 0, 0), ("<|im_end|>", 153, 0, 1),
    ("\n", 5, 0, 1),
    ("<|im_start|>", 152, 0, 1), ("a", 6, 0, 1), ("s", 24, 0, 1), ("s", 24, 0, 1),
    ("is", 111, 0, 1), ("t", 25, 0, 1), ("an", 106, 0, 1), ("t", 25, 0, 1), ("\n", 5, 0, 1),
    ("5", 63, 1, 1), ("<|im_end|>", 153, 1, 1), ("\n", 5, 0, 1),
]  # fmt: skip

SYSTEM = {"from": "system", "value": "Hi."}
ROUND_1 = [{"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A cat"}]
ROUND_2 = [{"from": "human", "value": "and"}, {"from": "gpt", "value": "5"}]
CASES = {
    "plain": ("plain", [{"from": "human", "value": "<image>\nDescribe."}, ROUND_1[1]], PLAIN),
    "vicuna_1": ("vicuna_v1", [SYSTEM, *ROUND_1], VICUNA_1),
    "vicuna_2": ("vicuna_v1", [SYSTEM, *ROUND_1, *ROUND_2], VICUNA_2),
    "qwen_1": ("qwen_1_5", [SYSTEM, *ROUND_1], QWEN_1),
    "qwen_2": ("qwen_1_5", [SYSTEM, *ROUND_1, *ROUND_2], QWEN_2),
}


@pytest.fixture(scope="module")
def tokenizers():
    return {"bos": build_tiny_tokenizer(), "no_bos": build_tiny_tokenizer(add_bos=False)}


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def _transform(tokenizer, template, mode, **kw):
    kw = {"max_len": 512, "max_views": 4, **kw}
    image_cfg = ImageProcessorConfig.for_model(CFG)
    return SampleTransform(CFG, image_cfg, tokenizer, template, masking=mode, **kw)


def _tokenizer_for(template, tokenizers):
    return tokenizers["no_bos" if template == "qwen_1_5" else "bos"]


def _describe(tokenizer, ids, got, want) -> str:
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    rows = [f"{i:3d} {t!r:16} got {int(g)} want {int(w)}" for i, (t, g, w) in
            enumerate(zip(tokens, got, want, strict=True)) if g != w]  # fmt: skip
    return "\n".join(rows)


@pytest.mark.parametrize("mode", ["clean", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_ids_and_masks_are_the_hand_derived_ones(case, mode, tokenizers):
    template, conversation, rows = CASES[case]
    tokenizer = _tokenizer_for(template, tokenizers)
    example = _transform(tokenizer, template, mode)(RawRecord(case, conversation, images=(JPEG,)))
    tokens, ids, clean, reference = (list(col) for col in zip(*rows, strict=True))
    want = np.array(clean if mode == "clean" else reference, bool)
    # The table's tokens and ids agree with the vocabulary (a check on the table itself).
    assert tokenizer.convert_ids_to_tokens(ids) == tokens
    np.testing.assert_array_equal(example.input_ids, np.array(ids, np.int32))
    assert example.input_ids.dtype == np.int32 and example.trained.dtype == bool
    assert np.array_equal(example.trained, want), _describe(
        tokenizer, example.input_ids, example.trained, want
    )


def test_reference_masks_differ_from_clean_where_the_original_differs():
    # The tables themselves: plain and vicuna agree, qwen trains the chat markup too.
    for rows, same in ((PLAIN, True), (VICUNA_2, True), (QWEN_2, False)):
        assert ([r[2] for r in rows] == [r[3] for r in rows]) == same


def _reference(tokenizer, template, conversation, images=(JPEG,)):
    transform = _transform(tokenizer, template, "reference")
    return transform(RawRecord("r", conversation, images=images))


def test_v1_trailing_human_turn_is_a_tokenization_mismatch(tokenizers):
    # preprocess_v1 breaks out of its loop on a round without " ASSISTANT: " and masks the
    # whole sample; the clean masker trains the first reply.
    conversation = [SYSTEM, *ROUND_1, ROUND_2[0]]
    with pytest.raises(SkipSample, match=r"tokenization mismatch: 28 vs\. 32") as e:
        _reference(tokenizers["bos"], "vicuna_v1", conversation)
    assert e.value.reason == "no_supervised_tokens" and e.value.record_id == "r"


def test_v1_clean_trains_the_reply_before_a_trailing_human_turn(tokenizers):
    conversation = [SYSTEM, *ROUND_1, ROUND_2[0]]
    transform = _transform(tokenizers["bos"], "vicuna_v1", "clean")
    example = transform(RawRecord("r", conversation, images=(JPEG,)))
    want = np.zeros(len(example.input_ids), bool)
    want[25 + 8 : 28 + 8] = True  # "▁A ▁cat </s>" of VICUNA_1 (8 more image tokens)
    np.testing.assert_array_equal(example.trained, want)


def test_v1_legacy_tokenizer_flag_shifts_later_rounds_into_a_mismatch(tokenizers):
    # With `legacy` set, the -1 correction of rounds after the first is not applied, so the
    # second round counts one token too many: 41 vs. 40 (as the original on such a tokenizer).
    tokenizer = build_tiny_tokenizer()
    tokenizer.legacy = True
    with pytest.raises(SkipSample, match=r"tokenization mismatch: 41 vs\. 40"):
        _reference(tokenizer, "vicuna_v1", [SYSTEM, *ROUND_1, *ROUND_2])
    # One round: the correction never applies, so the flag changes nothing.
    example = _reference(tokenizer, "vicuna_v1", [SYSTEM, *ROUND_1])
    np.testing.assert_array_equal(example.trained, [bool(r[3]) for r in VICUNA_1])


def test_v1_question_holding_the_separator_is_a_mismatch(tokenizers):
    conversation = [{"from": "human", "value": "<image>\nSay ASSISTANT: hi"}, ROUND_1[1]]
    with pytest.raises(SkipSample, match="tokenization mismatch"):
        _reference(tokenizers["bos"], "vicuna_v1", conversation)
    # The clean masker is not fooled.
    example = _transform(tokenizers["bos"], "vicuna_v1", "clean")(
        RawRecord("r", conversation, images=(JPEG,))
    )
    assert example.trained.sum() == 3  # "▁A ▁cat </s>"


def test_plain_reference_takes_one_image_turn_and_one_caption(tokenizers):
    two_rounds = [ROUND_1[0], ROUND_1[1], {"from": "human", "value": "x"}, ROUND_1[1]]
    with pytest.raises(SkipSample, match="plain format") as e:
        _reference(tokenizers["bos"], "plain", two_rounds)
    assert e.value.reason == "malformed_record"
    with pytest.raises(SkipSample, match="plain format"):
        _reference(tokenizers["bos"], "plain", [{"from": "human", "value": "x"}, ROUND_1[1]], ())


def test_reference_masking_needs_a_template_with_an_original(tokenizers):
    for name in ("llava_llama_2", "chatml_direct", "llava_v0"):
        with pytest.raises(ValueError, match="use masking='clean'"):
            _transform(tokenizers["bos"], name, "reference")
    assert masking.reference_style(get_template("v1")) == "v1"
    assert masking.reference_style(get_template("qwen_2")) == "qwen"


def test_reference_mask_takes_one_id_per_placeholder(tokenizers):
    # masking.reference_mask on its own: ids before image expansion, the image one id.
    messages = [
        {"role": "system", "content": "Hi."},
        {"role": "user", "content": "and\n<image>"},
        {"role": "assistant", "content": "5"},
    ]
    rows = [
        ("<|im_start|>", 152, 1), ("s", 24, 0), ("y", 30, 0), ("s", 24, 0), ("t", 25, 0),
        ("e", 10, 0), ("m", 18, 0), ("\n", 5, 1), ("H", 39, 0), ("i", 14, 0), (".", 81, 0),
        ("<|im_end|>", 153, 1), ("\n", 5, 1),
        ("<|im_start|>", 152, 1), ("u", 26, 0), ("s", 24, 0), ("er", 105, 0), ("\n", 5, 1),
        ("<image>", 150, 0), ("\n", 5, 1), ("an", 106, 0), ("d", 9, 0), ("<|im_end|>", 153, 1),
        ("\n", 5, 1),
        ("<|im_start|>", 152, 1), ("a", 6, 1), ("s", 24, 1), ("s", 24, 1), ("is", 111, 1),
        ("t", 25, 1), ("an", 106, 1), ("t", 25, 1), ("\n", 5, 1), ("5", 63, 1),
        ("<|im_end|>", 153, 1), ("\n", 5, 1),
    ]  # fmt: skip
    tokenizer = tokenizers["no_bos"]
    tokens, ids, want = (list(col) for col in zip(*rows, strict=True))
    assert tokenizer.convert_ids_to_tokens(ids) == tokens
    template = get_template("qwen_1_5")
    got = masking.reference_mask(template, messages, np.array(ids), tokenizer, {"image": "<image>"})
    np.testing.assert_array_equal(got, np.array(want, bool))
    with pytest.raises(SkipSample, match="tokenization mismatch"):  # one id short
        masking.reference_mask(
            template, messages, np.array(ids[:-1]), tokenizer, {"image": "<image>"}
        )


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1"])
def test_v1_reference_agrees_with_clean_on_the_default_system_prompt(template, tokenizers):
    # Three rounds under the long default system message: no mismatch, the same mask.
    conversation = [*ROUND_1, *ROUND_2, {"from": "human", "value": "Why?"},
                    {"from": "gpt", "value": "Because it purrs."}]  # fmt: skip
    record = RawRecord("d", conversation, images=(JPEG,))
    clean = _transform(tokenizers["bos"], template, "clean")(record)
    reference = _transform(tokenizers["bos"], template, "reference")(record)
    np.testing.assert_array_equal(reference.input_ids, clean.input_ids)
    np.testing.assert_array_equal(reference.trained, clean.trained)
    # "▁A ▁cat </s>", "▁ 5 </s>", then the last reply: its tokens and "</s>" (BOS counts as one)
    assert clean.trained.sum() == 3 + 3 + len(tokenizers["bos"]("Because it purrs.").input_ids)
