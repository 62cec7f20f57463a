"""LLaVA-OneVision single-image stage: the whole model trains, the vision tower at 2e-6.

`:0.5b`, `:7b` (default) or `:72b`. Source: LLaVA-VL/LLaVA-NeXT
`scripts/train/finetune_si.sh` (and `scripts/train/README.md`): template `qwen_1_5`,
`mm_tunable_parts=mm_vision_tower,mm_mlp_adapter,mm_language_model`, LR 1e-5, vision LR 2e-6,
max length 32768, `anyres_max_9` with the (1x1)..(6x6) grid, global batch 256.
"""

from llava_jax.train.config_loader import EVERYTHING
from llava_jax.train.defaults import base_config

SIZES = ("0.5b", "7b", "72b")
# anyres_max_9: the base view + up to 6 x 6 crops go through the tower (the token budget of
# 9 crops is applied after it, by pooling).
MAX_VIEWS = 1 + 36


def onevision_finetune(arg, stage):
    """The SI / OV stage config for a size (the two stages differ only in their data)."""
    size = arg or "7b"
    if size not in SIZES:
        raise ValueError(f"onevision {stage}: size {size!r}; choose one of {list(SIZES)}")
    c = base_config()
    c.model.preset = f"llava-onevision-qwen2-{size}"
    if size == "72b":
        c.model.overrides.param_dtype = "bfloat16"  # bf16 master weights for the largest
    c.data.template = "qwen_1_5"
    c.data.max_len = 32768  # --model_max_length 32768
    c.data.max_views = MAX_VIEWS
    c.data.group_by_length = True  # --group_by_modality_length True (script; unverified)
    c.train.trainable = EVERYTHING
    c.optimizer.lr = 1e-5
    c.optimizer.vision_lr = 2e-6  # --mm_vision_tower_lr 2e-6
    c.train.batch_size = 256  # 7B: 1 x 2 x 128 GPUs; 72B: 1 x 1 x 256 GPUs
    return c


def get_config(arg=None):
    return onevision_finetune(arg, "si")
