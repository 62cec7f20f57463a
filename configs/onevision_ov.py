"""LLaVA-OneVision OneVision stage: single images, multi-image and video, from the SI model.

`:0.5b`, `:7b` (default) or `:72b`. Source: LLaVA-VL/LLaVA-NeXT
`scripts/train/finetune_ov.sh` (and `docs/LLaVA_OneVision.md`): the SI hyperparameters on
`onevision.yaml`; multi-image samples are padded to one 729-token view each, videos take up
to 32 frames (`frames_upbound 32`), which fits in the 37 views of an anyres_max_9 image.

Placement: the SI stage's (`onevision_si.py`: `TOPOLOGY`, `GRAD_ACCUM`); the compiled shapes
are the same (256 rows of 32768 tokens and 37 views), so the SI plans hold for it.
"""

from pathlib import Path

from llava_jax.train.config_loader import load_module


def get_config(arg=None):
    si = load_module(Path(__file__).with_name("onevision_si.py"))
    c = si.onevision_finetune(arg, "ov")
    c.data.max_views = max(si.MAX_VIEWS, 32)  # frames_upbound 32
    return c
