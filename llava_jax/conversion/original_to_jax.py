"""An original repository's checkpoint directory -> llava-jax model directory.

The weights are the HF LLM's plus `model.mm_projector.*`, `model.image_newline` and the
tower under `model.vision_tower.vision_tower.*` (`mapping.canonical_key` folds these). LLaVA-1.5
freezes its tower and does not save it: `--vision DIR` supplies it then.

The original tokenizers have no `<image>` token (the code splices -200 into the ids,
`llava/constants.py`); it is added as a special token after the vocabulary, with `<video>`
for OneVision, as transformers' conversion scripts did. The prompt format, which the original
selects by `--conv-mode`, is recorded as the model's template when the tokenizer has no chat
template. The source config.json is kept as `assets/original_config.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from llava_jax.config import Family, LlavaConfig, VisionKind
from llava_jax.conversion.original_config import family_of, from_original_config, tower_kind
from llava_jax.conversion.tensor_io import CheckpointReader, read_config_json
from llava_jax.data import templates
from llava_jax.data.prompt import load_tokenizer
from llava_jax.errors import CheckpointError
from llava_jax.media.processor_config import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
)
from llava_jax.model_io import save_model_dir

_TOWER_PREFIX = "model.vision_tower.vision_tower."
_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")
# Modules of CLIP's and SigLIP's vision transformer; SigLIP's pooling `head` is not one.
_TOWER_MODULES = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def add_media_tokens(tokenizer, family: Family) -> tuple[int, int | None]:
    """(image id, video id) of `<image>` / `<video>`, added as special tokens when missing."""
    from tokenizers import AddedToken

    ids = []
    for token in ("<image>", "<video>") if family == Family.LLAVA_ONEVISION else ("<image>",):
        if token not in tokenizer.get_added_vocab():
            if token in tokenizer.get_vocab():
                raise CheckpointError(
                    f"the tokenizer has {token} as a text token, not a special one"
                )
            tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)])
        ids.append(tokenizer.convert_tokens_to_ids(token))
    return ids[0], ids[1] if len(ids) > 1 else None


def _vision_tensors(reader: CheckpointReader, cfg: LlavaConfig) -> dict[str, str]:
    """{checkpoint-style key: key in the --vision checkpoint} for the tower the model uses.

    A CLIPModel / SiglipModel stores the tower under `vision_model.` next to its text half and
    projections, which are not read; transformers 5 saves a bare vision model without it.
    """
    out = {}
    for key in reader.keys():
        name = key.removeprefix("vision_model.")
        if not name.startswith(_TOWER_MODULES):
            continue
        layer = _LAYER.match(name)
        if layer and int(layer.group(1)) >= cfg.vision.num_hidden_layers:
            continue  # the SigLIP layer LLaVA-NeXT deletes
        out[_TOWER_PREFIX + "vision_model." + name] = key
    return out


def _preprocessor_config(cfg: LlavaConfig, aspect_ratio: str) -> dict:
    """LLaVA-1.5's views: the tower's CLIP processor, after `expand2square` when "pad"
    (`llava/mm_utils.py::process_images`); NeXT and OneVision views follow from the config."""
    s = cfg.vision.image_size
    siglip = cfg.vision.kind == VisionKind.SIGLIP
    return {
        "image_processor_type": "LlavaImageProcessor",
        "do_pad": aspect_ratio == "pad",
        "size": {"shortest_edge": s},
        "crop_size": {"height": s, "width": s},
        "do_center_crop": True,
        "image_mean": list(SIGLIP_MEAN if siglip else OPENAI_CLIP_MEAN),
        "image_std": list(SIGLIP_STD if siglip else OPENAI_CLIP_STD),
    }


def convert_original_to_jax(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    vision_dir: str | os.PathLike | None = None,
    conv_mode: str | None = None,
    dtype: np.dtype | None = None,
    allow_pickle: bool = False,
) -> LlavaConfig:
    """Converts a haotian-liu/LLaVA or LLaVA-VL/LLaVA-NeXT checkpoint directory.

    Args:
      src_dir: directory with the original config.json, tokenizer and weights.
      out_dir: the model directory to write (must not exist or be empty).
      vision_dir: HF directory of the `mm_vision_tower` (config.json, weights).
      conv_mode: the original's conversation template name (e.g. "vicuna_v1").
      dtype: numpy dtype to cast the parameters to; None keeps the checkpoint's.
      allow_pickle: accept `.bin` / `.pt` weights (loaded with `weights_only=True`).

    Returns:
      The model config written.
    """
    from llava_jax.conversion.hf_to_jax import hf_to_params  # which dispatches here

    src = Path(src_dir)
    raw = read_config_json(src / "config.json", "a model directory")
    vision_raw = None
    if vision_dir is not None:
        vision_raw = read_config_json(Path(vision_dir) / "config.json", "a vision tower directory")
    tower_kind(raw)  # a one-line error for an unknown tower before the tokenizer loads
    family = family_of(raw)
    tokenizer = load_tokenizer(src)
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if conv_mode is None and not has_chat:
        raise CheckpointError(
            f"{src}: the tokenizer has no chat template; name the original's conversation "
            f"mode with --conv-mode, one of {', '.join(sorted(templates.TEMPLATES))}"
        )
    if conv_mode is not None:
        templates.get_template(conv_mode)  # raises on an unknown name
    image_id, video_id = add_media_tokens(tokenizer, family)
    cfg = from_original_config(raw, vision_raw, image_id, video_id)

    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(CheckpointReader(src, allow_pickle=allow_pickle))
        sources = {key: (reader, key) for key in reader.keys()}
        has_tower = any(key.startswith(_TOWER_PREFIX) for key in sources)
        if not has_tower:
            if vision_dir is None:
                raise CheckpointError(
                    f"{src}: the checkpoint holds no vision tower (LLaVA-1.5 does not save its "
                    f"frozen tower); pass --vision DIR with {raw['mm_vision_tower']}"
                )
            vision = stack.enter_context(CheckpointReader(vision_dir, allow_pickle=allow_pickle))
            sources.update({k: (vision, v) for k, v in _vision_tensors(vision, cfg).items()})
        params = hf_to_params(
            cfg,
            list(sources),
            lambda key: sources[key][0].shape(sources[key][1]),
            lambda key: sources[key][0].read(sources[key][1]),
            dtype,
        )

    with tempfile.TemporaryDirectory() as tmp:
        assets = Path(tmp)
        tokenizer.save_pretrained(assets)
        shutil.copy2(src / "config.json", assets / "original_config.json")
        if (src / "generation_config.json").is_file():
            shutil.copy2(src / "generation_config.json", assets / "generation_config.json")
        if cfg.family == Family.LLAVA:
            (assets / "preprocessor_config.json").write_text(
                json.dumps(_preprocessor_config(cfg, raw.get("image_aspect_ratio", "square")))
            )
        if conv_mode is not None:
            (assets / templates.TRAINED_TEMPLATE_FILE).write_text(
                json.dumps({"template": conv_mode}) + "\n"
            )
        names = [p.name for p in assets.iterdir() if p.is_file()]
        save_model_dir(out_dir, cfg, params, assets_from=assets, asset_files=names)
    return cfg
