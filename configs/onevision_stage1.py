"""LLaVA-OneVision stage 1: SigLIP + Qwen2, train the connector on BLIP-558K captions.

`:0.5b`, `:7b` (default) or `:72b`. Source: LLaVA-VL/LLaVA-NeXT
`scripts/train/pretrain_siglip.sh` (and `scripts/train/README.md`): template `plain`,
`mm_tunable_parts=mm_mlp_adapter`, LR 1e-3, max length 8192, square images (one view; the
image_newline is unused and frozen).

Placement: each size fits its slice in `TOPOLOGY` as shipped (`llava-jax plan --config
configs/onevision_stage1.py:SIZE --topology TOPOLOGY[SIZE]`, docs/scaling.md): FSDP over every
chip, full remat, and `GRAD_ACCUM[size]` micro-batches of the global 256 rows of 8192
tokens, so that 4 (0.5B on 16 GB v5e chips), 8 (7B) or 1 (72B) rows sit on a chip at once.
On another slice keep the rows of a micro-batch, 256 / grad_accum, a multiple of the chips,
and about as many rows per chip per micro-batch as HBM allows
(`--config.optimizer.grad_accum=N`; `llava-jax plan ... --search` tries them).
"""

from llava_jax.train.config_loader import CONNECTOR
from llava_jax.train.defaults import base_config, recipe_arg

SIZES = ("0.5b", "7b", "72b")
# The slice each size is planned for (docs/scaling.md has the plan of each).
TOPOLOGY = {"0.5b": "v5e-16", "7b": "v5p-32", "72b": "v5p-512"}
# Micro-batches per step: 0.5B, 16 rows per v5e chip need 16.6 GB (of 16), 4 rows 4.6 GB;
# 7B, 16 rows per v5p chip at 2 (28 GB of 95 GiB); 72B, 1 row per chip (256 chips).
GRAD_ACCUM = {"0.5b": 4, "7b": 2, "72b": 1}


def get_config(arg=None):
    size = recipe_arg("onevision_stage1.py", "size", arg, SIZES, default="7b")
    c = base_config()
    c.model.preset = f"llava-onevision-qwen2-{size}"
    if size == "72b":
        c.train.param_dtype = "bfloat16"  # bf16 master weights for the largest
    # Splash attention keeps no [T, S] scores, so a layer's saved input is what full remat
    # stores per row (8192 x D in bf16); saving the matmul outputs would hold ~14x that.
    c.train.remat_policy = c.train.vision_remat_policy = "full"
    c.data.template = "plain"
    c.data.max_len = 8192  # --model_max_length 8192
    c.data.max_views = 1  # square: one view
    c.train.trainable = CONNECTOR  # mm_tunable_parts=mm_mlp_adapter
    c.optimizer.lr = 1e-3
    c.optimizer.vision_lr = 0.0
    # 16 per device; the global batch is not stated in the script; 256 as LLaVA-1.5 stage 1.
    c.train.batch_size = 256
    c.optimizer.grad_accum = GRAD_ACCUM[size]  # the same 256 rows per optimizer step
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # ZeRO-3 there; FSDP over every chip
    return c
