"""The training config every recipe in `configs/` starts from.

A recipe is a Python file with `get_config(arg=None) -> ml_collections.ConfigDict` that
calls `base_config()` and changes what its paper changes. Every field a recipe may set is
here, with its default, so a typo in a recipe or on the command line is an error, not a
silently ignored setting (the dict is locked).
"""

from __future__ import annotations

from collections.abc import Collection

import ml_collections


def recipe_arg(recipe: str, what: str, arg: str | None, choices: Collection[str],
               default: str | None = None) -> str:  # fmt: skip
    """A recipe's `:ARG` (`--config=configs/X.py:ARG`), `default` when none is given; any
    other value is a one-line error naming the recipe and its choices."""
    value = arg or default
    if value not in choices:
        raise ValueError(f"{recipe}: {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # The model: a preset name (config.PRESETS) plus architecture field overrides (e.g.
    # `text.max_position_embeddings`), or `init_from` alone. How it runs is in `train`.
    c.model = ml_collections.ConfigDict()
    c.model.preset = ""  # e.g. "llava-1.5-7b"; "" = take the config of `init_from`
    c.model.overrides = ml_collections.ConfigDict()  # LlavaConfig fields
    # Where the weights come from: a llava-jax model dir (from `llava-jax init` or a
    # previous stage) or an HF dir; "" = random init (tests, the tiny run).
    c.init_from = ""
    # Stage 2 from a stage-1 connector only (`mm_projector.bin` or a llava-jax model dir
    # whose connector is taken): loaded over `init_from`.
    c.projector_from = ""

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # LLaVA JSON / JSONL, a YAML mixture, an ArrayRecord dir, or tfds:NAME
    c.data.image_root = ""  # where relative image / video paths resolve
    c.data.template = "vicuna_v1"  # a name from data/templates.py
    # "clean", or "reference": the original code's input ids and labels exactly (docs/data.md)
    c.data.masking = "clean"
    # LLaVA's `image_aspect_ratio` for single-image models: "crop" (square: resize + center
    # crop) or "pad" (pad to a square with the mean colour); "" = the model's processor config.
    c.data.image_aspect_ratio = ""
    c.data.video_frames = 8  # frames sampled uniformly from each video
    c.data.max_len = 2048  # T: tokens per row, image tokens included
    c.data.max_views = 1  # V: views (crops, frames) per row
    c.data.max_image_tokens = 0  # I per row; 0 = derive from the config's largest image
    c.data.packing = False  # several samples per row, attention confined to each
    c.data.group_by_length = False  # `group_by_modality_length`
    c.data.num_workers = 0  # Grain worker processes; 0 = in the main process
    c.data.seed = 0
    c.data.max_skip_fraction = 0.01  # stop when more records than this are skipped
    c.data.tfds_fields = ml_collections.ConfigDict()  # {id,image,conversations,...} -> feature

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.lr = 2e-5
    c.optimizer.vision_lr = 0.0  # 0 = vision tower frozen; OneVision: 2e-6
    c.optimizer.projector_lr = 0.0  # the connector's own LR (`mm_projector_lr`); 0 = `lr`
    c.optimizer.warmup_ratio = 0.03
    c.optimizer.schedule = "cosine"  # "cosine" or "constant"
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.grad_clip = 1.0
    c.optimizer.grad_accum = 1

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # global, per optimizer step (before grad_accum division)
    c.train.num_epochs = 1.0
    c.train.num_steps = 0  # > 0 overrides num_epochs
    # Regexes over parameter paths ("vision_tower/...", "multi_modal_projector/...",
    # "language_model/...", "image_newline"); everything else is frozen.
    c.train.trainable = ("multi_modal_projector/.*", "language_model/.*")
    c.train.seed = 0
    # LoRA / QLoRA (docs/training.md): rank 0 = off. With rank > 0 every linear kernel that
    # `modules` matches gets adapters (always trained) and stays frozen itself.
    c.train.lora = ml_collections.ConfigDict()
    c.train.lora.rank = 0
    c.train.lora.alpha = 16.0  # the update is scaled by alpha / rank
    c.train.lora.dropout = 0.0
    c.train.lora.modules = (r"language_model/layers/(self_attn|mlp)/\w+_proj/kernel",)
    c.train.lora.quantize = ""  # QLoRA: the frozen base kernels stored as int8, int4 or nf4
    # Positions of each row projected onto the vocabulary at once in the loss (0 = all):
    # float32 logits [B, T, V] never exist whole (OneVision: T = 8192, V = 152k).
    c.train.loss_chunk = 512
    # How the model runs (config.RunSettings; never saved with the model's architecture).
    c.train.dtype = "bfloat16"  # compute dtype
    c.train.param_dtype = "float32"  # master weights ("bfloat16" for the largest)
    # Rematerialisation of each layer (config.RematPolicy): "none", "full", "dots",
    # "dots_with_no_batch_dims"; the decoder's and the vision tower's apart.
    c.train.remat_policy = "full"
    c.train.vision_remat_policy = "full"
    c.train.scan_layers = True  # False unrolls layers (slower compiles; see config.py)
    c.train.attention_chunk = 2048  # queries per chunk of the XLA attention path; 0 = whole
    # Attention kernel (`nn/attention_kernels.py`): "auto" = Pallas splash on TPU, cuDNN flash
    # attention on GPU, XLA elsewhere, by the devices the step is compiled for; or "xla",
    # "splash", "cudnn". A run setting: it never changes the parameters or the numbers beyond
    # rounding, and is not written into the model's config.
    c.train.attention = "auto"
    # Vocabulary projection + cross-entropy (`nn/cross_entropy.py`): "auto" = "blockwise" on
    # TPU and GPU (vocabulary blocks at a time, custom backward), "chunked" elsewhere
    # (`loss_chunk` positions at a time), by the devices the step is compiled for.
    c.train.loss_impl = "auto"
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.keep_last = 2
    c.train.keep_every = 0  # also keep every Kth step's checkpoint; 0 = none
    c.train.max_nonfinite = 5  # consecutive non-finite steps before stopping

    # Mesh: -1 takes the devices the other axes leave.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    # A built-in end-to-end run that `llava-jax train` runs instead of one stage ("shapes":
    # configs/shapes_tiny.py); "" for a recipe.
    c.builtin = ""

    c.lock()
    return c
