"""Checkpoints of the original repositories (haotian-liu/LLaVA, LLaVA-VL/LLaVA-NeXT) in.

Each fixture takes a tiny random transformers model (tests/hf_tiny.py) and writes its weights
in the original layout (`model.layers.*`, `model.mm_projector.0/2`,
`model.vision_tower.vision_tower.vision_model.*`, `model.image_newline`) with an original
config (`LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM` / `LlavaQwenForCausalLM`, the LLM's
fields at the top level plus `mm_*`); LLaVA-1.5's tower is left out and given by `--vision`,
as the original does not save its frozen tower. The converted model must hold the same
parameters as the HF route, generate the same tokens, and run with the original's geometry
and `tokenizer_image_token` ids.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import hf_tiny
import numpy as np
import pytest
import torch
from PIL import Image

from llava_jax.checks.tiny_tokenizer import build_tiny_tokenizer
from llava_jax.cli.main import main
from llava_jax.config import Convention, Family, LlavaConfig
from llava_jax.conversion.hf_config import ConfigError
from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
from llava_jax.conversion.original_config import from_original_config, grid_pinpoints
from llava_jax.conversion.original_to_jax import add_media_tokens
from llava_jax.conversion.source import load_model
from llava_jax.conversion.tensor_io import CheckpointWriter
from llava_jax.data import templates
from llava_jax.data.masking import tokenizer_image_token
from llava_jax.data.prompt import media_tokens
from llava_jax.errors import CheckpointError
from llava_jax.inference.generator import Generator, SamplingConfig
from llava_jax.inference.pipeline import Pipeline
from llava_jax.media import anyres
from llava_jax.media.feature_plan import Media, num_tokens
from llava_jax.model_io import load_params

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

# family -> (tiny HF model, original architecture, conversation mode)
CASES = {
    "llava15": (hf_tiny.llava, "LlavaLlamaForCausalLM", "vicuna_v1"),
    "next_vicuna": (hf_tiny.llava_next, "LlavaLlamaForCausalLM", "vicuna_v1"),
    "next_mistral": (
        lambda: hf_tiny.llava_next(kv_heads=1, text_kind="mistral", sliding_window=8),
        "LlavaMistralForCausalLM",
        "mistral_instruct",
    ),
    "onevision": (hf_tiny.llava_onevision, "LlavaQwenForCausalLM", "qwen_1_5"),
}


def original_key(key: str) -> str:
    """transformers-5 module path -> the original repositories' state-dict key."""
    for old, new in [
        ("model.language_model.", "model."),
        ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
        ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ]:
        if key.startswith(old):
            return new + key[len(old) :]
    assert key in ("lm_head.weight", "model.image_newline"), key
    return key


def original_config(model, arch: str) -> dict:
    """The config.json the original code writes for `model`: LLM fields plus mm_* ones."""
    cfg = model.config
    text = cfg.text_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        text.pop(key, None)
    tower = "google/siglip-tiny" if arch == "LlavaQwenForCausalLM" else "openai/clip-vit-tiny"
    raw = {
        **text,
        "architectures": [arch],
        "model_type": "llava",
        "mm_vision_tower": tower,
        "mm_hidden_size": cfg.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tokenizer_model_max_length": 256,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
    }
    if cfg.model_type == "llava":
        raw.update(mm_patch_merge_type="flat", image_aspect_ratio="pad")
    elif cfg.model_type == "llava_next":
        # The original reads (width, height): the HF (height, width) list transposed.
        pinpoints = [[w, h] for h, w in cfg.image_grid_pinpoints]
        raw.update(mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
                   image_grid_pinpoints=pinpoints, unfreeze_mm_vision_tower=True)  # fmt: skip
    else:
        raw.update(mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres_max_9",
                   image_grid_pinpoints="(1x1),...,(6x6)", mm_newline_position="one_token",
                   mm_spatial_pool_mode="bilinear", image_token_index=hf_tiny.IMAGE_TOKEN,
                   mm_tunable_parts="mm_vision_tower,mm_mlp_adapter,mm_language_model")  # fmt: skip
    return raw


