"""The built-in tiny run: a tiny LLaVA trained from scratch on the synthetic shapes dataset.

`:stage1` (default; captions, `plain` template) or `:stage2` (questions, `vicuna_v1`). The
dataset comes from `llava_jax.train.shapes.write_shapes_dataset` (32 px images, a 72-token
word-level tokenizer with `<image>` = 4); the training command writes it into the workdir
and fills `data.train`, `data.image_root` and, for stage 2, `init_from` (the stage-1 model),
so they are left empty here.

The model is the `llava-1.5-7b` preset shrunk through `model.overrides`: a CLIP-like ViT
(2 layers, width 64, 8 px patches: 16 image tokens) and a LLaMA-like decoder (2 layers,
width 128), joined by the mlp2x_gelu connector. Unlike the paper recipes, every part trains
in stage 1: the parts are not pretrained, so stage 1 also teaches the decoder the captions'
language, and the vision tower has to learn its features. Stage 2 freezes the tower, as
the paper does, and sees each of its images once.
"""

from llava_jax.train import shapes
from llava_jax.train.config_loader import CONNECTOR, CONNECTOR_AND_LLM
from llava_jax.train.defaults import base_config

IMAGE_SIZE = 32
STAGES = {"stage1": "plain", "stage2": "vicuna_v1", "stage2-lora": "vicuna_v1"}
BUILTINS = {None: "stage2", "lora": "stage2-lora"}  # arg -> the built-in run's stage 2


def get_config(arg=None):
    """No arg: the whole built-in run (`llava-jax train` generates the data, trains both
    stages and takes the held-out exam; `config.shapes` sizes it); `lora`: the same with
    stage 2 through LoRA adapters. `stage1` / `stage2` / `stage2-lora`: one stage as a
    plain recipe (data.train, image_root and init_from to be filled in)."""
    builtin = arg in BUILTINS
    stage = "stage1" if builtin else arg
    if stage not in STAGES:
        choices = ", ".join(sorted([*STAGES, "lora"]))
        raise ValueError(f"shapes_tiny.py: {arg!r}; choose one of {choices}, or no argument")
    vocab = shapes.vocabulary()
    c = base_config()
    if builtin:
        c.builtin = "shapes"
        with c.unlocked():
            c.shapes = dict(
                num_stage1=3000,  # images with a caption, seen 3.5 times each
                num_stage2=36000,  # other images with 1-3 questions, seen once each
                num_val=200,  # held-out images, one question each
                image_size=IMAGE_SIZE,
                seed=0,
                target_accuracy=0.9,  # exit status 1 below it
                stage2=BUILTINS[arg],
            )
    c.model.preset = "llava-1.5-7b"
    c.train.dtype = "float32"  # CPU: bfloat16 matmuls are slower there
    c.train.remat_policy = c.train.vision_remat_policy = "none"
    with c.model.overrides.unlocked():
        c.model.overrides.image_token_id = vocab.index(shapes.IMAGE_TOKEN)
        c.model.overrides.vision = dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=8,
        )
        c.model.overrides.text = dict(
            vocab_size=-(-len(vocab) // 16) * 16,  # padded to a multiple of 16
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=32,
            max_position_embeddings=256,
            bos_token_id=vocab.index("<s>"),
            eos_token_id=vocab.index("</s>"),
            pad_token_id=vocab.index("<pad>"),
        )
    c.data.template = STAGES[stage]
    # 16 image tokens + a caption (< 40 tokens), or the system prompt and 1-3 turns (<= 92).
    c.data.max_len = 64 if stage == "stage1" else 96
    c.data.max_views = 1
    c.data.group_by_length = stage == "stage2"
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_ratio = 0.05
    c.train.batch_size = 32
    if stage == "stage1":
        # Perception and the captions' language from scratch: the vision tower trains too,
        # over a few passes of a small image set (held-out captions come out ~98% exact).
        c.train.trainable = ("vision_tower/.*", *CONNECTOR_AND_LLM)  # (llava: no image_newline)
        c.optimizer.vision_lr = 1e-3
        c.train.num_epochs = 3.5
    else:
        # As in the paper, stage 2 trains the connector and the LLM. Each image is seen once:
        # on a few thousand images seen again and again the decoder learns their answers by
        # heart instead of reading the picture (BENCHMARKS.md, the tiny run).
        c.train.trainable = CONNECTOR_AND_LLM
        c.train.num_epochs = 1.0
        c.train.batch_size = 16  # twice the updates of 32 for ~15% more time: +4 points
    if stage == "stage2-lora":
        # The LLM through rank-64 adapters on every linear (alpha 64: scale 1), the connector
        # in full, both at the full run's LR: 95.5% held-out (BENCHMARKS.md; rank 16 at 5e-3:
        # 34%, rank 64 at 2e-3: 71.5%).
        c.train.trainable = CONNECTOR
        c.train.lora.rank = 64
        c.train.lora.alpha = 64.0
    c.train.log_every = 20
    c.train.checkpoint_every = 200
    c.mesh.data = -1  # pure data parallelism: the model is tiny
    c.mesh.fsdp = 1
    return c
