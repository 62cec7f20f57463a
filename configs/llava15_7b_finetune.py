"""LLaVA-1.5 stage 2 (visual instruction tuning): connector + LLM, vision tower frozen.

`--config=configs/llava15_7b_finetune.py` (7B) or `...py:13b` (13B: same hyperparameters,
the 13B preset). Source: haotian-liu/LLaVA `scripts/v1_5/finetune.sh` and the README
"Hyperparameters" table.

Weights: `init_from` the stage-1 model dir, or `init_from` the `llava-jax init` dir plus
`projector_from` the stage-1 `mm_projector.bin`. Data: `llava_v1_5_mix665k.json` with the
`pad` image mode (expand2square with the mean colour).
"""

from llava_jax.train.config_loader import CONNECTOR_AND_LLM
from llava_jax.train.defaults import base_config, recipe_arg

SIZES = {"7b": "llava-1.5-7b", "13b": "llava-1.5-13b"}


def get_config(arg=None):
    size = recipe_arg("llava15_7b_finetune.py", "size", arg, SIZES, default="7b")
    c = base_config()
    c.model.preset = SIZES[size]
    c.data.template = "vicuna_v1"  # --version v1
    # stage 2: expand2square with the mean colour (`finetune.sh`: `--image_aspect_ratio pad`)
    c.data.image_aspect_ratio = "pad"
    c.data.max_len = 2048  # --model_max_length 2048
    c.data.max_views = 1  # pad: one view per image
    c.data.group_by_length = True  # --group_by_modality_length True
    c.train.trainable = CONNECTOR_AND_LLM
    c.optimizer.lr = 2e-5  # --learning_rate 2e-5
    c.optimizer.vision_lr = 0.0  # CLIP frozen
    c.train.batch_size = 128  # 16 per device x 8 GPUs x accumulation 1
    c.train.num_epochs = 1.0
    c.mesh.fsdp = -1  # ZeRO-3 there
    return c
