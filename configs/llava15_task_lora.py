"""Task LoRA: a finished LLaVA-1.5 finetuned on your own LLaVA-format JSON.

`--config=configs/llava15_task_lora.py` (7B) or `...py:13b`, `,qlora` for nf4 base weights.
Source: haotian-liu/LLaVA `scripts/v1_5/finetune_task_lora.sh`: the same LoRA settings as
`finetune_lora.sh` (rank 128, alpha 256, LR 2e-4, projector LR 2e-5, one epoch, 16 per
device x 8 GPUs), but starting from `liuhaotian/llava-v1.5-13b` rather than Vicuna plus a
stage-1 projector (docs/finetune.md).

Fill in: `init_from` (the finished model as a llava-jax model dir, e.g. `llava-jax convert
hf-to-jax llava-hf/llava-1.5-7b-hf`), `data.train` (your JSON), `data.image_root`.
"""

from pathlib import Path

from llava_jax.train.config_loader import load_module


def get_config(arg=None):
    lora = load_module(Path(__file__).with_name("llava15_7b_lora.py"))
    return lora.lora_config(*lora.parse(arg, "llava15_task_lora.py"))
