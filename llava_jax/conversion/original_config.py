"""The original repositories' `config.json` -> `LlavaConfig`, strictly.

haotian-liu/LLaVA (`LlavaLlamaForCausalLM`, `LlavaMistralForCausalLM`) and LLaVA-VL/LLaVA-NeXT
(`LlavaQwenForCausalLM`) save the LLM's own config with the multimodal settings added at its
top level (`llava/model/llava_arch.py::initialize_vision_modules`). The vision tower's config
is not saved: the code loads the tower by name (`mm_vision_tower`,
`llava/model/multimodal_encoder/builder.py`), so it comes from a known name or `--vision DIR`.

Every `mm_*` / `image_*` field is read, known not to change the network (training settings),
or refused by name. The model keeps the original's conventions (`Convention.ORIGINAL`): its
pinpoints are (width, height) (`llava/mm_utils.py::select_best_resolution` takes PIL sizes),
stored here transposed as the (height, width) that `LlavaConfig` holds.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from llava_jax.config import (
    Convention,
    Family,
    FeatureSelect,
    LlavaConfig,
    Projector,
    VisionConfig,
    VisionKind,
)
from llava_jax.conversion.hf_config import ConfigError, extra_json, text_from_hf, vision_from_hf

ARCHITECTURES = {
    "LlavaLlamaForCausalLM": "llama",
    "LlavaMistralForCausalLM": "mistral",
    "LlavaQwenForCausalLM": "qwen2",
}
_MODEL_TYPES = {"llava", "llava_llama", "llava_mistral", "llava_qwen"}

# Towers the original code loads by these names (their hub configs); others need --vision DIR.
# LLaVA-NeXT's SigLIP tower deletes the last of 27 layers and the pooling head at load
# (`multimodal_encoder/siglip_encoder.py::SigLipVisionTower.load_model`).
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": lambda: VisionConfig.clip_vit_l14(336),
    "openai/clip-vit-large-patch14": lambda: VisionConfig.clip_vit_l14(224),
    "google/siglip-so400m-patch14-384": lambda: VisionConfig.siglip_so400m(26),
}

# Training settings saved with the model (`llava/train/train.py` model_args / training_args);
# none changes the forward pass. `mm_use_im_patch_token` only adds an unused `<im_patch>`
# token to the tokenizer at load (`llava/model/builder.py`); `image_crop_resolution` and
# `image_split_resolution` are read only by the `crop_split` aspect ratio, refused below.
_TRAINING_ONLY = {
    "mm_projector_lr", "mm_vision_tower_lr", "mm_tunable_parts", "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter", "unfreeze_mm_vision_tower", "tune_mm_vision_resampler",
    "freeze_mm_vision_resampler", "use_mm_proj", "vision_tower_pretrained",
    "mm_use_im_patch_token", "image_crop_resolution", "image_split_resolution",
    "tokenizer_padding_side", "tokenizer_model_max_length", "pos_skipping_range",
    "use_pos_skipping", "mm_vision_tower_pretrained", "delay_load",
}  # fmt: skip


def is_original_config(raw: Any) -> bool:
    """Whether a config.json dict was written by the original repositories."""
    if not isinstance(raw, dict):
        return False
    archs = raw.get("architectures") or []
    return bool(set(archs) & set(ARCHITECTURES)) if isinstance(archs, list) else False


def tower_kind(raw: dict[str, Any]) -> VisionKind:
    """CLIP or SigLIP, by the rule of LLaVA-NeXT's `build_vision_tower`."""
    name = raw.get("mm_vision_tower")
    if not isinstance(name, str):
        raise ConfigError(f"config.mm_vision_tower={name!r}: expected the vision tower's name")
    if "siglip" in name:
        return VisionKind.SIGLIP
    if name.startswith(("openai", "laion")) or "ShareGPT4V" in name or name in KNOWN_TOWERS:
        return VisionKind.CLIP
    raise ConfigError(f"config.mm_vision_tower={name!r}: not a CLIP or SigLIP tower")


