"""LLaVA-1.5 stage 1 (feature alignment): train the mlp2x_gelu connector only.

`--config=configs/llava15_7b_pretrain.py` (7B) or `...py:13b` (13B: same hyperparameters,
the 13B preset). Source: haotian-liu/LLaVA `scripts/v1_5/pretrain.sh` and the README
"Hyperparameters" table.

Data: `blip_laion_cc_sbu_558k.json` with the `square` image mode (center crop); the data
pipeline's image mode is not a field of this config (see configs/README.md).
"""

from llava_jax.train.config_loader import CONNECTOR
from llava_jax.train.defaults import base_config, recipe_arg

SIZES = {"7b": "llava-1.5-7b", "13b": "llava-1.5-13b"}


def get_config(arg=None):
    size = recipe_arg("llava15_7b_pretrain.py", "size", arg, SIZES, default="7b")
    c = base_config()
    c.model.preset = SIZES[size]
    c.data.template = "plain"  # --version plain
    c.data.image_aspect_ratio = "crop"  # stage 1: `square`, i.e. center crop (`pretrain.sh` sets no
    # `--image_aspect_ratio`; `train.py`'s default `square` crops)
    c.data.max_len = 2048  # --model_max_length 2048
    c.data.max_views = 1  # one view per image
    c.data.group_by_length = False  # not set in pretrain.sh
    c.train.trainable = CONNECTOR  # --tune_mm_mlp_adapter True
    c.optimizer.lr = 1e-3  # --learning_rate 1e-3
    c.optimizer.vision_lr = 0.0  # CLIP frozen
    c.train.batch_size = 256  # 32 per device x 8 GPUs x accumulation 1
    c.train.num_epochs = 1.0
    c.mesh.fsdp = -1  # ZeRO-2 there; full sharding here
    return c
