"""LLaVA-OneVision single-image stage: the whole model trains, the vision tower at 2e-6.

`:0.5b`, `:7b` (default) or `:72b`. Source: LLaVA-VL/LLaVA-NeXT
`scripts/train/finetune_si.sh` (and `scripts/train/README.md`): template `qwen_1_5`,
`mm_tunable_parts=mm_vision_tower,mm_mlp_adapter,mm_language_model`, LR 1e-5, vision LR 2e-6,
max length 32768, `anyres_max_9` with the (1x1)..(6x6) grid, global batch 256.

Placement: each size fits its slice in `TOPOLOGY` as shipped (`llava-jax plan --config
configs/onevision_si.py:SIZE --topology TOPOLOGY[SIZE]`, docs/scaling.md): FSDP over every
chip, full remat, `GRAD_ACCUM[size]` micro-batches of the global 256 rows of 32768 tokens,
so that 4 (0.5B), 2 (7B) or 1 (72B) rows sit on a chip at once. The 7B on 64 chips does
what the script does on 128 GPUs (1 row per device, 2 accumulation steps). On another slice
keep 256 / grad_accum a multiple of the chips and the rows per chip at most these
(`--config.optimizer.grad_accum=N`): the 7B on a v5p-256 (128 chips) with grad_accum 1 or
2, on a v5p-32 (16 chips) with 8 or 16; check with `llava-jax plan --memory-only`.
"""

from llava_jax.train.config_loader import EVERYTHING
from llava_jax.train.defaults import base_config, recipe_arg

SIZES = ("0.5b", "7b", "72b")
# anyres_max_9: the base view + up to 6 x 6 crops go through the tower (the token budget of
# 9 crops is applied after it, by pooling).
MAX_VIEWS = 1 + 36
# The slice each size is planned for (docs/scaling.md has the plan of each).
TOPOLOGY = {"0.5b": "v5p-32", "7b": "v5p-128", "72b": "v5p-512"}
# Micro-batches per step at 32768 tokens a row: 0.5B, 4 rows per chip (32 GB of 95 GiB);
# 7B, 2 rows per chip (39 GB); 72B, 1 row per chip (64 GB, bf16 weights and Adam moments).
GRAD_ACCUM = {"0.5b": 4, "7b": 2, "72b": 1}


def onevision_finetune(arg, stage):
    """The SI / OV stage config for a size (the two stages differ only in their data)."""
    size = recipe_arg(f"onevision_{stage}.py", "size", arg, SIZES, default="7b")
    c = base_config()
    c.model.preset = f"llava-onevision-qwen2-{size}"
    if size == "72b":
        c.train.param_dtype = "bfloat16"  # bf16 master weights for the largest
    # Splash attention keeps no [T, S] scores, so full remat stores a layer's input per row
    # (32768 x D in bf16); saving the matmul outputs would hold ~14x that.
    c.train.remat_policy = c.train.vision_remat_policy = "full"
    c.data.template = "qwen_1_5"
    c.data.max_len = 32768  # --model_max_length 32768
    c.data.max_views = MAX_VIEWS
    c.data.group_by_length = True  # --group_by_modality_length True (script; unverified)
    c.train.trainable = EVERYTHING
    c.optimizer.lr = 1e-5
    c.optimizer.vision_lr = 2e-6  # --mm_vision_tower_lr 2e-6
    c.train.batch_size = 256  # 7B: 1 x 2 x 128 GPUs; 72B: 1 x 1 x 256 GPUs
    c.optimizer.grad_accum = GRAD_ACCUM[size]  # the same 256 rows per optimizer step
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # ZeRO-3 there; FSDP over every chip
    return c


def get_config(arg=None):
    return onevision_finetune(arg, "si")
