"""`LlavaConfig` <-> HF config.json: presets round-trip, real configs parse, unknowns are refused.

"Real-looking" configs below are written in the style of the llava-hf releases (text_config
lists only the fields that differ from the transformers defaults); each is also checked against
transformers itself: filling the defaults in with `AutoConfig` must not change what we read.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import transformers

from llava_jax.config import (
    NEXT_PINPOINTS,
    ONEVISION_PINPOINTS,
    PRESETS,
    Family,
    FeatureSelect,
    LlavaConfig,
    RematPolicy,
    TextKind,
    VisionKind,
)
from llava_jax.conversion.hf_config import ConfigError, from_hf_config, to_hf_config


def via_transformers(hf: dict) -> dict:
    """`hf` with every default filled in by transformers, as its save_pretrained writes it."""
    hf = copy.deepcopy(hf)
    return transformers.AutoConfig.for_model(hf.pop("model_type"), **hf).to_dict()


def without_extra(cfg: LlavaConfig) -> LlavaConfig:
    return cfg.replace(hf_extra="{}")


# -- presets --------------------------------------------------------------------------------------

# Every preset can be represented: all use the mlp2x_gelu connector that transformers' LLaVA
# classes implement (a `Projector.LINEAR` config cannot, see test_linear_projector_refused).


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips(name):
    cfg = LlavaConfig.preset(name)
    hf = to_hf_config(cfg)
    assert from_hf_config(hf) == cfg
    assert from_hf_config(json.loads(json.dumps(hf))) == cfg  # lists, not tuples


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_what_transformers_reads(name):
    """transformers accepts our config.json and, with its defaults filled in, it reads back."""
    cfg = LlavaConfig.preset(name)
    full = via_transformers(to_hf_config(cfg))
    assert full["architectures"] == to_hf_config(cfg)["architectures"]
    assert without_extra(from_hf_config(full)) == cfg


def test_linear_projector_refused():
    cfg = LlavaConfig.llava15_7b().replace(projector="linear")
    with pytest.raises(ConfigError, match="projector=linear"):
        to_hf_config(cfg)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_dict_from_dict_round_trip(name):
    cfg = LlavaConfig.preset(name)
    assert LlavaConfig.from_dict(cfg.to_dict()) == cfg
    assert LlavaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_to_dict_from_dict_non_default_fields():
    text = dataclasses.replace(
        LlavaConfig.llava_next_mistral_7b().text,
        sliding_window=4096,
        eos_token_id=(2, 7),
        pad_token_id=0,
    )
    cfg = LlavaConfig.llava_next_mistral_7b().replace(
        text=text,
        vision_feature_layer=(-24, -12, -2),
        hf_extra='{"": {"ignore_index": -100}}',
    )
    assert LlavaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    hash(cfg)  # frozen and made of tuples
    # Run settings are not architecture: never saved, and the saved config comes back with
    # the defaults, whatever this instance ran with.
    running = cfg.with_run(dtype="bfloat16", scan_layers=False, remat_policy=RematPolicy.DOTS)
    assert running.to_dict() == cfg.to_dict() and "run" not in cfg.to_dict()
    assert LlavaConfig.from_dict(running.to_dict()) == cfg


def test_an_old_config_with_run_settings_still_loads():
    """llava_config.json written before the run settings moved out held them at the top."""
    d = LlavaConfig.llava15_7b().to_dict()
    old = {**d, "dtype": "bfloat16", "param_dtype": "bfloat16", "scan_layers": False,
           "remat_policy": "full", "attention_chunk": 1024}  # fmt: skip
    assert LlavaConfig.from_dict(old) == LlavaConfig.llava15_7b()


def test_from_dict_refuses_unknown_keys():
    d = LlavaConfig.llava15_7b().to_dict()
    d["text"]["rope_scaling"] = 2.0
    with pytest.raises(ValueError, match="rope_scaling"):
        LlavaConfig.from_dict(d)


# -- released configs -----------------------------------------------------------------------------

CLIP_L336 = {
    "hidden_size": 1024,
    "image_size": 336,
    "intermediate_size": 4096,
    "model_type": "clip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
    "vocab_size": 32000,
}
SIGLIP = {
    "hidden_size": 1152,
    "image_size": 384,
    "intermediate_size": 4304,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 26,
    "patch_size": 14,
    "vision_use_head": False,
}
LLAVA_15_7B = {  # llava-hf/llava-1.5-7b-hf style
    "architectures": ["LlavaForConditionalGeneration"],
    "ignore_index": -100,
    "image_token_index": 32000,
    "model_type": "llava",
    "pad_token_id": 32001,
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.36.0.dev0",
    "vision_config": CLIP_L336,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}
LLAVA_15_13B = copy.deepcopy(LLAVA_15_7B)
LLAVA_15_13B["text_config"].update(
    {
        "_name_or_path": "lmsys/vicuna-13b-v1.5",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_attention_heads": 40,
        "num_hidden_layers": 40,
        "num_key_value_heads": 40,
    }
)


def _next(base: dict) -> dict:
    d = copy.deepcopy(base)
    d.update(
        architectures=["LlavaNextForConditionalGeneration"],
        model_type="llava_next",
        image_grid_pinpoints=[list(p) for p in NEXT_PINPOINTS],
        use_image_newline_parameter=True,
    )
    return d


NEXT_MISTRAL_7B = _next(LLAVA_15_7B)  # llava-hf/llava-v1.6-mistral-7b-hf style
NEXT_MISTRAL_7B["text_config"] = {
    "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
    "architectures": ["MistralForCausalLM"],
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "torch_dtype": "bfloat16",
    "vocab_size": 32064,
}


def _onevision(text: dict, tie: bool) -> dict:  # llava-hf/llava-onevision-qwen2-*-ov-hf style
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "ignore_index": -100,
        "image_grid_pinpoints": [list(p) for p in ONEVISION_PINPOINTS],
        "image_token_index": 151646,
        "model_type": "llava_onevision",
        "projector_hidden_act": "gelu",
        "text_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "eos_token_id": 151645,
            "max_position_embeddings": 32768,
            "model_type": "qwen2",
            "rope_theta": 1000000.0,
            "sliding_window": 32768,
            "tie_word_embeddings": tie,
            "torch_dtype": "bfloat16",
            **text,
        },
        "tie_word_embeddings": tie,
        "torch_dtype": "float16",
        "transformers_version": "4.45.0.dev0",
        "use_image_newline_parameter": True,
        "video_token_index": 151647,
        "vision_aspect_ratio": "anyres_max_9",
        "vision_config": SIGLIP,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
    }


OV_05B = _onevision(
    {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "max_window_layers": 24,
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
    },
    tie=True,
)
OV_7B = _onevision(
    {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "max_window_layers": 28,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152128,
    },
    tie=False,
)
OV_72B = _onevision(
    {
        "hidden_size": 8192,
        "intermediate_size": 29568,
        "max_window_layers": 80,
        "num_attention_heads": 64,
        "num_hidden_layers": 80,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
    },
    tie=False,
)

RELEASED = {
    "llava-1.5-7b": LLAVA_15_7B,
    "llava-1.5-13b": LLAVA_15_13B,
    "llava-v1.6-vicuna-7b": _next(LLAVA_15_7B),
    "llava-v1.6-vicuna-13b": _next(LLAVA_15_13B),
    "llava-v1.6-mistral-7b": NEXT_MISTRAL_7B,
    "llava-onevision-qwen2-0.5b": OV_05B,
    "llava-onevision-qwen2-7b": OV_7B,
    "llava-onevision-qwen2-72b": OV_72B,
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_parses_to_preset(name):
    assert without_extra(from_hf_config(RELEASED[name])) == LlavaConfig.preset(name)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_defaults_agree_with_transformers(name):
    hf = RELEASED[name]
    assert without_extra(from_hf_config(via_transformers(hf))) == without_extra(from_hf_config(hf))


# Legacy top-level fields that transformers 5 no longer defines: checked when read (vocab_size
# must equal text_config's, use_image_newline_parameter must be true), not written back.
CHECKED_NOT_KEPT = {"vocab_size", "use_image_newline_parameter"}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_survives_our_round_trip(name):
    """Fields we do not model (ignore_index, pad_token_id, _name_or_path...) are written back."""
    cfg = from_hf_config(RELEASED[name])
    hf = to_hf_config(cfg)
    assert from_hf_config(hf) == cfg
    want = {k: v for k, v in via_transformers(RELEASED[name]).items() if k not in CHECKED_NOT_KEPT}
    assert via_transformers(hf) == want


def test_onevision_family_from_architectures_not_model_type():
    """Released OneVision configs say model_type llava (LLaVA-NeXT #130)."""
    hf = copy.deepcopy(OV_05B)
    hf["model_type"] = "llava"
    cfg = from_hf_config(hf)
    assert cfg.family == Family.LLAVA_ONEVISION
    assert without_extra(cfg) == LlavaConfig.preset("llava-onevision-qwen2-0.5b")
    assert to_hf_config(cfg)["model_type"] == "llava_onevision"


@pytest.mark.parametrize(
    "drop, family",
    [
        ((), Family.LLAVA_ONEVISION),
        (("vision_aspect_ratio", "video_token_index"), Family.LLAVA_NEXT),
        (("vision_aspect_ratio", "video_token_index", "image_grid_pinpoints"), Family.LLAVA),
    ],
)
def test_family_from_fields_without_architectures(drop, family):
    hf = {k: v for k, v in OV_05B.items() if k not in ("architectures", *drop)}
    hf["text_config"] = {**hf["text_config"], "model_type": "qwen2"}
    assert from_hf_config(hf).family == family


@pytest.mark.parametrize(
    "arch, model_type",
    [
        ("LlavaForConditionalGeneration", "llava"),
        ("LlavaNextForConditionalGeneration", "llava_next"),
        ("LlavaOnevisionForConditionalGeneration", "llava_onevision"),
    ],
)
def test_empty_sub_configs_take_transformers_defaults(arch, model_type):
    """No text_config / vision_config at all: the defaults of transformers' LLaVA classes."""
    hf = {"architectures": [arch], "model_type": model_type}
    cfg = from_hf_config(hf)
    assert without_extra(cfg) == without_extra(from_hf_config(via_transformers(hf)))
    if model_type == "llava_onevision":
        assert cfg.vision.kind == VisionKind.SIGLIP and cfg.vision.num_hidden_layers == 26
        assert cfg.text.kind == TextKind.QWEN2 and cfg.text.vocab_size == 151936
        assert cfg.vision_feature_select_strategy == FeatureSelect.FULL
    else:
        assert cfg.vision == LlavaConfig.llava15_7b().vision
        assert cfg.text.kind == TextKind.LLAMA and cfg.text.max_position_embeddings == 2048


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_text_defaults_agree_with_transformers(model_type):
    """A text_config naming only its model_type means transformers' class defaults."""
    hf = {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "model_type": "llava_next",
        "text_config": {"model_type": model_type},
    }
    cfg = from_hf_config(hf)
    assert without_extra(cfg) == without_extra(from_hf_config(via_transformers(hf)))
    if model_type == "mistral":
        assert cfg.text.sliding_window == 4096 and cfg.text.num_key_value_heads == 8


# -- refusals -------------------------------------------------------------------------------------


def _with(hf: dict, path: str, value) -> dict:
    hf = copy.deepcopy(hf)
    *parents, leaf = path.split(".")
    node = hf
    for p in parents:
        node = node[p]
    node[leaf] = value
    return hf


@pytest.mark.parametrize(
    "base, path, value",
    [
        ("llava-1.5-7b", "text_config.rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("llava-1.5-7b", "text_config.rope_scaling", {"type": "dynamic", "factor": 2.0}),
        ("llava-1.5-7b", "text_config.rope_parameters", {"rope_type": "yarn", "factor": 4.0}),
        ("llava-1.5-7b", "text_config.mlp_bias", True),
        ("llava-1.5-7b", "text_config.attention_bias", True),
        ("llava-1.5-7b", "text_config.sliding_window", 4096),
        ("llava-1.5-7b", "text_config.hidden_act", "gelu"),
        ("llava-1.5-7b", "text_config.attention_dropout", 0.1),
        ("llava-1.5-7b", "text_config.model_type", "gemma"),
        ("llava-1.5-7b", "text_config.foo", 1),
        ("llava-1.5-7b", "vision_config.hidden_act", "relu"),
        ("llava-1.5-7b", "vision_config.dropout", 0.1),
        ("llava-1.5-7b", "vision_config.attention_dropout", 0.1),
        ("llava-1.5-7b", "vision_config.model_type", "dinov2"),
        ("llava-1.5-7b", "vision_config.foo", 1),
        ("llava-1.5-7b", "projector_hidden_act", "relu"),
        ("llava-1.5-7b", "vocab_size", 32000),
        ("llava-1.5-7b", "foo", 1),
        ("llava-v1.6-mistral-7b", "use_image_newline_parameter", False),
        ("llava-onevision-qwen2-0.5b", "vision_config.vision_use_head", True),
        ("llava-onevision-qwen2-0.5b", "text_config.use_sliding_window", True),
        ("llava-onevision-qwen2-0.5b", "text_config.layer_types", ["sliding_attention"] * 24),
    ],
    ids=lambda v: v if isinstance(v, str) else repr(v)[:24],
)
def test_field_not_understood_is_named(base, path, value):
    hf = _with(RELEASED[base], path, value)
    where = path if "." in path else f"config.{path}"
    with pytest.raises(ConfigError, match=f"^{where}=") as info:
        from_hf_config(hf)
    assert "\n" not in str(info.value)


def test_siglip_head_default_is_refused():
    """SiglipVisionConfig defaults vision_use_head to true: omitting it is not enough."""
    vision = {k: v for k, v in SIGLIP.items() if k != "vision_use_head"}
    with pytest.raises(ConfigError, match="vision_config.vision_use_head"):
        from_hf_config(_with(OV_05B, "vision_config", vision))


def test_mistral_sliding_window_is_read():
    cfg = from_hf_config(_with(NEXT_MISTRAL_7B, "text_config.sliding_window", 4096))
    assert cfg.text.sliding_window == 4096
    assert to_hf_config(cfg)["text_config"]["sliding_window"] == 4096


def test_default_rope_accepted():
    for value in ({"rope_type": "default"}, {"type": "default"}, None):
        cfg = from_hf_config(_with(LLAVA_15_7B, "text_config.rope_scaling", value))
        assert cfg.text.rope_theta == 10_000.0


@pytest.mark.parametrize(
    "hf, message",
    [
        ([], "expected a JSON object, found list"),
        ({}, "not an HF LLaVA config.json"),
        ({"architectures": ["LlamaForCausalLM"], "text_config": {}}, "not a LLaVA model"),
        ({"architectures": "LlavaForConditionalGeneration"}, "architectures: expected a list"),
        (
            {"architectures": ["LlavaForConditionalGeneration"], "text_config": 3},
            "text_config: expected an object, found 3",
        ),
    ],
)
def test_not_a_llava_config_is_refused(hf, message):
    with pytest.raises(ConfigError, match=message):
        from_hf_config(hf)
