"""The tiny random transformers models the tests compare against (see llava_jax.checks.tiny_hf)."""

from llava_jax.checks.tiny_hf import *  # noqa: F403
from llava_jax.checks.tiny_hf import CROP, IMAGE_TOKEN, OV_PINPOINTS, VIDEO_TOKEN  # noqa: F401