def family_of(raw: dict[str, Any]) -> Family:
    """LLaVA-1.5 (`flat`), NeXT (`spatial_unpad` + `anyres`) or OneVision (+ `anyres_max_N`)."""
    merge = raw.get("mm_patch_merge_type", "flat")
    ratio = raw.get("image_aspect_ratio", "square")
    if merge == "flat" and ratio in ("square", "pad"):
        return Family.LLAVA
    if merge == "spatial_unpad" and ratio == "anyres":
        return Family.LLAVA_NEXT
    if (
        merge == "spatial_unpad"
        and isinstance(ratio, str)
        and re.fullmatch(r"anyres_max_\d+", ratio)
    ):
        return Family.LLAVA_ONEVISION
    raise ConfigError(
        f"config.mm_patch_merge_type={merge!r} with image_aspect_ratio={ratio!r}: supported are "
        "flat with square or pad (LLaVA-1.5), spatial_unpad with anyres (LLaVA-NeXT) or "
        "anyres_max_N (OneVision)"
    )


def vision_config(raw: dict[str, Any], vision_hf: dict[str, Any] | None) -> VisionConfig:
    """The tower of `mm_vision_tower`: from `vision_hf` (its config.json) or a known name."""
    kind = tower_kind(raw)
    name = raw["mm_vision_tower"]
    if vision_hf is None:
        if name not in KNOWN_TOWERS:
            raise ConfigError(
                f"config.mm_vision_tower={name!r} is not a tower llava-jax knows; pass its "
                "Hugging Face directory with --vision DIR"
            )
        return KNOWN_TOWERS[name]()
    model_type = vision_hf.get("model_type")
    if model_type in ("clip", "siglip"):
        vision_hf = vision_hf.get("vision_config") or {}
        model_type = f"{model_type}_vision_model"
    want = "clip_vision_model" if kind == VisionKind.CLIP else "siglip_vision_model"
    if model_type != want:
        raise ConfigError(
            f"--vision config: model_type={model_type!r}, but config.mm_vision_tower={name!r} "
            f"is a {kind} tower"
        )
    vision_hf = dict(vision_hf)
    if kind == VisionKind.SIGLIP:  # the original's cut: no last layer, no head
        vision_hf["num_hidden_layers"] = vision_hf.get("num_hidden_layers", 12) - 1
        vision_hf["vision_use_head"] = False
    vision, _ = vision_from_hf(vision_hf, want, where="--vision config")
    return vision


def grid_pinpoints(value: Any, crop_size: int) -> tuple[tuple[int, int], ...]:
    """`image_grid_pinpoints` as (height, width) canvases.

    The original reads a list of (width, height), a string of one, or "(1x1),...,(6x6)": every
    grid from the first to the last, times the crop size (`llava/mm_utils.py` of LLaVA-NeXT,
    `process_anyres_image` and `get_anyres_image_grid_shape`).
    """
    where = "config.image_grid_pinpoints"
    if isinstance(value, str) and "x" in value:
        grids = re.findall(r"\((\d+)x(\d+)\)", value)
        if not grids:
            raise ConfigError(f"{where}={value!r}: expected grids like '(1x1),...,(6x6)'")
        (w0, h0), (w1, h1) = map(int, grids[0]), map(int, grids[-1])
        value = [
            [i * crop_size, j * crop_size] for i in range(w0, w1 + 1) for j in range(h0, h1 + 1)
        ]
    elif isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{where}={value!r}: not a list of [width, height]") from None
    ok = isinstance(value, list | tuple) and value
    ok = ok and all(isinstance(p, list | tuple) and len(p) == 2 for p in value)
    if not ok or not all(isinstance(v, int) and v > 0 for p in value for v in p):
        raise ConfigError(f"{where}={value!r}: not a list of [width, height]")
    return tuple((int(h), int(w)) for w, h in value)


