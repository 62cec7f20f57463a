"""Token ids and label masks of `plain`, `vicuna_v1` and `qwen_1_5` conversations.

Clean mode: against rows derived by hand from the template text and the tiny tokenizer's BPE
(`llava_jax/checks/tiny_tokenizer.py`: Metaspace with a "▁" prepended to the start of the text only,
merges applied lowest rank first), not by running the code under test. Each row is
(token, id, trained).

Reference mode: against the ids and labels of the original code itself, pinned in `ORIGINAL`.
The tiny LLaVA-1.5 config has 3 x 3 patches per view without CLS: 9 image tokens.
"""

import io

import numpy as np
import pytest
from PIL import Image

from llava_jax.checks.tiny_tokenizer import build_tiny_bytelevel_tokenizer, build_tiny_tokenizer
from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.data import masking
from llava_jax.data.schema import RawRecord, SkipSample
from llava_jax.data.templates import get_template
from llava_jax.data.transforms import SampleTransform
from llava_jax.media.processor_config import ImageProcessorConfig

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


def img():
    return [("<image>", 150, 0)] * 9


ASSISTANT = [("▁A", 120, 0), ("S", 50, 0), ("SI", 139, 0), ("ST", 140, 0),
             ("ANT", 142, 0), (":", 83, 0)]  # fmt: skip

# "<image>" + "A cat" + "\n": BOS and image ignored, the caption and "\n" trained.
PLAIN = [("<s>", 1, 0), *img(), ("A", 32, 1), ("▁cat", 116, 1), ("\n", 5, 1)]

# "Hi. USER: <image>\nWhat is it? ASSISTANT: A cat</s>"
VICUNA_1 = [
    ("<s>", 1, 0),
    ("▁", 4, 0), ("H", 39, 0), ("i", 14, 0), (".", 81, 0),
    ("▁", 4, 0), ("USER", 137, 0), (":", 83, 0), ("▁", 4, 0),
    *img(),
    ("\n", 5, 0), ("W", 54, 0), ("h", 13, 0), ("at", 108, 0),
    ("▁", 4, 0), ("is", 111, 0), ("▁i", 112, 0), ("t", 25, 0), ("?", 88, 0),
    *ASSISTANT,
    ("▁A", 120, 1), ("▁cat", 116, 1), ("</s>", 2, 1),
]  # fmt: skip
# + "USER: and ASSISTANT: 5</s>": no "▁" after "</s>"; "▁" before "5" is its own token.
VICUNA_2 = [
    *VICUNA_1,
    ("USER", 137, 0), (":", 83, 0), ("▁and", 134, 0),
    *ASSISTANT,
    ("▁", 4, 1), ("5", 63, 1), ("</s>", 2, 1),
]  # fmt: skip

