"""LLaVA-OneVision stage 1: SigLIP + Qwen2, train the connector on BLIP-558K captions.

`:0.5b`, `:7b` (default) or `:72b`. Source: LLaVA-VL/LLaVA-NeXT
`scripts/train/pretrain_siglip.sh` (and `scripts/train/README.md`): template `plain`,
`mm_tunable_parts=mm_mlp_adapter`, LR 1e-3, max length 8192, square images (one view; the
image_newline is unused and frozen).
"""

from llava_jax.train.config_loader import CONNECTOR
from llava_jax.train.defaults import base_config

SIZES = ("0.5b", "7b", "72b")


def get_config(arg=None):
    size = arg or "7b"
    if size not in SIZES:
        raise ValueError(f"onevision stage 1: size {size!r}; choose one of {list(SIZES)}")
    c = base_config()
    c.model.preset = f"llava-onevision-qwen2-{size}"
    if size == "72b":
        c.model.overrides.param_dtype = "bfloat16"  # bf16 master weights for the largest
    c.data.template = "plain"
    c.data.max_len = 8192  # --model_max_length 8192
    c.data.max_views = 1  # square: one view
    c.train.trainable = CONNECTOR  # mm_tunable_parts=mm_mlp_adapter
    c.optimizer.lr = 1e-3
    c.optimizer.vision_lr = 0.0
    # 16 per device; the global batch is not stated in the script; 256 as LLaVA-1.5 stage 1.
    c.train.batch_size = 256
    return c
