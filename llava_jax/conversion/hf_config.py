"""`LlavaConfig` <-> Hugging Face `config.json`, strictly.

Every field of the HF config is either read into `LlavaConfig`, or known not to affect the
network (names, ids, generation defaults: kept verbatim in `hf_extra` so they round-trip), or
an error. A field that the model would silently ignore (`rope_scaling`, `mlp_bias`, a
sliding window on Qwen2, dropout, ...) is refused with the field's name, as penzai does.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from llava_jax.config import (
    NEXT_PINPOINTS,
    ONEVISION_PINPOINTS,
    Activation,
    Family,
    FeatureSelect,
    LlavaConfig,
    Projector,
    TextConfig,
    TextKind,
    VisionConfig,
    VisionKind,
)


class ConfigError(ValueError):
    """An HF config this implementation cannot reproduce exactly."""


_ARCHITECTURES = {
    "LlavaForConditionalGeneration": Family.LLAVA,
    "LlavaNextForConditionalGeneration": Family.LLAVA_NEXT,
    "LlavaOnevisionForConditionalGeneration": Family.LLAVA_ONEVISION,
}
# The original repositories' classes (`convert/original_config.py` reads their configs).
_ORIGINAL_ARCHITECTURES = {
    "LlavaLlamaForCausalLM",
    "LlavaMistralForCausalLM",
    "LlavaQwenForCausalLM",
}
_TEXT_KINDS = {"llama": TextKind.LLAMA, "mistral": TextKind.MISTRAL, "qwen2": TextKind.QWEN2}
_VISION_KINDS = {"clip_vision_model": VisionKind.CLIP, "siglip_vision_model": VisionKind.SIGLIP}

# PretrainedConfig bookkeeping and generation defaults: they never change the forward pass.
# fmt: off
_BENIGN = {
    "transformers_version", "architectures", "dtype", "torch_dtype", "_name_or_path",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "id2label", "label2id", "problem_type", "use_cache",
    "initializer_range", "initializer_factor", "pretraining_tp", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task",
    "tf_legacy_loss", "use_bfloat16", "torchscript", "pruned_heads", "tie_encoder_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "output_past", "projection_dim", "image_seq_length", "ignore_index",
    "model_type", "max_window_layers", "rope_type",
    # Top level: the text config's pad_token_id is the one used. vision_config: llava-hf's CLIP
    # configs carry the text vocab_size, which the vision tower never reads.
    "pad_token_id", "vocab_size",
}
# fmt: on

# A field missing from config.json means what it means to transformers: the defaults of the
# sub-config class that `model_type` names (llava-1.5-7b-hf's text_config lists seven fields).
_TEXT_DEFAULTS = {
    TextKind.LLAMA: dict(
        vocab_size=32000,
        intermediate_size=11008,
        num_key_value_heads=None,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        sliding_window=None,
    ),
    TextKind.MISTRAL: dict(
        vocab_size=32000,
        intermediate_size=14336,
        num_key_value_heads=8,
        max_position_embeddings=4096 * 32,
        bos_token_id=1,
        eos_token_id=2,
        sliding_window=4096,
    ),
    TextKind.QWEN2: dict(
        vocab_size=151936,
        intermediate_size=22016,
        num_key_value_heads=32,
        max_position_embeddings=32768,
        bos_token_id=None,
        eos_token_id=None,
        sliding_window=4096,
    ),
}
# A whole sub-config missing: the text model_type, and the vision config transformers' LLaVA
# classes build (`sub_configs_defaults`), per family.
_DEFAULT_TEXT_TYPE = {Family.LLAVA_ONEVISION: "qwen2"}
_CLIP_L336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "vocab_size": 32000,
    "projection_dim": 768,
}
_SIGLIP_SO400M = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 26,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "vision_use_head": False,
}


def _take(d: dict[str, Any], where: str, consumed: set[str], key: str, default: Any = None):
    consumed.add(key)
    return d.get(key, default)


def _refuse(where: str, key: str, value: Any, why: str):
    raise ConfigError(f"{where}.{key}={value!r}: {why}")


def _leftovers(d: dict, consumed: set[str], where: str) -> dict[str, Any]:
    extra = {}
    for key, value in d.items():
        if key in consumed:
            continue
        if key not in _BENIGN:
            raise ConfigError(
                f"{where}.{key}={value!r} is not understood by llava-jax; refusing rather "
                "than ignoring it"
            )
        extra[key] = value
    return extra


def _rope_theta(d: dict, where: str, consumed: set[str]) -> float:
    scaling = _take(d, where, consumed, "rope_scaling")
    if scaling not in (None, {}) and scaling.get("rope_type", scaling.get("type")) != "default":
        _refuse(where, "rope_scaling", scaling, "only unscaled RoPE is implemented")
    params = _take(d, where, consumed, "rope_parameters") or {}
    if params.get("rope_type", "default") != "default" or set(params) - {"rope_type", "rope_theta"}:
        _refuse(where, "rope_parameters", params, "only default RoPE is implemented")
    return float(params.get("rope_theta", _take(d, where, consumed, "rope_theta", 10_000.0)))


def text_from_hf(
    d: dict[str, Any], default_type: str = "llama", where: str = "text_config"
) -> tuple[TextConfig, dict]:
    """A `text_config` dict -> (TextConfig, fields kept verbatim); refuses what it cannot run."""
    seen = set()
    model_type = _take(d, where, seen, "model_type", default_type)
    if model_type not in _TEXT_KINDS:
        _refuse(where, "model_type", model_type, f"supported: {sorted(_TEXT_KINDS)}")
    kind = _TEXT_KINDS[model_type]
    defaults = _TEXT_DEFAULTS[kind]
    get = lambda key, default=None: _take(d, where, seen, key, default)  # noqa: E731
    std = lambda key: _take(d, where, seen, key, defaults[key])  # noqa: E731
    if get("hidden_act", "silu") != "silu":
        _refuse(where, "hidden_act", d["hidden_act"], "the decoder MLP is SwiGLU (silu)")
    if get("mlp_bias", False):
        _refuse(where, "mlp_bias", True, "MLP biases are not implemented")
    if get("attention_dropout", 0.0):
        _refuse(where, "attention_dropout", d["attention_dropout"], "dropout is not implemented")
    bias = get("attention_bias", kind == TextKind.QWEN2)
    if kind != TextKind.QWEN2 and bias:
        _refuse(where, "attention_bias", bias, "LLaMA's attention_bias also biases o_proj")
    sliding = std("sliding_window")
    if kind == TextKind.QWEN2:
        if get("use_sliding_window", False):
            _refuse(where, "use_sliding_window", True, "Qwen2 sliding windows are not implemented")
        sliding = None
    elif kind == TextKind.LLAMA and sliding is not None:
        _refuse(where, "sliding_window", sliding, "LLaMA has no sliding window")
    layer_types = get("layer_types")
    if layer_types and set(layer_types) != {"full_attention"} and sliding is None:
        _refuse(
            where, "layer_types", sorted(set(layer_types)), "only full attention is implemented"
        )
    hidden = get("hidden_size", 4096)
    heads = get("num_attention_heads", 32)
    eos = std("eos_token_id")
    cfg = TextConfig(
        kind=kind,
        vocab_size=std("vocab_size"),
        hidden_size=hidden,
        intermediate_size=std("intermediate_size"),
        num_hidden_layers=get("num_hidden_layers", 32),
        num_attention_heads=heads,
        num_key_value_heads=std("num_key_value_heads") or heads,
        head_dim=get("head_dim") or hidden // heads,
        rms_norm_eps=get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(d, where, seen),
        max_position_embeddings=std("max_position_embeddings"),
        attention_bias=bool(bias),
        tie_word_embeddings=get("tie_word_embeddings", False),
        sliding_window=sliding,
        bos_token_id=std("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,  # frozen config: no lists
        pad_token_id=get("pad_token_id"),
    )
    return cfg, _leftovers(d, seen, where)


def vision_from_hf(
    d: dict[str, Any], default_type: str, where: str = "vision_config"
) -> tuple[VisionConfig, dict]:
    """A `vision_config` dict -> (VisionConfig, fields kept verbatim); refuses the unrunnable."""
    seen = set()
    get = lambda key, default=None: _take(d, where, seen, key, default)  # noqa: E731
    model_type = get("model_type", default_type)
    if model_type not in _VISION_KINDS:
        _refuse(where, "model_type", model_type, f"supported: {sorted(_VISION_KINDS)}")
    kind = _VISION_KINDS[model_type]
    for key in ("attention_dropout", "dropout"):
        if get(key, 0.0):
            _refuse(where, key, d[key], "dropout is not implemented")
    if kind == VisionKind.SIGLIP and get("vision_use_head", True):
        _refuse(
            where,
            "vision_use_head",
            True,
            "LLaVA reads hidden states; the pooling head "
            "would be silently unused (HF OneVision configs set it to false)",
        )
    default_act = "quick_gelu" if kind == VisionKind.CLIP else "gelu_pytorch_tanh"
    try:
        act = Activation(get("hidden_act", default_act))
    except ValueError:
        _refuse(where, "hidden_act", d["hidden_act"], "unsupported activation")
    cfg = VisionConfig(
        kind=kind,
        hidden_size=get("hidden_size", 768),
        intermediate_size=get("intermediate_size", 3072),
        num_hidden_layers=get("num_hidden_layers", 12),
        num_attention_heads=get("num_attention_heads", 12),
        image_size=get("image_size", 224),
        patch_size=get("patch_size", 32 if kind == VisionKind.CLIP else 16),
        num_channels=get("num_channels", 3),
        layer_norm_eps=get("layer_norm_eps", 1e-5 if kind == VisionKind.CLIP else 1e-6),
        hidden_act=act,
    )
    return cfg, _leftovers(d, seen, where)


def _check_shape(hf: Any) -> None:
    """Refuses what is not an HF LLaVA config at all, before reading any field."""
    if not isinstance(hf, dict):
        raise ConfigError(f"config: expected a JSON object, found {type(hf).__name__}")
    for key in ("text_config", "vision_config"):
        if not isinstance(hf.get(key) or {}, dict):
            raise ConfigError(f"config.{key}: expected an object, found {hf[key]!r}")
    archs = hf.get("architectures")
    if archs is not None and not isinstance(archs, list):
        raise ConfigError(f"config.architectures: expected a list, found {archs!r}")
    if archs and set(archs) & _ORIGINAL_ARCHITECTURES:
        raise ConfigError(
            f"config.architectures={archs}: a checkpoint of the original LLaVA repositories; "
            "convert it once with `llava-jax convert hf-to-jax` (docs/conversion.md)"
        )
    if archs and not set(archs) & set(_ARCHITECTURES):
        raise ConfigError(
            f"config.architectures={archs}: not a LLaVA model; supported: {sorted(_ARCHITECTURES)}"
        )
    if not archs and "text_config" not in hf and "vision_config" not in hf:
        raise ConfigError(
            "config: no architectures, text_config or vision_config; this is not an HF LLaVA "
            "config.json"
        )


def from_hf_config(hf: dict[str, Any]) -> LlavaConfig:
    """Reads an HF LLaVA / LLaVA-NeXT / LLaVA-OneVision `config.json` dict.

    The family comes from `architectures` (released OneVision configs say
    `model_type: llava`, LLaVA-NeXT #130), falling back to the fields present.
    """
    where, seen = "config", set()
    _check_shape(hf)
    get = lambda key, default=None: _take(hf, where, seen, key, default)  # noqa: E731
    # Both are rewritten by `to_hf_config` from the family, so they are not kept in hf_extra.
    get("model_type")
    archs = [a for a in get("architectures") or [] if a in _ARCHITECTURES]
    if archs:
        family = _ARCHITECTURES[archs[0]]
    elif "vision_aspect_ratio" in hf or "video_token_index" in hf:
        family = Family.LLAVA_ONEVISION
    elif "image_grid_pinpoints" in hf:
        family = Family.LLAVA_NEXT
    else:
        family = Family.LLAVA
    text, text_extra = text_from_hf(
        dict(get("text_config") or {}), _DEFAULT_TEXT_TYPE.get(family, "llama")
    )
    is_ov = family == Family.LLAVA_ONEVISION
    vision_hf = get("vision_config")
    if vision_hf is None:
        vision_hf = _SIGLIP_SO400M if is_ov else _CLIP_L336
    vision, vision_extra = vision_from_hf(
        dict(vision_hf), "siglip_vision_model" if is_ov else "clip_vision_model"
    )
    if get("projector_hidden_act", "gelu") != "gelu":
        _refuse(
            where, "projector_hidden_act", hf["projector_hidden_act"], "the connector is mlp2x_gelu"
        )
    layer = get("vision_feature_layer", -1 if is_ov else -2)
    tie = bool(get("tie_word_embeddings", False)) or text.tie_word_embeddings
    text = dataclasses.replace(text, tie_word_embeddings=tie)
    pinpoints = get("image_grid_pinpoints")
    if pinpoints is None:  # transformers' defaults
        pinpoints = {Family.LLAVA_NEXT: NEXT_PINPOINTS, Family.LLAVA_ONEVISION: ONEVISION_PINPOINTS}
        pinpoints = pinpoints.get(family)
    if not get("use_image_newline_parameter", True):
        _refuse(where, "use_image_newline_parameter", False, "NeXT without image_newline")
    vocab = get("vocab_size")
    if vocab is not None and vocab != text.vocab_size:
        _refuse(
            where, "vocab_size", vocab, f"differs from text_config.vocab_size={text.vocab_size}"
        )
    video_default = 151647 if is_ov else None
    cfg = LlavaConfig(
        family=family,
        vision=vision,
        text=text,
        projector=Projector.MLP2X_GELU,
        projector_bias=get("multimodal_projector_bias", True),
        vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
        vision_feature_select_strategy=FeatureSelect(
            get("vision_feature_select_strategy", "full" if is_ov else "default")
        ),
        image_token_id=get("image_token_index", get("image_token_id", 151646 if is_ov else 32000)),
        video_token_id=get("video_token_index", get("video_token_id", video_default)),
        image_grid_pinpoints=tuple(tuple(p) for p in pinpoints) if pinpoints else None,
        vision_aspect_ratio=get("vision_aspect_ratio", "anyres_max_9" if is_ov else None),
        hf_extra=extra_json(_leftovers(hf, seen, where), text_extra, vision_extra),
    )
    return cfg


def extra_json(top: dict, text: dict, vision: dict) -> str:
    sections = {"": top, "text_config": text, "vision_config": vision}
    return json.dumps({k: v for k, v in sections.items() if v}, sort_keys=True)


def to_hf_config(cfg: LlavaConfig) -> dict[str, Any]:
    """The HF `config.json` dict for `cfg` (inverse of `from_hf_config`)."""
    if cfg.projector != Projector.MLP2X_GELU:
        raise ConfigError(
            f"projector={cfg.projector}: transformers' LLaVA classes only have the mlp2x_gelu "
            "connector, so this model cannot be written as an HF checkpoint"
        )
    extra = json.loads(cfg.hf_extra)
    t, v = cfg.text, cfg.vision
    text = {
        "model_type": t.kind.value,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps,
        "rope_parameters": {"rope_theta": t.rope_theta, "rope_type": "default"},
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": (
            list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id
        ),
        "pad_token_id": t.pad_token_id,
        "attention_dropout": 0.0,
    }
    # Only the fields each transformers config class has: Qwen2Config has no head_dim (its
    # attention reads one if present), MistralConfig no attention_bias / mlp_bias.
    if t.kind != TextKind.QWEN2 or t.head_dim != t.hidden_size // t.num_attention_heads:
        text["head_dim"] = t.head_dim
    if t.kind == TextKind.QWEN2:
        text["use_sliding_window"] = False
    if t.kind == TextKind.LLAMA:
        text["attention_bias"] = False
        text["mlp_bias"] = False
    if t.kind == TextKind.MISTRAL:
        text["sliding_window"] = t.sliding_window
    vision = {
        "model_type": "clip_vision_model" if v.kind == VisionKind.CLIP else "siglip_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": v.hidden_act.value,
        "attention_dropout": 0.0,
    }
    if v.kind == VisionKind.SIGLIP:
        vision["vision_use_head"] = False
    arch = {v: k for k, v in _ARCHITECTURES.items()}[cfg.family]
    layer = cfg.vision_feature_layer
    hf = {
        "architectures": [arch],
        "model_type": cfg.family.value,
        "text_config": {**extra.get("text_config", {}), **text},
        "vision_config": {**extra.get("vision_config", {}), **vision},
        "image_token_index": cfg.image_token_id,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": cfg.projector_bias,
        "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy.value,
        "tie_word_embeddings": t.tie_word_embeddings,
    }
    if cfg.family != Family.LLAVA:
        hf["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]
    if cfg.family == Family.LLAVA_ONEVISION:
        hf["video_token_index"] = cfg.video_token_id
        hf["vision_aspect_ratio"] = cfg.vision_aspect_ratio
    top_extra = extra.get("", {})
    top_extra.pop("architectures", None)
    top_extra.pop("model_type", None)
    return {**top_extra, **hf}
