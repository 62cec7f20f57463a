"""Original-repository configs (config.json with `mm_*` fields): the released ones read with
the original's geometry (pinpoints as width x height, unpad sizes rounded with int(x)), and
every field that would change the network but is not understood refused by name, in one line.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import hf_tiny
import numpy as np
import pytest
from convert_original_helpers import one_line_error
from PIL import Image

from llava_jax.config import Convention, Family, LlavaConfig
from llava_jax.conversion.hf_config import ConfigError
from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
from llava_jax.conversion.original_config import from_original_config, grid_pinpoints
from llava_jax.inference.pipeline import Pipeline
from llava_jax.media import anyres
from llava_jax.media.feature_plan import Media, num_tokens

# The released configs' fields (liuhaotian/llava-v1.6-vicuna-7b and
# lmms-lab/llava-onevision-qwen2-7b-ov config.json on the Hugging Face hub).
NEXT_7B = {
    "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "freeze_mm_mlp_adapter": False, "freeze_mm_vision_resampler": False, "hidden_act": "silu",
    "hidden_size": 4096, "image_aspect_ratio": "anyres", "image_crop_resolution": 224,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_split_resolution": 224, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "mm_hidden_size": 1024,
    "mm_patch_merge_type": "spatial_unpad", "mm_projector_lr": None,
    "mm_projector_type": "mlp2x_gelu", "mm_resampler_type": None,
    "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_tower_lr": 2e-06,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "tokenizer_model_max_length": 4096,
    "tokenizer_padding_side": "right", "torch_dtype": "bfloat16",
    "transformers_version": "4.36.2", "tune_mm_mlp_adapter": False,
    "tune_mm_vision_resampler": False, "unfreeze_mm_vision_tower": True, "use_cache": True,
    "use_mm_proj": True, "vocab_size": 32000,
}  # fmt: skip
OV_7B = {
    "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava",
    "mm_newline_position": "one_token", "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
    "image_token_index": 151646, "image_aspect_ratio": "anyres_max_9",
    "image_crop_resolution": None, "image_grid_pinpoints": "(1x1),...,(6x6)",
    "image_split_resolution": None, "intermediate_size": 18944, "max_position_embeddings": 32768,
    "max_window_layers": 28, "mm_hidden_size": 1152, "mm_patch_merge_type": "spatial_unpad",
    "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu", "mm_resampler_type": None,
    "mm_spatial_pool_mode": "bilinear",
    "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
    "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_vision_tower_lr": 2e-06,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "pos_skipping_range": 4096, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "tokenizer_model_max_length": 32768, "tokenizer_padding_side": "right",
    "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0", "use_cache": True,
    "use_mm_proj": True, "use_pos_skipping": False, "use_sliding_window": False,
    "vision_tower_pretrained": None, "vocab_size": 152064,
}  # fmt: skip

# -- the original geometry ----------------------------------------------------------------


def test_released_next_config_gets_the_original_token_counts():
    """Pinpoints read as (width, height) and unpad sizes rounded with int(x): the counts of
    the original code, where transformers' reading of the same list differs."""
    orig = from_original_config(NEXT_7B, None, image_token_id=32000)
    hf = LlavaConfig.llava_next_vicuna_7b()
    assert orig.image_grid_pinpoints == ((672, 336), (336, 672), (672, 672), (336, 1008),
                                         (1008, 336))  # fmt: skip
    # A 13x7 (width x height) image: the tie between the first two canvases goes the other way.
    assert num_tokens(orig, Media.image(7, 13)) == 876
    assert num_tokens(hf, Media.image(7, 13)) == 1656
    # 47x1128: the unpadded width int(47 * 48 / 1128) = 1 against round()'s 2.
    assert num_tokens(orig, Media.image(1128, 47)) == 792
    assert num_tokens(hf, Media.image(1128, 47)) == 936


def test_released_llava15_config():
    """liuhaotian/llava-v1.5-7b's config.json (hub): no merge type (flat), pad."""
    raw = {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5", "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1, "eos_token_id": 2, "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu", "hidden_size": 4096, "image_aspect_ratio": "pad",
        "initializer_range": 0.02, "intermediate_size": 11008, "max_length": 4096,
        "max_position_embeddings": 4096, "mm_hidden_size": 1024,
        "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "model_type": "llava", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 32, "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.31.0", "tune_mm_mlp_adapter": False, "use_cache": True,
        "use_mm_proj": True, "vocab_size": 32000,
    }  # fmt: skip
    cfg = from_original_config(raw, None, image_token_id=32000)
    preset = LlavaConfig.llava15_7b()
    text = dataclasses.replace(preset.text, vocab_size=32000, pad_token_id=0)
    want = preset.replace(text=text, convention=Convention.ORIGINAL)
    assert cfg.replace(hf_extra="{}") == want


def test_released_onevision_config():
    ov = from_original_config(OV_7B, None, image_token_id=151646, video_token_id=151647)
    assert ov.family == Family.LLAVA_ONEVISION and ov.vision_aspect_ratio == "anyres_max_9"
    # The SigLIP tower as LLaVA-NeXT runs it: 26 of 27 layers, the last one's every token.
    assert ov.vision.num_hidden_layers == 26
    assert (ov.vision_feature_layer, ov.vision_feature_select_strategy) == (-1, "full")
    assert ov.tokens_per_view == 729 and len(ov.image_grid_pinpoints) == 36
    assert ov.text.sliding_window is None and ov.text.vocab_size == 152064


