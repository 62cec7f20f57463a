"""The built-in tiny run: a tiny LLaVA trained from scratch on the synthetic shapes dataset.

`:stage1` (default; captions, `plain` template) or `:stage2` (questions, `vicuna_v1`). The
dataset comes from `llava_jax.shapes.write_shapes_dataset` (32 px images, a 72-token
word-level tokenizer with `<image>` = 4); the training command writes it into the workdir
and fills `data.train`, `data.image_root` and, for stage 2, `init_from` (the stage-1 model),
so they are left empty here.

The model is the `llava-1.5-7b` preset shrunk through `model.overrides`: a CLIP-like ViT
(2 layers, width 64, 8 px patches: 16 image tokens) and a LLaMA-like decoder (2 layers,
width 128), joined by the mlp2x_gelu connector. Unlike the paper recipes, every part trains
in both stages: the parts are not pretrained, so stage 1 also teaches the decoder the
captions' language, and the vision tower has to learn its features.
"""

from llava_jax import shapes
from llava_jax.train.config_loader import CONNECTOR_AND_LLM
from llava_jax.train.defaults import base_config

IMAGE_SIZE = 32
STAGES = {"stage1": "plain", "stage2": "vicuna_v1"}


def get_config(arg=None):
    """No arg: the whole built-in run (`llava-jax train` generates the data, trains both
    stages and takes the held-out exam; `config.shapes` sizes it). `stage1` / `stage2`: one
    stage as a plain recipe (data.train, image_root and init_from to be filled in)."""
    stage = arg or "stage1"
    if stage not in STAGES:
        raise ValueError(f"shapes_tiny: stage {stage!r}; choose one of {sorted(STAGES)}")
    vocab = shapes.vocabulary()
    c = base_config()
    if arg is None:
        c.builtin = "shapes"
        with c.unlocked():
            c.shapes = dict(
                num_train=3000,  # training images (a caption and a conversation each)
                num_val=200,  # held-out images, one question each
                image_size=IMAGE_SIZE,
                seed=0,
                target_accuracy=0.9,  # exit status 1 below it
            )
    c.model.preset = "llava-1.5-7b"
    with c.model.overrides.unlocked():
        c.model.overrides.dtype = "float32"  # CPU: bfloat16 matmuls are slower there
        c.model.overrides.remat_policy = "none"
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
    # 16 image tokens + a caption (< 40 tokens), or the system prompt and 1-3 turns.
    c.data.max_len = 64 if stage == "stage1" else 128
    c.data.max_views = 1
    c.data.group_by_length = stage == "stage2"
    c.train.trainable = ("vision_tower/.*", *CONNECTOR_AND_LLM)  # (no image_newline in llava)
    c.optimizer.lr = 1e-3
    c.optimizer.vision_lr = 1e-3
    c.optimizer.warmup_ratio = 0.05
    c.train.batch_size = 32
    # Stage 1 teaches perception (captions name every shape, colour and place): give it
    # the longer schedule; stage 2 then only has to learn to answer.
    c.train.num_epochs = 3.5 if stage == "stage1" else 3.0
    c.train.log_every = 20
    c.train.checkpoint_every = 200
    c.mesh.data = -1  # pure data parallelism: the model is tiny
    c.mesh.fsdp = 1
    return c
