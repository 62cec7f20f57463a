"""LLaVA-OneVision 72B, OneVision stage: `onevision_ov.py:72b` under its own name.

Planned for a v5p-512 as shipped (`onevision_si.py`: FSDP over 256 chips, one row each).
"""

from pathlib import Path

from llava_jax.train.config_loader import load_module
from llava_jax.train.defaults import recipe_arg


def get_config(arg=None):
    recipe_arg("onevision_72b_ov.py", "size", arg, ["72b"], default="72b")
    return load_module(Path(__file__).with_name("onevision_ov.py")).get_config("72b")