def write_original(model, arch: str, root: Path, pickle: bool = False) -> tuple[Path, Path]:
    """(checkpoint dir, vision tower dir) in the original layout."""
    src, vision = root / "orig", root / "tower"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(original_config(model, arch)))
    build_tiny_tokenizer().save_pretrained(src)
    tied = model.config.tie_word_embeddings
    tensors = {
        original_key(k): v.detach().numpy()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
    if model.config.model_type == "llava":  # LLaVA-1.5 does not save its frozen tower
        tensors = {k: v for k, v in tensors.items() if ".vision_tower." not in k}
        model.model.vision_tower.save_pretrained(vision)
    elif model.config.model_type == "llava_next":
        hf_tiny.clip_config().save_pretrained(vision)
    else:  # the hub SigLIP has one layer more, which LLaVA-NeXT deletes
        config = hf_tiny.siglip_config()
        config.num_hidden_layers += 1
        config.save_pretrained(vision)
    if pickle:
        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, src / "pytorch_model.bin")
    else:
        with CheckpointWriter(src, max_shard_size=30_000) as writer:  # sharded, as released
            for key, value in tensors.items():
                writer.add(key, value)
    return src, vision


class Converted:
    def __init__(self, name: str, root: Path):
        build, arch, self.conv_mode = CASES[name]
        self.model = build()
        self.model.save_pretrained(root / "hf")
        build_tiny_tokenizer().save_pretrained(root / "hf")
        convert_hf_to_jax(root / "hf", root / "hf_jax")
        self.src, self.vision = write_original(self.model, arch, root)
        self.jax = root / "orig_jax"
        convert_hf_to_jax(self.src, self.jax, vision_dir=self.vision, conv_mode=self.conv_mode)
        self.hf_jax = root / "hf_jax"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    built: dict[str, Converted] = {}

    def get(name: str) -> Converted:
        if name not in built:
            built[name] = Converted(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


def one_line_error(exc, match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value), f"error is not one line: {info.value}"
    return str(info.value)


# -- conversion and generation ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_same_parameters_as_the_hf_route(converted, name):
    c = converted(name)
    got, want = load_params(c.jax), load_params(c.hf_jax)
    assert sorted(got) == sorted(want)
    for path in want:
        assert np.asarray(got[path]).tobytes() == np.asarray(want[path]).tobytes(), path


@pytest.mark.parametrize("name", list(CASES))
def test_config_keeps_the_original_conventions(converted, name):
    c = converted(name)
    orig, hf = load_model(c.jax).cfg, load_model(c.hf_jax).cfg
    assert orig.convention == Convention.ORIGINAL and hf.convention == Convention.TRANSFORMERS
    # Everything else that shapes the network or the token layout agrees with the HF route.
    fields = ("family", "vision", "text", "projector", "vision_feature_layer",
              "vision_feature_select_strategy", "image_token_id", "video_token_id")  # fmt: skip
    for field in fields:
        assert getattr(orig, field) == getattr(hf, field), field
    if hf.image_grid_pinpoints is not None:  # the "(1x1),...,(6x6)" grid lists (w, h) first
        assert set(orig.image_grid_pinpoints) == set(hf.image_grid_pinpoints)
    assets = c.jax / "assets"
    assert json.loads((assets / "llava_template.json").read_text()) == {"template": c.conv_mode}
    assert json.loads((assets / "original_config.json").read_text()) == json.loads(
        (c.src / "config.json").read_text()
    )


# Mistral's generation differs from Vicuna's only in the decoder, which test_generate covers.
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "next_mistral" else n for n in CASES],
)
def test_generates_like_the_hf_route(converted, name):
    """The converted pipeline tokenizes as `tokenizer_image_token`; on the same prompt both
    models generate the same tokens."""
    c = converted(name)
    pipe = Pipeline.load(c.jax, echo=lambda _: None)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (84, 84, 3), np.uint8))
    messages = [{"role": "user", "content": "<image>\nWhat is the cat?"}]
    prompt = pipe.prompt(messages, [image])

    rendered = templates.render(pipe.template, messages, add_generation_prompt=True)
    chunked = tokenizer_image_token(
        rendered, pipe.tokenizer, media_tokens(pipe.tokenizer, pipe.cfg)
    )
    assert chunked != pipe.tokenizer.encode(rendered)  # the chunks' "▁" after <image>
    n = num_tokens(pipe.cfg, Media.image(84, 84))
    image_id = pipe.cfg.image_token_id
    want = []
    for token in chunked:
        want += [image_id] * n if token == image_id else [token]
    assert prompt.input_ids.tolist() == want

    sampling = SamplingConfig(max_new_tokens=8, stop_token_ids=(2,))
    ours = pipe.generator.generate([prompt], sampling)[0].token_ids
    reference = Generator(load_model(c.hf_jax)).generate([prompt], sampling)[0].token_ids
    assert ours == reference and len(ours) > 0


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


