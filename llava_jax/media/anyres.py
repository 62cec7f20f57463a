"""AnyRes image geometry, computed on the host: canvas, crop grid, unpad, token counts.

The one implementation shared by the data pipeline (which resizes, pads and crops pixels)
and the model's feature packing (which unpads, resizes and places features). Plain Python
ints and float64 only, so every count is exact and known before anything is traced.

Sizes are (height, width), the transformers order, and named `*_hw`. The original LLaVA
repos use PIL's (width, height) and read the same pinpoint lists as (width, height); to
reproduce them, transpose each pinpoint and pass `rounding="int"` (what a model converted from
an original checkpoint does: `Convention.ORIGINAL`, `convert/original_config.py`).

`tokens_per_side` (g) is the vision tower's patches per side of one crop: 24 for
CLIP-336, 27 for SigLIP-384.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

HW = tuple[int, int]
Rounding = Literal["round", "int"]

# transformers >= 4.47 rounds to 7 decimals before truncating, so that e.g. 49.99999999
# from float error becomes 50 (PRs #34522, #35779); the original repos truncate.
_TO_INT = {"round": lambda x: int(round(x, 7)), "int": int}


def select_best_resolution(image_hw: HW, pinpoints: Sequence[HW]) -> HW:
    """The pinpoint keeping the most image pixels, then wasting the fewest.

    Same arithmetic as `transformers.image_processing_utils.select_best_resolution`:
    on a full tie the earlier pinpoint wins, which makes the list order significant.

    Args:
        image_hw: original image (height, width).
        pinpoints: candidate canvases, each (height, width).

    Returns:
        The chosen canvas (height, width).
    """
    h, w = image_hw
    best, best_effective, best_wasted = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = ph * pw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(ph), int(pw)), effective, wasted
    if best is None:
        raise ValueError(f"select_best_resolution: no pinpoints given for image {image_hw}")
    return best


def resized_size_for_patching(image_hw: HW, target_hw: HW) -> HW:
    """Size of the image resized to fit `target_hw` with its aspect ratio kept.

    transformers' `get_patch_output_size`: the limiting side matches the target exactly,
    the other is rounded *up* and capped at the target.
    """
    h, w = image_hw
    target_h, target_w = target_hw
    scale_w, scale_h = target_w / w, target_h / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), target_h), target_w
    return target_h, min(math.ceil(w * scale_h), target_w)


def patching_padding(resized_hw: HW, target_hw: HW) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding centring the resized image on the canvas.

    The odd pixel goes to the bottom/right, as in transformers' `_get_padding_size`.
    """
    pad_h, pad_w = target_hw[0] - resized_hw[0], target_hw[1] - resized_hw[1]
    return pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2


def _grid_of(canvas_hw: HW, crop_size: int) -> HW:
    rows, rem_h = divmod(canvas_hw[0], crop_size)
    cols, rem_w = divmod(canvas_hw[1], crop_size)
    if rem_h or rem_w:
        # The crops would not tile the canvas, and the model's reshape would silently misplace
        # features; every released pinpoint list is a multiple of the crop size.
        raise ValueError(f"pinpoint {canvas_hw} is not a multiple of crop_size={crop_size}")
    return rows, cols


def anyres_grid_shape(image_hw: HW, pinpoints: Sequence[HW], crop_size: int) -> HW:
    """(rows, cols) of `crop_size` crops covering the chosen canvas."""
    return _grid_of(select_best_resolution(image_hw, pinpoints), crop_size)


def unpadded_shape(
    current_hw: HW, image_hw: HW, rounding: Rounding = "round"
) -> tuple[int, int, int, int]:
    """Slice bounds of a crop-grid feature map that hold the image, not the padding.

    Mirrors transformers' `unpad_image` (llava_onevision): the padding is removed
    symmetrically from the padded axis, so an odd remainder keeps one extra row/column.

    Args:
        current_hw: feature grid (rows * g, cols * g).
        image_hw: original image (height, width).
        rounding: "round" for transformers (`int(round(x, 7))`), "int" for the original
            repos and transformers <= 4.46 (`int(x)`).

    Returns:
        (top, bottom, left, right); keep `x[top:bottom, left:right]`.
    """
    if rounding not in _TO_INT:
        raise ValueError(f"unpadded_shape: rounding must be 'round' or 'int', found {rounding!r}")
    to_int = _TO_INT[rounding]
    cur_h, cur_w = current_hw
    h, w = image_hw
    if w / h > cur_w / cur_h:  # image wider than the canvas: padded above and below
        pad = (cur_h - to_int(h * (cur_w / w))) // 2
        return pad, cur_h - pad, 0, cur_w
    pad = (cur_w - to_int(w * (cur_h / h))) // 2
    return 0, cur_h, pad, cur_w - pad


def anyres_max_target(h: int, w: int, max_num_patches: int, tokens_per_side: int) -> HW | None:
    """OneVision `anyres_max_N` bilinear target for an unpadded (h, w) grid, or None.

    Shrinks towards N crops' worth of tokens only when over by more than 10%, so the cap
    is soft (up to 1.21 * N crops); float floor-division then int, as in transformers.
    """
    ratio = math.sqrt(h * w / (max_num_patches * tokens_per_side**2))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio)
    return None


