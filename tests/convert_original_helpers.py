"""Checkpoints of the original repositories (haotian-liu/LLaVA, LLaVA-VL/LLaVA-NeXT), written
for the tests of their conversion (tests/test_convert_original_*.py).

`write_original` takes a tiny random transformers model (tests/hf_tiny.py) and writes its
weights in the original layout (`model.layers.*`, `model.mm_projector.0/2`,
`model.vision_tower.vision_tower.vision_model.*`, `model.image_newline`) with an original
config (`LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM` / `LlavaQwenForCausalLM`, the LLM's
fields at the top level plus `mm_*`); LLaVA-1.5's tower is left out and given by `--vision`,
as the original does not save its frozen tower. `Converted` converts it both ways (original
and HF route); the session fixture `converted` in tests/conftest.py builds each once.
"""

from __future__ import annotations

import json
from pathlib import Path

import hf_tiny
import pytest
import torch
from convert_helpers import original_spelling

from llava_jax.checks.tiny_tokenizer import build_tiny_tokenizer
from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
from llava_jax.conversion.tensor_io import CheckpointWriter

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
        original_spelling(k): v.detach().numpy()
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


def one_line_error(exc, match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(exc, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value), f"error is not one line: {info.value}"
    return str(info.value)