# -- refusals ---------------------------------------------------------------------------------


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


def test_llava15_without_its_tower_asks_for_vision(converted, tmp_path):
    c = converted("llava15")
    src = tmp_path / "orig"
    shutil.copytree(c.src, src)
    raw = json.loads((src / "config.json").read_text())
    # A known tower needs no --vision for its config, only for its weights.
    raw.update(mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=1024)
    (src / "config.json").write_text(json.dumps(raw))
    message = one_line_error(CheckpointError, "pass --vision DIR with openai/clip-vit-large",
                             convert_hf_to_jax, src, tmp_path / "out",
                             conv_mode="vicuna_v1")  # fmt: skip
    assert "holds no vision tower" in message
    assert not (tmp_path / "out").exists()


def test_conv_mode_is_needed_without_a_chat_template(converted, tmp_path):
    c = converted("llava15")
    one_line_error(CheckpointError, "--conv-mode", convert_hf_to_jax, c.src, tmp_path / "out",
                   vision_dir=c.vision)  # fmt: skip
    one_line_error(ValueError, "nope", convert_hf_to_jax, c.src, tmp_path / "out",
                   vision_dir=c.vision, conv_mode="nope")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_hf_directory_refuses_original_only_flags(converted, tmp_path):
    c = converted("llava15")
    one_line_error(CheckpointError, "--vision is for checkpoints of the original",
                   convert_hf_to_jax, c.hf_jax.parent / "hf", tmp_path / "out",
                   vision_dir=c.vision)  # fmt: skip


def test_in_memory_load_says_to_convert(converted):
    c = converted("llava15")
    one_line_error(ConfigError, "convert it once with `llava-jax convert hf-to-jax`",
                   Pipeline.load, c.src, echo=lambda _: None)  # fmt: skip


def test_pickled_bin_needs_allow_pickle(tmp_path):
    model = hf_tiny.llava_next()
    src, vision = write_original(model, "LlavaLlamaForCausalLM", tmp_path, pickle=True)
    one_line_error(CheckpointError, "--allow-pickle", convert_hf_to_jax, src, tmp_path / "no",
                   vision_dir=vision, conv_mode="vicuna_v1")  # fmt: skip
    assert not (tmp_path / "no").exists()
    cfg = convert_hf_to_jax(src, tmp_path / "jax", allow_pickle=True, vision_dir=vision,
                            conv_mode="vicuna_v1")  # fmt: skip
    assert cfg.convention == Convention.ORIGINAL and cfg.family == Family.LLAVA_NEXT