def parse_anyres_max(vision_aspect_ratio: str) -> int | None:
    """N from "anyres_max_N"; None for plain "anyres" (LLaVA-NeXT, no resize)."""
    if vision_aspect_ratio == "anyres":
        return None
    # transformers uses str.strip("anyres_max_"), which accepts garbage; be strict.
    match = re.fullmatch(r"anyres_max_([1-9]\d*)", vision_aspect_ratio)
    if match is None:
        raise ValueError(
            f"vision_aspect_ratio: expected 'anyres' or 'anyres_max_N' with N >= 1, "
            f"found {vision_aspect_ratio!r}"
        )
    return int(match.group(1))


def bilinear_taps(
    in_size: int, out_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1-D taps of torch `interpolate(mode="bilinear", align_corners=False)` given `size`.

    out[i] = w0[i] * x[idx0[i]] + w1[i] * x[idx1[i]]. No antialias (torch's default, used
    by transformers and the original): downsampling reads two taps, not an area.
    The scale is in/out because transformers passes `size`, never `scale_factor`.

    Returns:
        (idx0, idx1) int64[out_size] and (w0, w1) float64[out_size].
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bilinear_taps: sizes must be >= 1, found {in_size} -> {out_size}")
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    idx0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - idx0, 0.0, 1.0)
    idx1 = np.minimum(idx0 + 1, in_size - 1)
    return idx0, idx1, 1.0 - w1, w1


@dataclasses.dataclass(frozen=True)
class AnyresLayout:
    """Geometry of one AnyRes image, from pixels to tokens.

    Attributes:
        image_hw: original image (height, width).
        canvas_hw: chosen pinpoint (height, width).
        resized_hw: image size inside the canvas before padding (pixels).
        grid: (rows, cols) of crops; the model sees 1 + rows * cols views.
        unpad: (top, bottom, left, right) kept from the (rows * g, cols * g) feature grid.
        target_hw: anyres_max bilinear target for the unpadded grid, None when not resized.
        num_tokens: base g * g + final h * w + one newline per final row.
    """

    image_hw: HW
    canvas_hw: HW
    resized_hw: HW
    grid: HW
    unpad: tuple[int, int, int, int]
    target_hw: HW | None
    num_tokens: int

    @property
    def unpadded_hw(self) -> HW:
        top, bottom, left, right = self.unpad
        return bottom - top, right - left

    @property
    def final_hw(self) -> HW:
        """Feature grid (h, w) after unpad and the optional resize, before newlines."""
        return self.target_hw if self.target_hw is not None else self.unpadded_hw


def anyres_layout(
    image_hw: HW,
    pinpoints: Sequence[HW],
    crop_size: int,
    tokens_per_side: int,
    max_num_patches: int | None = None,
    rounding: Rounding = "round",
) -> AnyresLayout:
    """Everything the pipeline and the packer need to know about one AnyRes image.

    Args:
        image_hw: original image (height, width), positive.
        pinpoints: candidate canvases (height, width), multiples of `crop_size`.
        crop_size: vision tower input side in pixels (336 or 384).
        tokens_per_side: g, patches per crop side (24 or 27).
        max_num_patches: N of "anyres_max_N" (OneVision); None for LLaVA-NeXT.
        rounding: unpad rounding, see `unpadded_shape`.

    Returns:
        The image's `AnyresLayout`.
    """
    if min(image_hw) < 1:
        raise ValueError(f"anyres_layout: image size must be positive, found {image_hw}")
    g = tokens_per_side
    canvas_hw = select_best_resolution(image_hw, pinpoints)
    rows, cols = _grid_of(canvas_hw, crop_size)
    unpad = unpadded_shape((rows * g, cols * g), image_hw, rounding)
    h, w = unpad[1] - unpad[0], unpad[3] - unpad[2]
    target_hw = None
    if max_num_patches is not None:
        target_hw = anyres_max_target(h, w, max_num_patches, g)
    final_h, final_w = target_hw if target_hw is not None else (h, w)
    return AnyresLayout(
        image_hw=tuple(image_hw),
        canvas_hw=canvas_hw,
        resized_hw=resized_size_for_patching(image_hw, canvas_hw),
        grid=(rows, cols),
        unpad=unpad,
        target_hw=target_hw,
        num_tokens=g * g + final_h * final_w + final_h,
    )


def num_image_tokens_next(
    image_hw: HW,
    pinpoints: Sequence[HW],
    crop_size: int,
    tokens_per_side: int,
    rounding: Rounding = "round",
) -> int:
    """LLaVA-NeXT image tokens: base + unpadded grid + one newline per row."""
    return anyres_layout(image_hw, pinpoints, crop_size, tokens_per_side, None, rounding).num_tokens


def num_image_tokens_onevision(
    image_hw: HW,
    pinpoints: Sequence[HW],
    crop_size: int,
    tokens_per_side: int,
    max_num_patches: int = 9,
) -> int:
    """OneVision single-image tokens: as NeXT, after the anyres_max_N resize."""
    return anyres_layout(
        image_hw, pinpoints, crop_size, tokens_per_side, max_num_patches
    ).num_tokens


def num_image_tokens_multi_image(tokens_per_side: int) -> int:
    """OneVision image in a multi-image sample: one square view + one newline (730)."""
    return tokens_per_side**2 + 1


def pooled_tokens_per_side(tokens_per_side: int) -> int:
    """Video frame grid side after the stride-2 bilinear pooling: ceil(g / 2)."""
    return -(-tokens_per_side // 2)


def num_video_tokens_onevision(num_frames: int, tokens_per_side: int) -> int:
    """OneVision video tokens: pooled grid per frame, one newline per video."""
    return num_frames * pooled_tokens_per_side(tokens_per_side) ** 2 + 1
