"""Assembling a stage-1 model from separately pretrained parts, as the papers do.

    assemble(vision_dir, llm_dir, recipe_model, out_dir)

The vision tower comes from an HF CLIPVisionModel / SiglipVisionModel dir (or the vision half
of a CLIPModel / SiglipModel dir), the decoder from an HF Llama / Mistral / Qwen2 causal-LM
dir. The recipe's model config (`config_loader.model_config`) fixes everything else, and the
parts must agree with it: its family, connector, feature layer, and the vocabulary size after
the media tokens are added.

Media tokens follow the HF llava layout, since our models take HF-style image token ids
rather than the original code's IMAGE_TOKEN_INDEX = -200 spliced into the ids: `<image>` (and
`<video>` for OneVision) become special tokens of the tokenizer unless it has them, so
Vicuna's 32000 tokens gain `<image>` = 32000 and the embeddings grow to the recipe's 32064
rows (llava-1.5-hf); Qwen2's tokenizer (151646 tokens) gains 151646 / 151647 inside its
existing 152064-row matrix. New rows, and the rows of the added tokens, are the mean of the
old tokens' rows, input and output embeddings each (haotian-liu LLaVA
`initialize_vision_tokenizer`; the exact mean, not transformers' sample around it).

Fresh parameters, from `numpy.random.default_rng(seed)`: the connector as torch's
`nn.Linear` default, weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); `image_newline`
(NeXT, OneVision) ~ N(0, 1) / sqrt(hidden_size) as LLaVA-NeXT's `model/llava_arch.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from llava_jax.config import Family, LlavaConfig, VisionKind
from llava_jax.conversion.hf_config import ConfigError, from_hf_config
from llava_jax.conversion.mapping import canonical_key, rule_for
from llava_jax.conversion.tensor_io import CheckpointReader, read_config_json
from llava_jax.errors import CheckpointError
from llava_jax.model_io import is_model_dir, load_params
from llava_jax.models.build import abstract_params

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
EMBED = "language_model.model.embed_tokens.weight"
LM_HEAD = "language_model.lm_head.weight"
_ARCH = {
    Family.LLAVA: "LlavaForConditionalGeneration",
    Family.LLAVA_NEXT: "LlavaNextForConditionalGeneration",
    Family.LLAVA_ONEVISION: "LlavaOnevisionForConditionalGeneration",
}
# Towers as part of a two-tower model: the vision half is taken.
_VISION_TYPES = {"clip_vision_model": "clip_vision_model", "siglip_vision_model":
                 "siglip_vision_model", "clip": "clip_vision_model", "siglip":
                 "siglip_vision_model"}  # fmt: skip
# Files of an LLM dir kept next to the model (the tokenizer is re-saved with the media tokens).
_LLM_ASSETS = ("generation_config.json",)


@dataclasses.dataclass(frozen=True)
class Parts:
    """The configs of the two pretrained parts, as they would sit inside an HF LLaVA config."""

    vision: dict[str, Any]  # the vision_config dict (model_type *_vision_model)
    text: dict[str, Any]  # the text_config dict


def read_parts(vision_dir: str | os.PathLike, llm_dir: str | os.PathLike) -> Parts:
    """The vision and text sub-configs of the two HF dirs (checked for their kinds)."""
    vision = read_config_json(Path(vision_dir) / "config.json")
    kind = vision.get("model_type")
    if kind not in _VISION_TYPES:
        raise ConfigError(
            f"{vision_dir}: model_type {kind!r} is not a CLIP or SigLIP vision model "
            f"(supported: {sorted(_VISION_TYPES)})"
        )
    if kind in ("clip", "siglip"):
        vision = dict(vision.get("vision_config") or {})
    vision = {**vision, "model_type": _VISION_TYPES[kind]}
    if vision["model_type"] == "siglip_vision_model":
        vision["vision_use_head"] = False  # LLaVA reads hidden states; the head is dropped
    text = read_config_json(Path(llm_dir) / "config.json")
    return Parts(vision=vision, text=text)


def parts_config(parts: Parts, family: Family) -> LlavaConfig:
    """The parts read as an HF LLaVA config of `family` would read them (strict)."""
    hf = {"architectures": [_ARCH[family]], "vision_config": parts.vision,
          "text_config": parts.text}  # fmt: skip
    try:
        return from_hf_config(hf)
    except ConfigError as e:
        raise ConfigError(f"the --vision / --llm parts: {e}") from None


def _differences(a: Any, b: Any, prefix: str, skip: tuple[str, ...]) -> list[str]:
    out = []
    for f in dataclasses.fields(a):
        if f.name in skip:
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if va != vb:
            out.append(f"{prefix}{f.name}: parts {va!r}, recipe {vb!r}")
    return out


def assembled_config(
    recipe: LlavaConfig, parts: LlavaConfig, image_token_id: int, video_token_id: int | None
) -> LlavaConfig:
    """The recipe's config, after checking that the parts and token ids fit it.

    The text token ids (bos / eos / pad) come from the LLM's config; every other vision and
    text field must be equal.
    """
    ids = ("bos_token_id", "eos_token_id", "pad_token_id", "vocab_size")
    diffs = _differences(parts.vision, recipe.vision, "vision.", ())
    diffs += _differences(parts.text, recipe.text, "text.", ids)
    if image_token_id != recipe.image_token_id:
        diffs.append(f"image_token_id: tokenizer {image_token_id}, recipe {recipe.image_token_id}")
    if video_token_id != recipe.video_token_id:
        diffs.append(f"video_token_id: tokenizer {video_token_id}, recipe {recipe.video_token_id}")
    if diffs:
        more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        raise ConfigError(
            "the --vision / --llm parts do not fit the recipe's model: "
            + "; ".join(diffs[:4])
            + more
        )
    text = dataclasses.replace(
        recipe.text,
        bos_token_id=parts.text.bos_token_id,
        eos_token_id=parts.text.eos_token_id,
        pad_token_id=parts.text.pad_token_id,
    )
    return recipe.replace(text=text)


# -- tokenizer --------------------------------------------------------------------------------


def add_media_tokens(tokenizer, family: Family) -> tuple[list[str], int | None]:
    """Adds `<image>` (and `<video>` for OneVision) as special tokens where missing.

    Returns:
      (the tokens added, the tokenizer's length before).
    """
    from tokenizers import AddedToken

    before = len(tokenizer)
    wanted = [IMAGE_TOKEN] + ([VIDEO_TOKEN] if family == Family.LLAVA_ONEVISION else [])
    vocab = tokenizer.get_vocab()
    missing = [t for t in wanted if t not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                           for t in missing]},
            replace_extra_special_tokens=False,
        )  # fmt: skip
    return missing, before


def mean_resized(table: np.ndarray, rows: int, old_tokens: int, new_ids: list[int]) -> np.ndarray:
    """`table` [V, D] grown to [rows, D]: new rows and `new_ids` rows = mean of the old tokens.

    Args:
      table: the LLM's embedding (or lm_head) matrix, in torch layout [V, D].
      rows: the new number of rows (>= V).
      old_tokens: how many tokens the tokenizer had; their rows make the mean.
      new_ids: ids of the added tokens (may lie inside the old matrix).
    """
    old = min(old_tokens, table.shape[0])
    mean = table[:old].astype(np.float32).mean(axis=0).astype(table.dtype)
    out = np.empty((rows, table.shape[1]), table.dtype)
    out[: table.shape[0]] = table
    out[table.shape[0] :] = mean
    out[new_ids] = mean
    return out


# -- fresh parameters ---------------------------------------------------------------------------


def fresh_params(cfg: LlavaConfig, seed: int) -> dict[str, np.ndarray]:
    """The connector and image_newline, in HF layout by canonical key (torch's init)."""
    rng = np.random.default_rng(seed)
    dtype = np.float32
    out = {}
    for path, leaf in sorted(abstract_params(cfg).items()):
        if path.startswith("multi_modal_projector/"):
            rule = rule_for(path, tuple(leaf.shape))
            if path.endswith("/kernel"):  # [in, out]; torch weight [out, in]
                fan_in = leaf.shape[0]
                shape = (leaf.shape[1], leaf.shape[0])
            else:  # bias [out]: its fan_in is the kernel's
                fan_in = abstract_params(cfg)[path.rsplit("/", 1)[0] + "/kernel"].shape[0]
                shape = tuple(leaf.shape)
            bound = 1 / math.sqrt(fan_in)
            out[rule.hf] = rng.uniform(-bound, bound, shape).astype(dtype)
        elif path == "image_newline":
            d = leaf.shape[0]
            out["image_newline"] = (rng.standard_normal(d) / math.sqrt(d)).astype(dtype)
    return out


# -- the image processor ------------------------------------------------------------------------


def processor_json(cfg: LlavaConfig, source: dict[str, Any] | None) -> dict[str, Any]:
    """An HF `preprocessor_config.json` for the family, at the tower's size.

    Mean and std come from `source` (the tower's own processor config) when given, else
    OpenAI CLIP's or SigLIP's. LLaVA pads to a square (the 1.5 recipe's `pad`).
    """
    from llava_jax.media import processor_config as ic

    siglip = cfg.vision.kind == VisionKind.SIGLIP
    mean = (source or {}).get("image_mean") or (ic.SIGLIP_MEAN if siglip else ic.OPENAI_CLIP_MEAN)
    std = (source or {}).get("image_std") or (ic.SIGLIP_STD if siglip else ic.OPENAI_CLIP_STD)
    s = cfg.vision.image_size
    d = dict(do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255,
             do_normalize=True, image_mean=list(mean), image_std=list(std),
             do_convert_rgb=True)  # fmt: skip
    pinpoints = [list(p) for p in cfg.image_grid_pinpoints or ()]
    if cfg.family == Family.LLAVA:
        d.update(image_processor_type="LlavaImageProcessor", size={"shortest_edge": s},
                 crop_size={"height": s, "width": s}, do_center_crop=True, do_pad=True)  # fmt: skip
    elif cfg.family == Family.LLAVA_NEXT:
        d.update(image_processor_type="LlavaNextImageProcessor", size={"shortest_edge": s},
                 crop_size={"height": s, "width": s}, do_center_crop=True,
                 image_grid_pinpoints=pinpoints)  # fmt: skip
    else:
        d.update(image_processor_type="LlavaOnevisionImageProcessor",
                 size={"height": s, "width": s}, do_center_crop=False,
                 image_grid_pinpoints=pinpoints)  # fmt: skip
    return d


# -- assembling -------------------------------------------------------------------------------


_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")


def _vision_source_key(key: str, num_layers: int) -> str | None:
    """A vision checkpoint key in the llava-hf spelling, or None for a tensor not used.

    Not used: the other tower of a two-tower model (text_model.*, logit_scale, projections),
    SigLIP's pooling head, and layers past the recipe's `num_layers`.
    """
    if not key.startswith("vision_model.") or key.startswith("vision_model.head."):
        return None
    layer = _LAYER.match(key)
    if layer and int(layer[1]) >= num_layers:
        return None
    return "vision_tower." + key


def assemble(
    vision_dir: str | os.PathLike,
    llm_dir: str | os.PathLike,
    recipe: LlavaConfig,
    out_dir: str | os.PathLike,
    *,
    image_processor_dir: str | os.PathLike | None = None,
    seed: int = 0,
    allow_pickle: bool = False,
    projector_from: str | os.PathLike | None = None,
) -> LlavaConfig:
    """Writes a llava-jax model dir from a vision tower, an LLM and the recipe's model config.

    Args:
      vision_dir: HF CLIP / SigLIP (vision) model dir.
      llm_dir: HF Llama / Mistral / Qwen2 causal-LM dir, with its tokenizer.
      recipe: the model config the recipe trains (`config_loader.model_config`).
      out_dir: the model dir to create (must not exist, or be empty).
      image_processor_dir: where the image processor's mean / std come from (read where
        transformers reads them: `find_processor_dict`); default the vision dir's, if it has one.
      seed: seed of the connector / image_newline initialisation.
      allow_pickle: also read `.bin` / `.pt` weights.
      projector_from: a connector checkpoint loaded over the fresh connector
        (see `load_projector`).

    Returns:
      The config written.
    """
    from llava_jax.conversion.hf_to_jax import hf_to_params
    from llava_jax.data.prompt import load_tokenizer
    from llava_jax.model_io import save_model_dir

    out = epath.Path(out_dir)  # local or gs://
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: exists and is not empty; refusing to overwrite")
    raw = read_parts(vision_dir, llm_dir)
    layers = raw.vision.get("num_hidden_layers", recipe.vision.num_hidden_layers)
    if layers > recipe.vision.num_hidden_layers:  # OneVision keeps 26 of SigLIP's 27 layers
        raw.vision["num_hidden_layers"] = recipe.vision.num_hidden_layers
    parts = parts_config(raw, recipe.family)
    tokenizer = load_tokenizer(llm_dir)
    added, old_tokens = add_media_tokens(tokenizer, recipe.family)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    video_id = None
    if recipe.family == Family.LLAVA_ONEVISION:
        video_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    cfg = assembled_config(recipe, parts, image_id, video_id)
    rows, old_rows = cfg.text.vocab_size, parts.text.vocab_size
    if len(tokenizer) > rows or old_rows > rows:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens with the media tokens and the LLM "
            f"{old_rows} embedding rows; the recipe's vocab_size {rows} must hold both"
        )
    new_ids = tokenizer.convert_tokens_to_ids(added)

    fresh = fresh_params(cfg, seed)
    with (
        CheckpointReader(vision_dir, allow_pickle=allow_pickle) as vision,
        CheckpointReader(llm_dir, allow_pickle=allow_pickle) as llm,
    ):
        sources: dict[str, tuple[Callable[[], np.ndarray], tuple[int, ...]]] = {}
        # transformers 5 saves a bare *VisionModel without the `vision_model.` level.
        bare = not any(k.startswith("vision_model.") for k in vision.keys())
        for key in vision.keys():
            name = _vision_source_key("vision_model." * bare + key, cfg.vision.num_hidden_layers)
            if name is not None and canonical_key(name) is not None:
                sources[name] = (lambda k=key: vision.read(k), vision.shape(key))
        for key in llm.keys():
            canon = canonical_key(key)
            if canon in (EMBED, LM_HEAD):
                shape = (rows, llm.shape(key)[1])
                resize = lambda k=key: mean_resized(llm.read(k), rows, old_tokens, new_ids)  # noqa: E731
                sources[key] = (resize, shape)
            else:
                sources[key] = (lambda k=key: llm.read(k), llm.shape(key))
        for key, value in fresh.items():
            sources[key] = (lambda v=value: v, value.shape)
        params = hf_to_params(
            cfg,
            list(sources),
            lambda k: sources[k][1],
            lambda k: sources[k][0](),
            np.dtype(_np_dtype(cfg.run.param_dtype)),
        )
    if projector_from:
        params = load_projector(projector_from, params, allow_pickle=allow_pickle)

    with tempfile.TemporaryDirectory(prefix=".init-assets-") as tmp:
        assets = Path(tmp)
        tokenizer.save_pretrained(assets)
        from llava_jax.media.processor_config import find_processor_dict

        source_dir = Path(image_processor_dir or vision_dir)
        try:
            source = find_processor_dict(source_dir, "image_processor")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if image_processor_dir and source is None:
            raise CheckpointError(
                f"{source_dir}: no image processor (preprocessor_config.json, or "
                "processor_config.json with an image_processor entry)"
            )
        proc = processor_json(cfg, source and source.settings)
        (assets / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n")
        for name in _LLM_ASSETS:
            if (Path(llm_dir) / name).is_file():
                shutil.copy2(Path(llm_dir) / name, assets / name)
        _check_processor(assets, cfg)
        files = sorted(p.name for p in assets.iterdir() if p.is_file())
        save_model_dir(out, cfg, params, assets_from=assets, asset_files=files)
    return cfg


def _check_processor(assets: Path, cfg: LlavaConfig) -> None:
    from llava_jax.media.processor_config import ImageProcessorConfig

    ImageProcessorConfig.from_pretrained(assets, cfg)  # raises if views would not fit


def _np_dtype(name: str):
    import ml_dtypes

    table = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
    if name not in table:
        raise ConfigError(f"param_dtype {name!r}: choose one of {sorted(table)}")
    return table[name]


# -- stage 2 from a connector-only checkpoint --------------------------------------------------


def load_projector(
    path: str | os.PathLike, params: Mapping[str, Any], *, allow_pickle: bool = False
) -> dict[str, Any]:
    """`params` with the connector (and image_newline, if present) replaced from `path`.

    Args:
      path: a connector file (`mm_projector.bin` with `model.mm_projector.0.weight` ...,
        only with allow_pickle; or `.safetensors`, original or HF spelling), a dir holding
        one, or a llava-jax model dir (its connector is taken).
      params: flat {"a/b/c": array} of the model to update.
      allow_pickle: accept pickled `.bin` / `.pt` files.

    Returns:
      A new flat dict; every connector parameter replaced, shapes and names checked.
    """
    path = Path(path)
    targets = [p for p in params if p.startswith("multi_modal_projector/")]
    if not targets:
        raise CheckpointError("load_projector: the model has no multi_modal_projector parameters")
    out = dict(params)
    if is_model_dir(path):
        stored = load_params(path)
        for p in targets + (["image_newline"] if "image_newline" in stored else []):
            if p not in stored or tuple(stored[p].shape) != tuple(np.shape(params.get(p))):
                got = None if p not in stored else tuple(stored[p].shape)
                raise CheckpointError(f"{path}: connector {p} has shape {got}, the model needs "
                                      f"{tuple(np.shape(params.get(p)))}")  # fmt: skip
            out[p] = np.asarray(stored[p]).astype(np.asarray(params[p]).dtype)
        return out
    if not path.exists():
        raise CheckpointError(f"{path}: no such projector checkpoint")
    with tempfile.TemporaryDirectory(prefix=".projector-") as tmp:
        if path.is_file():  # the reader takes a dir: give it one holding just this file
            os.symlink(path.absolute(), Path(tmp) / path.name)
            reader_dir = Path(tmp)
        else:
            reader_dir = path
        with CheckpointReader(reader_dir, allow_pickle=allow_pickle) as reader:
            by_canon = {}
            for key in reader.keys():
                canon = canonical_key(key)
                if canon is None:
                    continue
                if not (canon.startswith("multi_modal_projector.") or canon == "image_newline"):
                    raise CheckpointError(f"{path}: tensor {key!r} is not part of the connector")
                by_canon[canon] = key
            wanted = targets + (["image_newline"] if "image_newline" in by_canon else [])
            used = set()
            for p in wanted:
                if p not in params:
                    raise CheckpointError(f"{path}: has image_newline, the model has none")
                rule = rule_for(p, tuple(np.shape(params[p])))
                if rule.hf not in by_canon:
                    raise CheckpointError(f"{path}: no tensor for {p} (expected {rule.hf!r})")
                key = by_canon[rule.hf]
                value = rule.transform.to_jax(reader.read(key))
                if value.shape != tuple(np.shape(params[p])):
                    raise CheckpointError(
                        f"{path}: tensor {key!r} gives {p} the shape {value.shape}; the model "
                        f"needs {tuple(np.shape(params[p]))}"
                    )
                out[p] = value.astype(np.asarray(params[p]).dtype)
                used.add(rule.hf)
            unused = sorted(set(by_canon) - used)
            if unused:
                raise CheckpointError(f"{path}: tensors not used by the model: {unused[:5]}")
    return out