def test_missing_image_token_is_added_after_the_vocabulary(tmp_path):
    """The original tokenizers have no <image> (the code splices -200 into the ids)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate("abc")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    assert add_media_tokens(tokenizer, Family.LLAVA_ONEVISION) == (6, 7)
    assert tokenizer.convert_ids_to_tokens([6, 7]) == ["<image>", "<video>"]
    assert add_media_tokens(tokenizer, Family.LLAVA) == (6, None)  # found, not added twice


def test_image_token_after_the_vocabulary(converted):
    """LLaVA-1.5's `<image>` is added at id 32000, one past its 32000 embeddings: the id is
    never embedded (its features replace it), so the model generates as with an in-vocab id."""
    c = converted("llava15")
    pipe = Pipeline.load(c.jax, echo=lambda _: None)
    image = Image.fromarray(np.random.RandomState(1).randint(0, 255, (42, 42, 3), np.uint8))
    prompt = pipe.prompt([{"role": "user", "content": "<image>\nWhat?"}], [image])
    vocab = pipe.cfg.text.vocab_size
    moved = load_model(c.jax, image_token_id=vocab)
    ids = np.where(prompt.input_ids == pipe.cfg.image_token_id, vocab, prompt.input_ids)
    sampling = SamplingConfig(max_new_tokens=6, stop_token_ids=(2,))
    want = pipe.generator.generate([prompt], sampling)[0].token_ids
    got = Generator(moved).generate([dataclasses.replace(prompt, input_ids=ids)], sampling)
    assert got[0].token_ids == want


def test_cli(converted, tmp_path, capsys):
    """`convert hf-to-jax --vision --conv-mode`, then `jax-to-hf` saying what transformers
    will not reproduce."""
    c = converted("llava15")
    out = tmp_path / "jax"
    code = main(["convert", "hf-to-jax", "--hf", str(c.src), "--vision", str(c.vision),
                 "--conv-mode", "vicuna_v1", "--out", str(out)])  # fmt: skip
    assert code == 0 and "llava:" in capsys.readouterr().out
    assert load_model(out).cfg.convention == Convention.ORIGINAL
    assert main(["convert", "jax-to-hf", "--ckpt", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert "original-repository checkpoint" in capsys.readouterr().err
    code = main(["convert", "hf-to-jax", "--hf", str(c.src), "--vision", str(tmp_path / "none"),
                 "--out", str(tmp_path / "x")])  # fmt: skip
    assert code != 0 and "--vision" in capsys.readouterr().err


def test_siglip_tower_from_vision_dir(converted, tmp_path):
    """A OneVision checkpoint without its tower takes it from --vision as LLaVA-NeXT loads it:
    the hub model's last layer and pooling head are not read."""
    import transformers

    c = converted("onevision")
    tower = c.model.model.vision_tower
    config = transformers.SiglipVisionConfig(**{**tower.config.to_dict(), "vision_use_head": True})
    config.num_hidden_layers += 1
    hub = transformers.SiglipVisionModel(config)
    missing = hub.load_state_dict(tower.state_dict(), strict=False).missing_keys
    assert missing and all(re.search(r"(^|\.)(layers\.3|head)\.", k) for k in missing), missing
    hub.save_pretrained(tmp_path / "tower")

    src = tmp_path / "orig"
    src.mkdir()
    for path in c.src.iterdir():  # config and tokenizer
        if ".safetensors" not in path.name:
            shutil.copy2(path, src / path.name)
    with CheckpointWriter(src) as writer:
        for key, value in c.model.state_dict().items():
            if ".vision_tower." not in key and key != "lm_head.weight":  # tied
                writer.add(original_key(key), value.detach().numpy())
    convert_hf_to_jax(src, tmp_path / "jax", vision_dir=tmp_path / "tower", conv_mode="qwen_1_5")
    got, want = load_params(tmp_path / "jax"), load_params(c.hf_jax)
    assert sorted(got) == sorted(want)
    for path in want:
        assert np.asarray(got[path]).tobytes() == np.asarray(want[path]).tobytes(), path


def test_training_needs_the_original_prompt_ids(converted):
    """Clean masking would train a converted original model on ids it is never run with."""
    from llava_jax.data.transforms import SampleTransform

    c = converted("llava15")
    pipe = Pipeline.load(c.jax, echo=lambda _: None)
    args = (pipe.cfg, pipe.image_config, pipe.tokenizer, "vicuna_v1")
    one_line_error(ValueError, "train it with masking='reference'", SampleTransform, *args,
                   max_len=64, max_views=1)  # fmt: skip
    SampleTransform(*args, max_len=64, max_views=1, masking="reference")