def from_original_config(
    raw: dict[str, Any],
    vision_hf: dict[str, Any] | None,
    image_token_id: int,
    video_token_id: int | None = None,
) -> LlavaConfig:
    """Reads an original repository's `config.json` dict.

    Args:
      raw: the config.json dict.
      vision_hf: the vision tower's HF config.json dict (`--vision DIR`), or None for a
        tower of `KNOWN_TOWERS`.
      image_token_id: the tokenizer's `<image>` id (the original uses -200, never a token).
      video_token_id: the tokenizer's `<video>` id (OneVision).

    Returns:
      The model config, with `convention=Convention.ORIGINAL`.
    """
    archs = [a for a in raw.get("architectures") or [] if a in ARCHITECTURES]
    if not archs:
        raise ConfigError(f"config.architectures={raw.get('architectures')}: supported: "
                          f"{sorted(ARCHITECTURES)}")  # fmt: skip
    family = family_of(raw)
    vision = vision_config(raw, vision_hf)
    d, where = dict(raw), "config"

    def take(key: str, default: Any = None) -> Any:
        return d.pop(key, default)

    def refuse(key: str, value: Any, why: str):
        raise ConfigError(f"{where}.{key}={value!r}: {why}")

    take("architectures")
    if take("model_type", "llava") not in _MODEL_TYPES:
        refuse("model_type", raw["model_type"], f"expected one of {sorted(_MODEL_TYPES)}")
    for key in ("mm_vision_tower", "mm_patch_merge_type", "image_aspect_ratio"):
        take(key)  # read by family_of and vision_config
    projector = take("mm_projector_type", "linear")  # the builder's default
    if projector not in ("linear", "mlp2x_gelu"):
        refuse("mm_projector_type", projector, "supported: linear, mlp2x_gelu")
    hidden = take("mm_hidden_size", vision.hidden_size)
    if hidden != vision.hidden_size:
        refuse("mm_hidden_size", hidden, f"the vision tower's hidden_size is {vision.hidden_size}")
    layer = take("mm_vision_select_layer")
    select = take("mm_vision_select_feature", "patch")
    if vision.kind == VisionKind.SIGLIP:
        # LLaVA-NeXT's SigLIP tower ignores both: the last kept layer, every token.
        layer, strategy = -1, FeatureSelect.FULL
    else:
        if not isinstance(layer, int):
            refuse("mm_vision_select_layer", layer, "expected a layer index")
        strategies = {"patch": FeatureSelect.DEFAULT, "cls_patch": FeatureSelect.FULL}
        if select not in strategies:
            refuse("mm_vision_select_feature", select, "supported: patch, cls_patch")
        strategy = strategies[select]
    # The video layout (`llava_arch.py::get_2dPool`, `mm_newline_position`) is OneVision's
    # only; the other families here take no video, so their training defaults do not matter.
    video = family == Family.LLAVA_ONEVISION
    for key, allowed, why, applies in [
        ("mm_use_im_start_end", (False,), "image start/end tokens are not implemented", True),
        ("mm_resampler_type", (None,), "vision resamplers are not implemented", True),
        ("s2", (False,), "S2 multi-scale towers are not implemented", True),
        ("mm_newline_position", ("one_token",), "video newlines other than one per video", video),
        ("mm_spatial_pool_mode", ("bilinear",), "video pooling other than bilinear", video),
        ("mm_spatial_pool_stride", (2,), "video pooling strides other than 2", video),
        ("add_faster_video", (False,), "the faster-video token is not implemented", video),
    ]:
        value = take(key, allowed[0])
        if applies and value not in allowed:
            refuse(key, value, why)
    pinpoints = take("image_grid_pinpoints")
    if family != Family.LLAVA:
        if pinpoints is None:
            refuse("image_grid_pinpoints", None, f"{family} needs the AnyRes canvases")
        pinpoints = grid_pinpoints(pinpoints, vision.image_size)
    else:
        pinpoints = None  # read by the anyres aspect ratios only
    for key in _TRAINING_ONLY:
        take(key)
    config_image_token = take("image_token_index")
    if config_image_token not in (None, image_token_id):
        refuse("image_token_index", config_image_token,
               f"the tokenizer's <image> token is {image_token_id}")  # fmt: skip
    unknown = sorted(k for k in d if k.startswith(("mm_", "image_", "vision_", "tokenizer_")))
    if unknown:
        refuse(unknown[0], d[unknown[0]], "not understood by llava-jax; refusing rather than "
               "ignoring it")  # fmt: skip
    # What is left is the LLM's own config, checked as an HF text_config.
    text, text_extra = text_from_hf(d, ARCHITECTURES[archs[0]], where=where)
    return LlavaConfig(
        family=family,
        vision=vision,
        text=text,
        projector=Projector.LINEAR if projector == "linear" else Projector.MLP2X_GELU,
        vision_feature_layer=layer,
        vision_feature_select_strategy=strategy,
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=raw["image_aspect_ratio"] if family == Family.LLAVA_ONEVISION else None,
        convention=Convention.ORIGINAL,
        hf_extra=extra_json({}, text_extra, {}),
    )