# ChatML, no BOS.
QWEN_1 = [
    ("<|im_start|>", 152, 0),
    ("s", 24, 0), ("y", 30, 0), ("s", 24, 0), ("t", 25, 0), ("e", 10, 0),
    ("m", 18, 0), ("\n", 5, 0), ("H", 39, 0), ("i", 14, 0), (".", 81, 0),
    ("<|im_end|>", 153, 0), ("\n", 5, 0),
    ("<|im_start|>", 152, 0), ("u", 26, 0), ("s", 24, 0), ("er", 105, 0),
    ("\n", 5, 0),
    *img(),
    ("\n", 5, 0), ("W", 54, 0), ("h", 13, 0), ("at", 108, 0),
    ("▁", 4, 0), ("is", 111, 0), ("▁i", 112, 0), ("t", 25, 0), ("?", 88, 0),
    ("<|im_end|>", 153, 0), ("\n", 5, 0),
    ("<|im_start|>", 152, 0), ("a", 6, 0), ("s", 24, 0), ("s", 24, 0),
    ("is", 111, 0), ("t", 25, 0), ("an", 106, 0), ("t", 25, 0), ("\n", 5, 0),
    ("A", 32, 1), ("▁cat", 116, 1), ("<|im_end|>", 153, 1), ("\n", 5, 0),
]  # fmt: skip
QWEN_2 = [
    *QWEN_1,
    ("<|im_start|>", 152, 0), ("u", 26, 0), ("s", 24, 0), ("er", 105, 0),
    ("\n", 5, 0), ("an", 106, 0), ("d", 9, 0), ("<|im_end|>", 153, 0),
    ("\n", 5, 0),
    ("<|im_start|>", 152, 0), ("a", 6, 0), ("s", 24, 0), ("s", 24, 0),
    ("is", 111, 0), ("t", 25, 0), ("an", 106, 0), ("t", 25, 0), ("\n", 5, 0),
    ("5", 63, 1), ("<|im_end|>", 153, 1), ("\n", 5, 0),
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
    return {
        "bos": build_tiny_tokenizer(),
        "no_bos": build_tiny_tokenizer(add_bos=False),
        "bpe": build_tiny_bytelevel_tokenizer(),
    }


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


@pytest.mark.parametrize("case", list(CASES))
def test_clean_ids_and_masks_are_the_hand_derived_ones(case, tokenizers):
    template, conversation, rows = CASES[case]
    tokenizer = _tokenizer_for(template, tokenizers)
    example = _transform(tokenizer, template, "clean")(
        RawRecord(case, conversation, images=(JPEG,))
    )
    tokens, ids, trained = (list(col) for col in zip(*rows, strict=True))
    want = np.array(trained, bool)
    # The table's tokens and ids agree with the vocabulary (a check on the table itself).
    assert tokenizer.convert_ids_to_tokens(ids) == tokens
    np.testing.assert_array_equal(example.input_ids, np.array(ids, np.int32))
    assert example.input_ids.dtype == np.int32 and example.trained.dtype == bool
    assert np.array_equal(example.trained, want), _describe(
        tokenizer, example.input_ids, example.trained, want
    )


# -- reference mode: the original code's own output -------------------------------------------

# The ids and labels of the original code, run on the tiny tokenizers: haotian-liu/LLaVA
# (c121f04) `llava/train/train.py::preprocess_plain`, `preprocess_v1`, `preprocess_llama_2`,
# `preprocess_mpt` with `llava/mm_utils.py::tokenizer_image_token`, LLaVA-VL/LLaVA-NeXT
# (df17966) `preprocess_qwen`; then `DataCollatorForSupervisedDataset`'s and
# `prepare_inputs_labels_for_multimodal`'s cuts at `model_max_length`, 9 features per image.
# Adapted only where it cannot run as is: `conv.system` / `system_message` set to "Hi." (the
# originals cannot read a system turn), `tokenizer.legacy` read as False when absent, the
# tokenizer's "\n" id for the hard-coded 198. Labels: `where(trained == "1", ids, -100)`.
IMG = [150] * 9
# fmt: off
ORIGINAL = {
    "plain/bos": (
        [1, *IMG, 120, 116, 5],
        "0000000000111",
    ),
    "plain/bpe": (
        [*IMG, 35, 109, 2],
        "000000000111",
    ),
    "v1_1/bos": (
        [1, 4, 39, 14, 81, 4, 137, 83, 4, *IMG, 4, 5, 54, 13, 108, 4, 111, 112, 25, 88, 120, 50,
         139, 140, 142, 83, 120, 116, 2],
        "0000000000000000000000000000000000111",
    ),
    "v1_2/bos": (
        [1, 4, 39, 14, 81, 4, 137, 83, 4, *IMG, 4, 5, 54, 13, 108, 4, 111, 112, 25, 88, 120, 50,
         139, 140, 142, 83, 120, 116, 2, 137, 83, 134, 120, 50, 139, 140, 142, 83, 4, 63, 2],
        "0000000000000000000000000000000000111000000000111",
    ),
    "v1_2/bos/cut47": (
        [1, 4, 39, 14, 81, 4, 137, 83, 4, *IMG, 4, 5, 54, 13, 108, 4, 111, 112, 25, 88, 120, 50,
         139, 140, 142, 83, 120, 116, 2, 137, 83, 134, 120, 50, 139, 140, 142, 83, 4],
        "00000000000000000000000000000000001110000000001",
    ),
    "v1_2/bos/legacy/cut42": (
        [1, 4, 39, 14, 81, 4, 137, 83, 4, *IMG, 4, 5, 54, 13, 108, 4, 111, 112, 25, 88, 120, 50,
         139, 140, 142, 83, 120, 116, 2, 137, 83, 134, 120, 50],
        "000000000000000000000000000000000011100000",
    ),
    "qwen_1/no_bos": (
        [152, 24, 30, 24, 25, 10, 18, 5, 39, 14, 81, 153, 5, 152, 26, 24, 105, 5, *IMG, 5, 54,
         13, 108, 4, 111, 112, 25, 88, 153, 5, 152, 6, 24, 24, 111, 25, 106, 25, 5, 32, 116,
         153, 5],
        "100000010001110001000000000100000000111111111111111",
    ),
    "qwen_2/no_bos": (
        [152, 24, 30, 24, 25, 10, 18, 5, 39, 14, 81, 153, 5, 152, 26, 24, 105, 5, *IMG, 5, 54,
         13, 108, 4, 111, 112, 25, 88, 153, 5, 152, 6, 24, 24, 111, 25, 106, 25, 5, 32, 116,
         153, 5, 152, 26, 24, 105, 5, 106, 9, 153, 5, 152, 6, 24, 24, 111, 25, 106, 25, 5, 63,
         153, 5],
        "100000010001110001000000000100000000111111111111111100010011111111111111",
    ),
    "qwen_1/bpe": (
        [152, 85, 127, 128, 2, 42, 75, 16, 153, 2, 152, 130, 2, *IMG, 2, 57, 74, 104, 1, 105,
         106, 86, 33, 153, 2, 152, 67, 85, 85, 105, 86, 103, 86, 2, 35, 109, 153, 2],
        "1000100011101000000000100000000111111111111111",
    ),
    "qwen_2/bpe": (
        [152, 85, 127, 128, 2, 42, 75, 16, 153, 2, 152, 130, 2, *IMG, 2, 57, 74, 104, 1, 105,
         106, 86, 33, 153, 2, 152, 67, 85, 85, 105, 86, 103, 86, 2, 35, 109, 153, 2, 152, 130,
         2, 103, 70, 153, 2, 152, 67, 85, 85, 105, 86, 103, 86, 2, 23, 153, 2],
        "10001000111010000000001000000001111111111111111010011111111111111",
    ),
    "qwen_2/bpe/cut60": (
        [152, 85, 127, 128, 2, 42, 75, 16, 153, 2, 152, 130, 2, *IMG, 2, 57, 74, 104, 1, 105,
         106, 86, 33, 153, 2, 152, 67, 85, 85, 105, 86, 103, 86, 2, 35, 109, 153, 2, 152, 130,
         2, 103, 70, 153, 2, 152, 67, 85, 85, 105, 86, 103],
        "100010001110100000000010000000011111111111111110100111111111",
    ),
    "v1_1/bpe": (
        [42, 75, 16, 1, 114, 28, 1, *IMG, 2, 57, 74, 104, 1, 105, 106, 86, 33, 111, 53, 116,
         117, 119, 28, 111, 109, 123, 85, 32],
        "000000000000000000000000000000000000",
    ),
    "v1_2/bpe": (
        [42, 75, 16, 1, 114, 28, 1, *IMG, 2, 57, 74, 104, 1, 105, 106, 86, 33, 111, 53, 116,
         117, 119, 28, 111, 109, 123, 85, 32, 114, 28, 100, 80, 70, 111, 53, 116, 117, 119, 28,
         1, 23, 123, 85, 32],
        "0000000000000000000000000000000000000000000000000000",
    ),
    "v1_trailing/bos": (
        [1, 4, 39, 14, 81, 4, 137, 83, 4, *IMG, 4, 5, 54, 13, 108, 4, 111, 112, 25, 88, 120, 50,
         139, 140, 142, 83, 120, 116, 2, 137, 83, 134, 4],
        "00000000000000000000000000000000000000000",
    ),
    "v1_2/bos/legacy/cut43": (
        [1, 4, 39, 14, 81, 4, 137, 83, 4, *IMG, 4, 5, 54, 13, 108, 4, 111, 112, 25, 88, 120, 50,
         139, 140, 142, 83, 120, 116, 2, 137, 83, 134, 120, 50, 139],
        "0000000000000000000000000000000000000000000",
    ),
    "llama_2_2/bos": (
        [1, 4, 90, 40, 45, 140, 92, 4, 85, 85, 50, 56, 50, 87, 87, 5, 39, 14, 81, 5, 85, 146,
         50, 56, 50, 87, 87, 5, 5, *IMG, 4, 5, 54, 13, 108, 4, 111, 112, 25, 88, 4, 90, 82, 40,
         45, 140, 92, 120, 116, 4, 2, 1, 90, 40, 45, 140, 92, 134, 4, 90, 82, 40, 45, 140, 92,
         4, 63, 4, 2],
        "00000000000000000000000000000000000000000000000000000001111000000000000001111",
    ),
    "mistral_2/no_bos": (
        [4, 90, 40, 45, 140, 92, 4, 85, 85, 50, 56, 50, 87, 87, 5, 39, 14, 81, 5, 85, 146, 50,
         56, 50, 87, 87, 5, 5, *IMG, 4, 5, 54, 13, 108, 4, 111, 112, 25, 88, 4, 90, 82, 40, 45,
         140, 92, 120, 116, 4, 2, 90, 40, 45, 140, 92, 134, 4, 90, 82, 40, 45, 140, 92, 4, 63,
         4, 2],
        "000000000000000000000000000000000000000000000000000000111100000000000001111",
    ),
    "mistral_2/bos": (
        [1, 4, 90, 40, 45, 140, 92, 4, 85, 85, 50, 56, 50, 87, 87, 5, 39, 14, 81, 5, 85, 146,
         50, 56, 50, 87, 87, 5, 5, *IMG, 4, 5, 54, 13, 108, 4, 111, 112, 25, 88, 4, 90, 82, 40,
         45, 140, 92, 120, 116, 4, 2, 90, 40, 45, 140, 92, 134, 4, 90, 82, 40, 45, 140, 92, 4,
         63, 4, 2],
        "0000000000000000000000000000000000000000000000000000000000000000000000000000",
    ),
    "llama_2_1/bpe": (
        [61, 43, 48, 117, 63, 1, 30, 30, 53, 59, 53, 32, 32, 2, 42, 75, 16, 2, 30, 123, 53, 59,
         53, 32, 32, 125, *IMG, 2, 57, 74, 104, 1, 105, 106, 86, 33, 1, 61, 17, 43, 48, 117, 63,
         111, 109, 1, 123, 85, 32],
        "000000000000000000000000000000000000000000000000000000000",
    ),
    "mpt_1/bpe": (
        [152, 85, 127, 128, 2, 42, 75, 16, 153, 152, 130, 2, *IMG, 2, 57, 74, 104, 1, 105, 106,
         86, 33, 153, 152, 67, 85, 85, 105, 86, 103, 86, 2, 35, 109, 153],
        "0000000000000000000000000000000000000000000",
    ),
    "mpt_2/bos/cut60": (
        [1, 152, 24, 30, 24, 25, 10, 18, 5, 39, 14, 81, 153, 152, 26, 24, 105, 5, *IMG, 4, 5,
         54, 13, 108, 4, 111, 112, 25, 88, 153, 152, 6, 24, 24, 111, 25, 106, 25, 5, 32, 116,
         153, 152, 26, 24, 105, 5, 106, 9, 153, 152, 6],
        "000000000000000000000000000000000000000000000011100000000000",
    ),
    "mpt_2/bos/cut61": (
        [1, 152, 24, 30, 24, 25, 10, 18, 5, 39, 14, 81, 153, 152, 26, 24, 105, 5, *IMG, 4, 5,
         54, 13, 108, 4, 111, 112, 25, 88, 153, 152, 6, 24, 24, 111, 25, 106, 25, 5, 32, 116,
         153, 152, 26, 24, 105, 5, 106, 9, 153, 152, 6, 24],
        "0000000000000000000000000000000000000000000000000000000000000",
    ),
}
# fmt: on
ORIGINAL_CASES = {  # name -> (template, conversation, max_len, legacy)
    "plain": ("plain", CASES["plain"][1], 512, False),
    "v1_1": ("vicuna_v1", [SYSTEM, *ROUND_1], 512, False),
    "v1_2": ("vicuna_v1", [SYSTEM, *ROUND_1, *ROUND_2], 512, False),
    "v1_trailing": ("vicuna_v1", [SYSTEM, *ROUND_1, ROUND_2[0]], 512, False),
    "qwen_1": ("qwen_1_5", [SYSTEM, *ROUND_1], 512, False),
    "qwen_2": ("qwen_1_5", [SYSTEM, *ROUND_1, *ROUND_2], 512, False),
    "llama_2_1": ("llava_llama_2", [SYSTEM, *ROUND_1], 512, False),
    "llama_2_2": ("llava_llama_2", [SYSTEM, *ROUND_1, *ROUND_2], 512, False),
    "mistral_2": ("mistral_instruct", [SYSTEM, *ROUND_1, *ROUND_2], 512, False),
    "mpt_1": ("chatml_direct", [SYSTEM, *ROUND_1], 512, False),
    "mpt_2": ("chatml_direct", [SYSTEM, *ROUND_1, *ROUND_2], 512, False),
}


def _original_case(key: str, tokenizers):
    name, tokenizer_name, *options = key.split("/")
    template, conversation, max_len, legacy = ORIGINAL_CASES[name]
    for option in options:
        if option == "legacy":
            legacy = True
        else:
            max_len = int(option.removeprefix("cut"))
    tokenizer = tokenizers[tokenizer_name]
    if legacy:
        tokenizer = build_tiny_tokenizer()
        tokenizer.legacy = True
    transform = _transform(tokenizer, template, "reference", max_len=max_len)
    return tokenizer, transform, RawRecord(key, conversation, images=(JPEG,))


def _trained_of(key: str) -> np.ndarray:
    return np.array([c == "1" for c in ORIGINAL[key][1]])


MISMATCHES = {  # where the original prints WARNING: tokenization mismatch and trains nothing
    "v1_1/bpe": "26 vs. 28",  # preprocess_v1's -2 counts a BOS a byte-level BPE has not
    "v1_2/bpe": "38 vs. 44",
    "v1_trailing/bos": "29 vs. 33",  # a trailing human turn ends the round loop early
    # legacy: no -1 for later rounds. The check runs as the rounds (42) stay under max_len 43;
    # at max_len 42 ("v1_2/bos/legacy/cut42") it is skipped and the labels are kept.
    "v1_2/bos/legacy/cut43": "42 vs. 41",
    "mistral_2/bos": "69 vs. 68",  # preprocess_llama_2 has no -1 for later rounds
    "llama_2_1/bpe": "47 vs. 49",
    # preprocess_mpt's -1 fits none of the tiny tokenizers; a cut at 60 skips the check.
    "mpt_1/bpe": "34 vs. 35",
    "mpt_2/bos/cut61": "60 vs. 61",
}


@pytest.mark.parametrize("key", [k for k in ORIGINAL if k not in MISMATCHES])
def test_reference_ids_and_labels_are_the_originals(key, tokenizers):
    tokenizer, transform, record = _original_case(key, tokenizers)
    ids, trained = np.array(ORIGINAL[key][0], np.int32), _trained_of(key)
    assert len(ids) == len(trained) <= transform.max_len  # a check on the table itself
    example = transform(record)
    np.testing.assert_array_equal(example.input_ids, ids)
    assert np.array_equal(example.trained, trained), _describe(
        tokenizer, example.input_ids, example.trained, trained
    )


@pytest.mark.parametrize("key", list(MISMATCHES))
def test_reference_skips_what_the_original_masks_whole(key, tokenizers):
    assert not _trained_of(key).any()  # the original trains nothing
    _, transform, record = _original_case(key, tokenizers)
    with pytest.raises(SkipSample, match=f"tokenization mismatch: {MISMATCHES[key]}") as e:
        transform(record)
    assert e.value.reason == "no_supervised_tokens" and e.value.record_id == key


def test_reference_departs_from_clean_where_the_original_does(tokenizers):
    clean = {name: np.array([r[1] for r in rows]) for name, (_, _, rows) in CASES.items()}
    # SentencePiece: the text after <image> is its own chunk, so it starts with a "▁".
    after_image = 9 + 9  # BOS, "▁Hi.", "▁USER:▁" (9 tokens), then 9 image tokens
    np.testing.assert_array_equal(
        ORIGINAL["v1_2/bos"][0], np.insert(clean["vicuna_2"], after_image, 4)
    )
    assert ORIGINAL["plain/bos"][0][-3:] == [120, 116, 5] and clean["plain"][-3] == 32  # "▁A"
    # Per-message tokenization changes nothing here; the labels do (chat markup trained).
    np.testing.assert_array_equal(ORIGINAL["qwen_2/no_bos"][0], clean["qwen_2"])
    assert _trained_of("qwen_2/no_bos").sum() > sum(r[2] for r in QWEN_2)
    # The same reply tokens are trained in both modes where the original has no quirk.
    reference_replies = np.array(ORIGINAL["v1_2/bos"][0])[_trained_of("v1_2/bos")]
    np.testing.assert_array_equal(reference_replies, [120, 116, 2, 4, 63, 2])
    assert [r[1] for r in VICUNA_2 if r[2]] == [120, 116, 2, 4, 63, 2]


def test_reference_cuts_at_max_len_where_clean_drops_rounds(tokenizers):
    record = RawRecord("c", [SYSTEM, *ROUND_1, *ROUND_2], images=(JPEG,))
    clean = _transform(tokenizers["bos"], "vicuna_v1", "clean", max_len=47)(record)
    np.testing.assert_array_equal(clean.input_ids, [r[1] for r in VICUNA_1])
    reference = _transform(tokenizers["bos"], "vicuna_v1", "reference", max_len=47)(record)
    assert len(reference.input_ids) == 47 and reference.trained[-1]  # "▁" of the 2nd reply


def test_reference_cut_reaching_media_is_refused(tokenizers):
    # The image fills positions 9-17: the original would train on part of its features.
    transform = _transform(tokenizers["bos"], "vicuna_v1", "reference", max_len=17)
    with pytest.raises(SkipSample, match=r"37 tokens > max_len 17.*would cut media") as e:
        transform(RawRecord("m", [SYSTEM, *ROUND_1], images=(JPEG,)))
    assert e.value.reason == "too_long"
    # A cut right after the image is the original's: no reply is left, so nothing is trained.
    transform = _transform(tokenizers["bos"], "vicuna_v1", "reference", max_len=18)
    with pytest.raises(SkipSample, match="no token of the sample is trained"):
        transform(RawRecord("m", [SYSTEM, *ROUND_1], images=(JPEG,)))


def _reference(tokenizer, template, conversation, images=(JPEG,)):
    transform = _transform(tokenizer, template, "reference")
    return transform(RawRecord("r", conversation, images=images))


def test_v1_clean_trains_the_reply_before_a_trailing_human_turn(tokenizers):
    conversation = [SYSTEM, *ROUND_1, ROUND_2[0]]
    transform = _transform(tokenizers["bos"], "vicuna_v1", "clean")
    example = transform(RawRecord("r", conversation, images=(JPEG,)))
    want = np.zeros(len(example.input_ids), bool)
    want[25 + 8 : 28 + 8] = True  # "▁A ▁cat </s>" of VICUNA_1 (8 more image tokens)
    np.testing.assert_array_equal(example.trained, want)


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
    # preprocess_plain keeps one <image> whatever the turn held: two would misplace features.
    two_images = [{"from": "human", "value": "<image><image>"}, ROUND_1[1]]
    with pytest.raises(SkipSample, match="one placeholder"):
        _reference(tokenizers["bos"], "plain", two_images, (JPEG, JPEG))


def test_reference_masking_needs_a_template_with_an_original(tokenizers):
    # llava_v0's original is the fallback of `preprocess`, whose format is not its template's.
    with pytest.raises(ValueError, match="template 'llava_v0' has no original.*masking='clean'"):
        _transform(tokenizers["bos"], "llava_v0", "reference")
    assert masking.reference_style(get_template("v1")) == "v1"
    assert masking.reference_style(get_template("mistral_instruct")) == "llama_2"
    assert masking.reference_style(get_template("chatml_direct")) == "mpt"
    assert masking.reference_style(get_template("qwen_2")) == "qwen"


def test_tokenizer_image_token_tokenizes_each_chunk_on_its_own(tokenizers):
    tokens = {"image": ("<image>", 150)}
    text = "USER: <image>\nHi"
    # SentencePiece: the chunk after the image starts with "▁"; its BOS is dropped.
    got = masking.tokenizer_image_token(text, tokenizers["bos"], tokens)
    assert tokenizers["bos"].convert_ids_to_tokens(got) == [
        "<s>", "▁", "USER", ":", "▁", "<image>", "▁", "\n", "H", "i"
    ]  # fmt: skip
    # Byte-level BPE has no prefix space and no BOS: the whole prompt's tokens.
    got = masking.tokenizer_image_token(text, tokenizers["bpe"], tokens)
    assert got == tokenizers["bpe"](text).input_ids
