"""Peak bf16 FLOP/s and memory of the accelerators we report MFU against.

Figures per chip from the Cloud TPU docs (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e) and
NVIDIA's H100 / H200 datasheets (989 TFLOP/s dense bf16). MFU is always divided by the peak
of the chip that ran (or would run) the step, and never compared across chips.
"""

from __future__ import annotations

import dataclasses

GIB = 1024**3
GB = 1000**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16_flops: float  # dense, per chip
    hbm_bytes: int


CHIPS = {
    "v4": Chip("TPU v4", 275e12, 32 * GIB),
    "v5e": Chip("TPU v5e", 197e12, 16 * GB),
    # Cloud TPU's v5p page: "HBM capacity per chip (GiB) 95" (older versions said "95GB").
    "v5p": Chip("TPU v5p", 459e12, 95 * GIB),
    "v6e": Chip("TPU v6e", 918e12, 32 * GB),
    "a100": Chip("A100 SXM 80GB", 312e12, 80 * GB),
    "h100": Chip("H100 SXM", 989e12, 80 * GB),
    "h200": Chip("H200 SXM", 989e12, 141 * GB),
}

# Substrings of `jax.Device.device_kind`, most specific first.
_DEVICE_KINDS = (
    ("v6 lite", "v6e"),
    ("v6e", "v6e"),
    ("v5 lite", "v5e"),
    ("v5e", "v5e"),
    ("v5p", "v5p"),
    ("tpu v5", "v5p"),
    ("tpu v4", "v4"),
    ("h200", "h200"),
    ("h100", "h100"),
    ("a100", "a100"),
)


def chip_of(device) -> Chip | None:
    """The chip of a `jax.Device` (or a device-kind string); None for CPUs and unknowns."""
    kind = (device if isinstance(device, str) else device.device_kind).lower()
    for needle, key in _DEVICE_KINDS:
        if needle in kind:
            return CHIPS[key]
    return None


def mfu(flops_per_step: float, step_seconds: float, num_chips: int, chip: Chip | None):
    """Model FLOPs utilisation in [0, 1], or None when the chip's peak is unknown."""
    if chip is None or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (num_chips * chip.peak_bf16_flops)
