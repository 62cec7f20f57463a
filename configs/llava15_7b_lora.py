"""LLaVA-1.5 stage 2 with LoRA: connector fully trained, LLM through rank-128 adapters.

`--config=configs/llava15_7b_lora.py` (7B) or `...py:13b`; append `,qlora` (e.g. `:7b,qlora`)
for QLoRA with the frozen LLM stored as nf4. Source: haotian-liu/LLaVA
`scripts/v1_5/finetune_lora.sh` (`--lora_enable True --lora_r 128 --lora_alpha 256
--mm_projector_lr 2e-5 --learning_rate 2e-4`, 16 per device x 4 GPUs x accumulation 2) and
`llava/train/train.py` (`find_all_linear_names`: every linear layer of the LLM; no vision
tower, no projector, no `lm_head`; `lora_dropout` 0.05, its default).

Weights: `init_from` the `llava-jax init` dir (CLIP + Vicuna-1.5) plus `projector_from` the
stage-1 `mm_projector.bin`. Data: `llava_v1_5_mix665k.json`, `pad` image mode. The run
ends by writing the merged model (adapters folded into the LLM) to `<workdir>/model`.
"""

from llava_jax.train.config_loader import CONNECTOR
from llava_jax.train.defaults import base_config, recipe_arg

SIZES = {"7b": "llava-1.5-7b", "13b": "llava-1.5-13b"}


def lora_config(preset: str, qlora: bool):
    """The reference's LoRA hyperparameters on `preset` (shared with llava15_task_lora.py)."""
    c = base_config()
    c.model.preset = preset
    c.data.template = "vicuna_v1"  # --version v1
    c.data.image_aspect_ratio = "pad"  # --image_aspect_ratio pad
    c.data.max_len = 2048  # --model_max_length 2048
    c.data.max_views = 1
    c.data.group_by_length = True  # --group_by_modality_length True
    c.train.trainable = CONNECTOR  # the LLM trains through its adapters only
    c.train.lora.rank = 128  # --lora_r 128
    c.train.lora.alpha = 256.0  # --lora_alpha 256
    c.train.lora.dropout = 0.05  # train.py's lora_dropout default
    c.train.lora.quantize = "nf4" if qlora else ""
    c.optimizer.lr = 2e-4  # --learning_rate 2e-4 (the adapters)
    c.optimizer.projector_lr = 2e-5  # --mm_projector_lr 2e-5
    c.optimizer.weight_decay = 0.0  # --weight_decay 0.
    c.optimizer.warmup_ratio = 0.03  # --warmup_ratio 0.03, cosine
    c.train.batch_size = 128  # 16 per device x 4 GPUs x accumulation 2
    c.train.num_epochs = 1.0
    c.mesh.fsdp = -1  # ZeRO-3 there
    return c


def parse(arg, recipe="llava15_7b_lora.py", default="7b"):
    """`SIZE` or `SIZE,qlora` -> (preset, qlora)."""
    size, _, mode = (arg or default).partition(",")
    recipe_arg(recipe, "size", size, SIZES)
    if mode:
        recipe_arg(recipe, "mode (after the comma)", mode, ["qlora"])
    return SIZES[size], mode == "qlora"


def get_config(arg=None):
    return lora_config(*parse(arg))
