"""LLaVA v1 (the original, not 1.5) stage 1: train the linear projector only.

Source: haotian-liu/LLaVA `scripts/pretrain.sh`: CLIP
ViT-L/14 at 224 px (layer -2), Vicuna-7B v1.3, a single Linear connector.

There is no preset for this model: it is the `llava-1.5-7b` preset with a 224 px tower, a
linear projector and Vicuna v1.3's (LLaMA-1) 2048 positions; the vocabulary stays 32064,
the HF llava layout `llava-jax init` writes (32000 + `<image>`, padded to 64).
"""

from llava_jax.train.config_loader import CONNECTOR
from llava_jax.train.defaults import base_config, recipe_arg


def v1_model(c):
    """Sets the LLaVA v1 architecture on `c.model` (shared with llava_v1_finetune.py)."""
    c.model.preset = "llava-1.5-7b"
    with c.model.overrides.unlocked():
        c.model.overrides.projector = "linear"
        c.model.overrides.vision = dict(image_size=224)
        c.model.overrides.text = dict(max_position_embeddings=2048)


def get_config(arg=None):
    recipe_arg("llava_v1_pretrain.py", "size", arg, ["7b"], default="7b")
    c = base_config()
    v1_model(c)
    c.data.template = "plain"  # --version plain
    c.data.max_len = 2048
    c.data.max_views = 1
    c.train.trainable = CONNECTOR  # --tune_mm_mlp_adapter True
    c.optimizer.lr = 2e-3  # --learning_rate 2e-3
    c.train.batch_size = 128  # 16 per device x 8 GPUs
    c.train.num_epochs = 1.0
    return c