def test_grid_pinpoints_forms():
    """The "(1x1),...,(6x6)" range (width-major, as the original builds it), a list and the
    list as a string, each (width, height) -> (height, width)."""
    grid = grid_pinpoints("(1x1),...,(2x3)", 384)
    assert grid == ((384, 384), (768, 384), (1152, 384), (384, 768), (768, 768), (1152, 768))
    assert grid_pinpoints([[336, 672], [1008, 336]], 336) == ((672, 336), (336, 1008))
    assert grid_pinpoints("[[336, 672], [1008, 336]]", 336) == ((672, 336), (336, 1008))


def test_pipeline_uses_the_original_geometry(converted, tmp_path):
    """The HF tiny NeXT pinpoint list written verbatim in an original config is read as
    (width, height): a 13x7 image then gets the original's canvas, views and token count."""
    c = converted("next_vicuna")
    src = tmp_path / "orig"
    shutil.copytree(c.src, src)
    raw = json.loads((src / "config.json").read_text())
    raw["image_grid_pinpoints"] = hf_tiny.NEXT_PINPOINTS  # [[42, 84], [84, 42], ...]
    (src / "config.json").write_text(json.dumps(raw))
    convert_hf_to_jax(src, tmp_path / "jax", vision_dir=c.vision, conv_mode="vicuna_v1")
    pipe = Pipeline.load(tmp_path / "jax", echo=lambda _: None)

    hw = (7, 13)
    flipped = [(w, h) for h, w in hf_tiny.NEXT_PINPOINTS]
    want = anyres.anyres_layout(hw, flipped, hf_tiny.CROP, 3, rounding="int")
    hf = anyres.anyres_layout(hw, hf_tiny.NEXT_PINPOINTS, hf_tiny.CROP, 3)
    assert (want.grid, hf.grid) == ((2, 1), (1, 2))  # the tie goes the other way
    image = Image.fromarray(np.zeros((*hw, 3), np.uint8))
    prompt = pipe.prompt([{"role": "user", "content": "<image>\nWhat?"}], [image])
    assert len(prompt.views) == 1 + 2 * 1
    assert int((prompt.input_ids == pipe.cfg.image_token_id).sum()) == want.num_tokens
    assert want.num_tokens != hf.num_tokens


# -- refusals: config fields not understood ---------------------------------------------------


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("mm_projector_type", "mlp3x_gelu", r"config\.mm_projector_type='mlp3x_gelu'"),
        ("mm_patch_merge_type", "spatial", r"config\.mm_patch_merge_type='spatial'"),
        ("image_aspect_ratio", "crop_split", r"image_aspect_ratio='crop_split'"),
        ("mm_use_im_start_end", True, r"config\.mm_use_im_start_end=True"),
        ("mm_hidden_size", 1152, r"config\.mm_hidden_size=1152.*1024"),
        ("mm_vision_select_feature", "cls", r"config\.mm_vision_select_feature='cls'"),
        ("mm_resampler_type", "perceiver", r"config\.mm_resampler_type='perceiver'"),
        ("mm_something_new", 1, r"config\.mm_something_new=1: not understood"),
        ("image_grid_pinpoints", "garbage", r"config\.image_grid_pinpoints='garbage'"),
        ("image_grid_pinpoints", [[336, 0]], r"config\.image_grid_pinpoints=\[\[336, 0\]\]"),
        ("mm_vision_tower", "facebook/dino", r"config\.mm_vision_tower='facebook/dino'"),
        ("rope_scaling", {"type": "linear", "factor": 2.0}, r"config\.rope_scaling="),
        ("s2_scales", "336,672", r"config\.s2_scales='336,672' is not understood"),
    ],
)
def test_bad_config_is_refused_by_name(field, value, match):
    raw = {**NEXT_7B, field: value}
    one_line_error(ConfigError, match, from_original_config, raw, None, 32000)


@pytest.mark.parametrize(
    "field, value",
    [("mm_newline_position", "grid"), ("mm_spatial_pool_mode", "average"),
     ("mm_spatial_pool_stride", 3), ("add_faster_video", True)],
)  # fmt: skip
def test_video_layout_is_checked_for_onevision_only(field, value):
    """Video pooling and newlines shape OneVision's video tokens; NeXT takes no video here."""
    match = rf"config\.{field}={value!r}: video|config\.{field}=True: the faster"
    one_line_error(ConfigError, match, from_original_config, {**OV_7B, field: value}, None,
                   151646, 151647)  # fmt: skip
    from_original_config({**NEXT_7B, field: value}, None, 32000)


def test_unknown_tower_needs_vision_dir():
    raw = {**NEXT_7B, "mm_vision_tower": "openai/clip-vit-base-patch16"}
    one_line_error(ConfigError, "pass its Hugging Face directory with --vision DIR",
                   from_original_config, raw, None, 32000)  # fmt: skip


def test_image_token_index_must_match_the_tokenizer():
    match = r"config\.image_token_index=151646: the tokenizer's <image> token is 7"
    one_line_error(ConfigError, match, from_original_config, OV_7B, None, 7, 8)
