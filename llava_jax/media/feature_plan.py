"""Where each image token's feature comes from, computed on the host.

Every family's feature packing (transformers `pack_image_features` in `llava_next/` and
`llava_onevision/modeling_*.py`) is a fixed linear map from the projected view features to
the image tokens: LLaVA-1.5 copies the 576 tokens of its one view; NeXT
copies the base view, then the unpadded crop grid row by row with `image_newline` after each
row; OneVision also downsamples the grid bilinearly (anyres_max_N), gives a multi-image
sample one view + one newline per image, and pools each video frame 27x27 -> 14x14 with one
newline per video. Each token is written as K taps (index, weight); K is 1 for copies and 4
for bilinear families, so the device does one gather and one weighted sum with static shapes.

`media_layouts` works out each item's views, token count and AnyRes tiling once, in Python
arithmetic: token counts for the text, view counts for the pixels and the tiling for the
crops all read it, and `sample_plan` builds the taps from it (and checks their number).

Index space of one sample: `image_newline` -> 0; view v, token p -> 1 + v * P + p. (The
newline comes first so that no index depends on how many views the batch is padded to.)
Order: all image tokens in image order, then all video tokens (as HF fills them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from llava_jax.config import Convention, Family, LlavaConfig
from llava_jax.media import anyres

NEWLINE = 0  # tap index of `image_newline`; view tokens start at 1


@dataclasses.dataclass(frozen=True)
class Media:
    """One image or video of a sample, as the preprocessor saw it."""

    kind: Literal["image", "video"]
    image_hw: tuple[int, int] = (0, 0)  # original (height, width) of an image
    num_frames: int = 0  # frames of a video

    @classmethod
    def image(cls, height: int, width: int) -> Media:
        return cls("image", (int(height), int(width)))

    @classmethod
    def video(cls, num_frames: int) -> Media:
        return cls("video", num_frames=int(num_frames))


@dataclasses.dataclass(frozen=True)
class FeaturePlan:
    """The model's image-feature inputs for one batch.

    Attributes:
      taps: int32[B, I, K] indices into [image_newline, the sample's V*P view tokens].
      weights: float32[B, I, K].
      num_image_tokens: per sample, how many image-token positions the text must have.
      num_video_tokens: per sample, the same for video tokens.
      num_views: per sample, how many views (crops, frames) its pixel rows hold.
    """

    taps: np.ndarray
    weights: np.ndarray
    num_image_tokens: tuple[int, ...]
    num_video_tokens: tuple[int, ...]
    num_views: tuple[int, ...]


def num_taps(cfg: LlavaConfig) -> int:
    """Taps per token: bilinear resampling (OneVision) needs 4, copies need 1."""
    return 4 if cfg.family == Family.LLAVA_ONEVISION else 1


@dataclasses.dataclass(frozen=True)
class MediaLayout:
    """One media item's geometry, worked out once: the views it takes and the tokens it fills.

    Attributes:
      media: the item.
      num_views: views the preprocessor makes of it (base view + crops, or frames).
      num_tokens: image (or video) tokens it fills: its length in the feature plan.
      anyres: the AnyRes tiling (grid, unpad, anyres_max resize) of a tiled image, else None.
    """

    media: Media
    num_views: int
    num_tokens: int
    anyres: anyres.AnyresLayout | None = None


def _uses_anyres(cfg: LlavaConfig, media: Media, images_in_sample: int) -> bool:
    if media.kind != "image" or cfg.family == Family.LLAVA:
        return False
    # OneVision treats a sample with several images as multi-image: one view each
    # (HF `batch_num_images`; orig-NeXT train.py).
    return cfg.family == Family.LLAVA_NEXT or images_in_sample == 1


def _anyres_layout(cfg: LlavaConfig, image_hw: tuple[int, int]) -> anyres.AnyresLayout:
    p, g = cfg.tokens_per_view, cfg.vision.patches_per_side
    if p != g * g:
        raise ValueError(
            f"AnyRes needs {g}x{g} tokens per view, but feature selection leaves {p}; "
            "check vision_feature_select_strategy"
        )
    max_patches = None
    if cfg.family == Family.LLAVA_ONEVISION:
        max_patches = anyres.parse_anyres_max(cfg.vision_aspect_ratio or "anyres")
    return anyres.anyres_layout(
        image_hw,
        cfg.image_grid_pinpoints,
        cfg.vision.image_size,
        g,
        max_num_patches=max_patches,
        rounding="int" if cfg.convention == Convention.ORIGINAL else "round",
    )


def media_layout(cfg: LlavaConfig, media: Media, images_in_sample: int = 1) -> MediaLayout:
    """`media`'s views and tokens, in Python arithmetic (no tap array is built).

    Args:
      cfg: the model config.
      media: the item.
      images_in_sample: images in its sample; for OneVision, more than one makes each image
        a single view.
    """
    if media.kind == "video":
        pooled = anyres.pooled_tokens_per_side(cfg.vision.patches_per_side)
        return MediaLayout(media, media.num_frames, media.num_frames * pooled**2 + 1)
    if _uses_anyres(cfg, media, images_in_sample):
        layout = _anyres_layout(cfg, media.image_hw)
        rows, cols = layout.grid
        return MediaLayout(media, 1 + rows * cols, layout.num_tokens, layout)
    return MediaLayout(media, 1, cfg.tokens_per_view + int(cfg.has_image_newline))


def media_layouts(cfg: LlavaConfig, media: Sequence[Media]) -> tuple[MediaLayout, ...]:
    """The layout of each item of one sample, in the order given."""
    n_images = sum(m.kind == "image" for m in media)
    return tuple(media_layout(cfg, m, n_images) for m in media)


def given_layouts(
    cfg: LlavaConfig, media: Sequence[Media], layouts: Sequence[MediaLayout] | None
) -> tuple[MediaLayout, ...]:
    """`layouts` when a caller worked them out already (checked to be `media`'s), else
    `media_layouts(cfg, media)`: the one place an optional `layouts` argument resolves."""
    if layouts is None:
        return media_layouts(cfg, media)
    if [layout.media for layout in layouts] != list(media):
        raise ValueError("layouts are not those of the media given")
    return tuple(layouts)


def num_views(cfg: LlavaConfig, media: Media, images_in_sample: int = 1) -> int:
    """How many views (crops or frames) the preprocessor produces for `media`."""
    return media_layout(cfg, media, images_in_sample).num_views


def num_tokens(cfg: LlavaConfig, media: Media, images_in_sample: int = 1) -> int:
    """How many image (or video) tokens `media` fills: its length in the feature plan."""
    return media_layout(cfg, media, images_in_sample).num_tokens


def _copy(indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    taps = np.zeros((len(indices), k), np.int64)
    weights = np.zeros((len(indices), k), np.float64)
    taps[:, 0], weights[:, 0] = indices, 1.0
    return taps, weights


def _bilinear(grid: np.ndarray, out_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """4-tap bilinear resampling of an index grid int[h, w] to out_hw (torch, no antialias)."""
    y0, y1, wy0, wy1 = anyres.bilinear_taps(grid.shape[0], out_hw[0])
    x0, x1, wx0, wx1 = anyres.bilinear_taps(grid.shape[1], out_hw[1])
    taps = np.stack(
        [grid[np.ix_(y0, x0)], grid[np.ix_(y0, x1)], grid[np.ix_(y1, x0)], grid[np.ix_(y1, x1)]],
        axis=-1,
    )
    weights = np.stack(
        [np.outer(wy0, wx0), np.outer(wy0, wx1), np.outer(wy1, wx0), np.outer(wy1, wx1)], axis=-1
    )
    return taps, weights


def _with_newlines(taps, weights) -> tuple[np.ndarray, np.ndarray]:
    """[h, w, K] grids -> [h * (w + 1), K] rows with a newline token closing each row."""
    h, _, k = taps.shape
    nl_taps, nl_weights = _copy(np.full(h, NEWLINE), k)
    taps = np.concatenate([taps, nl_taps[:, None]], axis=1).reshape(-1, k)
    weights = np.concatenate([weights, nl_weights[:, None]], axis=1).reshape(-1, k)
    return taps, weights


def _image_taps(cfg: LlavaConfig, layout: MediaLayout, first_view: int, k: int):
    p, g = cfg.tokens_per_view, cfg.vision.patches_per_side
    base = _copy(1 + first_view * p + np.arange(p), k)
    if layout.anyres is None:
        if not cfg.has_image_newline:
            return base
        nl = _copy(np.array([NEWLINE]), k)
        return np.concatenate([base[0], nl[0]]), np.concatenate([base[1], nl[1]])
    rows, cols = layout.anyres.grid
    # The crops tile a (rows*g, cols*g) grid; entry (y, x) is token (y%g, x%g) of crop
    # (y//g, x//g), which is view 1 + crop index.
    y, x = np.meshgrid(np.arange(rows * g), np.arange(cols * g), indexing="ij")
    grid = 1 + (first_view + 1 + (y // g) * cols + (x // g)) * p + (y % g) * g + (x % g)
    top, bottom, left, right = layout.anyres.unpad
    grid = grid[top:bottom, left:right]
    if layout.anyres.target_hw is not None:
        taps, weights = _bilinear(grid, layout.anyres.target_hw)
    else:
        taps, weights = _copy(grid.reshape(-1), k)
        taps, weights = taps.reshape(*grid.shape, k), weights.reshape(*grid.shape, k)
    taps, weights = _with_newlines(taps, weights)
    return np.concatenate([base[0], taps]), np.concatenate([base[1], weights])


def _video_taps(cfg: LlavaConfig, layout: MediaLayout, first_view: int, k: int):
    p, g = cfg.tokens_per_view, cfg.vision.patches_per_side
    pooled = anyres.pooled_tokens_per_side(g)
    parts = []
    for f in range(layout.num_views):
        grid = 1 + (first_view + f) * p + np.arange(g * g).reshape(g, g)
        taps, weights = _bilinear(grid, (pooled, pooled))
        parts.append((taps.reshape(-1, 4), weights.reshape(-1, 4)))
    parts.append(_copy(np.array([NEWLINE]), k))
    return np.concatenate([t for t, _ in parts]), np.concatenate([w for _, w in parts])


def sample_plan(
    cfg: LlavaConfig,
    media: Sequence[Media],
    max_views: int | None = None,
    layouts: Sequence[MediaLayout] | None = None,
):
    """Taps for one sample: (taps int[I, K], weights float64[I, K], image tokens, video tokens).

    Args:
      cfg: the model config.
      media: the sample's media in order of appearance.
      max_views: the most views the sample may take, checked if given.
      layouts: `media_layouts(cfg, media)` when the caller has them already.
    """
    if any(m.kind == "video" for m in media) and cfg.family != Family.LLAVA_ONEVISION:
        raise ValueError(f"family {cfg.family} has no video support")
    layouts = given_layouts(cfg, media, layouts)
    k = num_taps(cfg)
    # All image tokens first, then all video tokens (as HF fills them).
    ordered = [lo for lo in layouts if lo.media.kind == "image"]
    ordered += [lo for lo in layouts if lo.media.kind == "video"]
    views = sum(lo.num_views for lo in ordered)
    if max_views is not None and views > max_views:
        raise ValueError(f"sample needs {views} views but max_views is {max_views}")
    parts, counts, first = [], {"image": 0, "video": 0}, 0
    for layout in ordered:
        taps_of = _image_taps if layout.media.kind == "image" else _video_taps
        part = taps_of(cfg, layout, first, k)
        if len(part[0]) != layout.num_tokens:  # the layout's arithmetic and the taps disagree
            raise RuntimeError(f"{layout.media}: {len(part[0])} taps, {layout.num_tokens} tokens")
        parts.append(part)
        counts[layout.media.kind] += layout.num_tokens
        first += layout.num_views
    if not parts:
        return np.zeros((0, k), np.int64), np.zeros((0, k)), 0, 0
    taps = np.concatenate([t for t, _ in parts])
    weights = np.concatenate([w for _, w in parts])
    return taps, weights, counts["image"], counts["video"]


def build_feature_plan(
    cfg: LlavaConfig,
    batch_media: Sequence[Sequence[Media]],
    max_views: int | None = None,
    max_tokens: int | None = None,
    batch_layouts: Sequence[Sequence[MediaLayout] | None] | None = None,
) -> FeaturePlan:
    """The feature plan of a batch, padded to `max_tokens` image tokens per sample.

    Args:
      cfg: the model config.
      batch_media: per sample, its media in order of appearance.
      max_views: the V of the pixel_values array float[B, V, S, S, C], checked if given.
      max_tokens: the I to pad to; defaults to the batch maximum.
      batch_layouts: per sample, `media_layouts(cfg, media)` when the caller has them
        (None for a sample whose layouts are to be worked out here).
    """
    given = [None] * len(batch_media) if batch_layouts is None else batch_layouts
    layouts = [given_layouts(cfg, media, lo) for media, lo in zip(batch_media, given, strict=True)]
    plans = [
        sample_plan(cfg, media, max_views, lo)
        for media, lo in zip(batch_media, layouts, strict=True)
    ]
    longest = max([len(t) for t, *_ in plans] + [1])
    max_tokens = longest if max_tokens is None else max_tokens
    if longest > max_tokens:
        raise ValueError(f"a sample needs {longest} image tokens but max_tokens is {max_tokens}")
    k = num_taps(cfg)
    taps = np.zeros((len(plans), max_tokens, k), np.int32)
    weights = np.zeros((len(plans), max_tokens, k), np.float32)
    for b, (t, w, *_) in enumerate(plans):
        taps[b, : len(t)], weights[b, : len(t)] = t, w
    return FeaturePlan(
        taps=taps,
        weights=weights,
        num_image_tokens=tuple(p[2] for p in plans),
        num_video_tokens=tuple(p[3] for p in plans),
        num_views=tuple(sum(lo.num_views for lo in sample) for sample in layouts),
    )


def check_placeholders(cfg: LlavaConfig, input_ids: np.ndarray, plan: FeaturePlan) -> None:
    """Raises unless every row has exactly the image and video tokens its plan fills.

    JAX clamps out-of-range gathers silently, so this check on the host is what stands
    between a miscounted prompt and a wrong answer.
    """
    input_ids = np.asarray(input_ids)
    for b, row in enumerate(input_ids):
        found = int((row == cfg.image_token_id).sum())
        if found != plan.num_image_tokens[b]:
            raise ValueError(
                f"Image features and image tokens do not match in sample {b}: "
                f"tokens: {found}, features: {plan.num_image_tokens[b]}"
            )
        if cfg.video_token_id is not None:
            found = int((row == cfg.video_token_id).sum())
            if found != plan.num_video_tokens[b]:
                raise ValueError(
                    f"Video features and video tokens do not match in sample {b}: "
                    f"tokens: {found}, features: {plan.num_video_tokens[b]}"
                )
