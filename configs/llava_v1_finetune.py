"""LLaVA v1 (the original, not 1.5) stage 2: projector + LLM.

`:80k` (default; `llava_instruct_80k.json`, 1 epoch, `scripts/finetune.sh`) or `:full`
(`llava_instruct_158k.json`, 3 epochs, `scripts/finetune_full_schedule.sh`). Source:
haotian-liu/LLaVA `scripts/finetune.sh` and `scripts/finetune_full_schedule.sh`.
Architecture as in llava_v1_pretrain.py.
"""

from pathlib import Path

from llava_jax.train.config_loader import CONNECTOR_AND_LLM, load_module
from llava_jax.train.defaults import base_config, recipe_arg

EPOCHS = {"80k": 1.0, "full": 3.0}


def get_config(arg=None):
    schedule = recipe_arg("llava_v1_finetune.py", "schedule", arg, EPOCHS, default="80k")
    c = base_config()
    load_module(Path(__file__).with_name("llava_v1_pretrain.py")).v1_model(c)
    c.data.template = "vicuna_v1"  # --version v1
    c.data.max_len = 2048
    c.data.max_views = 1
    c.train.trainable = CONNECTOR_AND_LLM
    c.optimizer.lr = 2e-5
    c.train.batch_size = 128  # 16 per device x 8 GPUs
    c.train.num_epochs = EPOCHS[schedule]
    return c
