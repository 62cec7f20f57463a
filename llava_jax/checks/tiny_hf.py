"""Tiny random transformers LLaVA models, built in-process (nothing is downloaded).

The parity reference of the test suite and of `llava-jax selfcheck`; needs torch.

Shapes are small but keep every structural feature: GQA, Qwen2 biases, tied embeddings,
CLS / no CLS, anyres grids with unpadding and the anyres_max downsample (g = 3 so that the
27 -> 14 video pooling analogue, 3 -> 2, is a real bilinear resample).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time warnings

import torch  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()  # save_pretrained's shard bar

VOCAB = 160
IMAGE_TOKEN = 150
VIDEO_TOKEN = 151
CROP = 42  # 3 x 3 patches of 14
NEXT_PINPOINTS = [[42, 84], [84, 42], [84, 84], [126, 42], [42, 126]]
OV_PINPOINTS = [[42 * i, 42 * j] for i in range(1, 7) for j in range(1, 7)]


# Shared by both towers: 3 x 3 patches of 14 px, so AnyRes grids and 3 -> 2 pooling are real.
_VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               image_size=CROP, patch_size=14)  # fmt: skip


def clip_config(**kw):
    return transformers.CLIPVisionConfig(**_VISION, projection_dim=16, **kw)


def siglip_config(**kw):
    return transformers.SiglipVisionConfig(**_VISION, vision_use_head=False, **kw)


def llama_config(kv_heads=2, kind="llama", **kw):
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig}[kind]
    return cls(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=12,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        **kw,
    )


def qwen2_config(kv_heads=2, tie=True, **kw):
    return transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_theta": 1_000_000.0, "rope_type": "default"},
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        **kw,
    )


def _randomise(model):
    # Random init leaves LayerNorm at (1, 0) and biases at 0, which would hide mapping
    # mistakes (a swapped weight/bias is invisible on identity values).
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def llava(kv_heads=2, feature_layer=-2, strategy="default"):
    torch.manual_seed(0)
    cfg = transformers.LlavaConfig(
        vision_config=clip_config(),
        text_config=llama_config(kv_heads),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=9,
    )
    return _randomise(transformers.LlavaForConditionalGeneration(cfg))


def llava_next(kv_heads=2, text_kind="llama", **text_kw):
    torch.manual_seed(0)
    cfg = transformers.LlavaNextConfig(
        vision_config=clip_config(),
        text_config=llama_config(kv_heads, text_kind, **text_kw),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=NEXT_PINPOINTS,
    )
    return _randomise(transformers.LlavaNextForConditionalGeneration(cfg))


def llava_onevision(kv_heads=2, tie=True):
    torch.manual_seed(0)
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=siglip_config(),
        text_config=qwen2_config(kv_heads, tie),
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        image_grid_pinpoints=OV_PINPOINTS,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=tie,
    )
    return _randomise(transformers.LlavaOnevisionForConditionalGeneration(cfg))


BUILDERS = {"llava": llava, "llava_next": llava_next, "llava_onevision": llava_onevision}


def save_llava_dir(out_dir: str | os.PathLike, model=None) -> Path:
    """A tiny LLaVA-1.5 checkpoint folder as `save_pretrained` writes one: the model (`llava()`
    unless given), the tiny tokenizer and the PIL image processor at the towers' crop; what
    tests and benchmarks pass as `--model HF_DIR`."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from llava_jax.checks.tiny_tokenizer import save_tiny_tokenizer

    out = Path(out_dir)
    (model or llava()).save_pretrained(out)
    save_tiny_tokenizer(out)
    crop = {"height": CROP, "width": CROP}
    LlavaImageProcessorPil(size={"shortest_edge": CROP}, crop_size=crop).save_pretrained(out)
    return out
