"""LLaVA-OneVision 72B, OneVision stage: `onevision_ov.py:72b` under its own name.

Planned for a v5p-512 as shipped (`onevision_si.py`: FSDP over 256 chips, one row each).
"""

from pathlib import Path

from llava_jax.train.config_loader import load_module


def get_config(arg=None):
    if arg not in (None, "72b"):
        raise ValueError(f"onevision_72b_ov.py is the 72B recipe; got size {arg!r}")
    return load_module(Path(__file__).with_name("onevision_ov.py")).get_config("72b")
