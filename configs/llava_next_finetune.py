"""LLaVA-NeXT (v1.6) AnyRes finetune: everything trains, the vision tower at lr 2e-6.

`:vicuna-7b` (default), `:vicuna-13b` or `:mistral-7b`. The v1.6 training scripts were not
released; what is known comes from the released `llava-v1.6-vicuna-*` config.json
(`liuhaotian/llava-v1.6-vicuna-7b` on the hub): `image_aspect_ratio anyres`, the 5 pinpoints,
`unfreeze_mm_vision_tower`, `mm_vision_tower_lr 2e-6`, `tokenizer_model_max_length 4096`.
LR, batch size and grouping follow the LLaVA-1.5 finetune (unverified for v1.6).
"""

from llava_jax.train.config_loader import EVERYTHING
from llava_jax.train.defaults import base_config, recipe_arg

VARIANTS = {
    "vicuna-7b": ("llava-v1.6-vicuna-7b", "vicuna_v1"),
    "vicuna-13b": ("llava-v1.6-vicuna-13b", "vicuna_v1"),
    "mistral-7b": ("llava-v1.6-mistral-7b", "mistral_instruct"),
}
# AnyRes views: the base view + the largest grid of the pinpoints (672x672 -> 2x2 crops).
MAX_VIEWS = 1 + 4


def get_config(arg=None):
    variant = recipe_arg("llava_next_finetune.py", "variant", arg, VARIANTS, default="vicuna-7b")
    preset, template = VARIANTS[variant]
    c = base_config()
    c.model.preset = preset
    c.data.template = template
    c.data.max_len = 4096  # tokenizer_model_max_length
    c.data.max_views = MAX_VIEWS
    c.data.group_by_length = True
    c.train.trainable = EVERYTHING  # unfreeze_mm_vision_tower; image_newline trains
    c.optimizer.lr = 2e-5
    c.optimizer.vision_lr = 2e-6  # mm_vision_tower_lr
    c.train.batch_size = 128
    return c
