"""The contracts between the data pipeline's stages and the train step.

A source yields `RawRecord`s; the sample transform turns one into an `Example` (with its
feature plan) or raises `SkipSample`; the batcher turns examples into a `Batch` of
fixed-shape NumPy arrays that the jitted train step takes. Skips are never silent: each
carries a reason from `SKIP_REASONS` and the record id, and the batcher adds the counts to
the batch that follows them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from llava_jax.config import LlavaConfig
from llava_jax.media import feature_plan
from llava_jax.media.feature_plan import Media, MediaLayout

# Why a record was skipped: the keys of the skip counters in the training metrics.
SKIP_REASONS = (
    "missing_file",  # an image or video file that does not exist
    "path_outside_root",  # an absolute path, `..`, or a link that leaves the image root
    "corrupt_image",  # undecodable, truncated, a format off the allow-list, a pixel bomb
    "bad_video",  # undecodable video, or too few frames
    "placeholder_mismatch",  # <image>/<video> placeholders vs the media the record lists
    "malformed_record",  # not an object, missing or ill-typed fields
    "empty_conversation",  # no turns, or an empty turn
    "unknown_role",  # a `from` other than human / gpt / system
    "no_supervised_tokens",  # nothing left to train on (e.g. the reference masker's mismatch)
    "too_long",  # cannot fit max_len (image tokens are never cut) or max_views
)


class SkipSample(Exception):
    """A record the pipeline cannot train on; counted under `reason` and logged with `id`."""

    def __init__(self, reason: str, detail: str, record_id: str = "?"):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{record_id}: {reason}: {detail}")
        self.reason, self.detail, self.record_id = reason, detail, record_id


@dataclasses.dataclass(frozen=True)
class NotAnObject:
    """`RawRecord.conversations` of a record that is not a JSON object: what it is instead."""

    what: str  # "a JSON list", "a JSON string '...'" (an unreadable JSONL line's cause)


def conversations_problem(conversations: Any) -> str:
    """Why `RawRecord.conversations` (known not to be a list) cannot be trained on."""
    if isinstance(conversations, NotAnObject):
        return f"not an object: {conversations.what}"
    if conversations is None:
        return "no conversations"
    return f"conversations is a {type(conversations).__name__}, not a list"


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One training sample as a source stores it, before any decoding.

    Attributes:
      id: the record's `id` (or `<source>:<index>` when it has none), for logs.
      conversations: the LLaVA `conversations` list, `[{"from": ..., "value": ...}, ...]`,
        not yet validated (None when the record has none; `NotAnObject` for a record
        that is not a JSON object).
      images: per image, its bytes (ArrayRecord, TFDS) or its path relative to `root`.
      videos: the same for videos.
      root: the image root that relative paths resolve against (None when all are bytes).
    """

    id: str
    conversations: Any
    images: tuple[bytes | str, ...] = ()
    videos: tuple[bytes | str, ...] = ()
    root: str | None = None


@dataclasses.dataclass(frozen=True)
class Example:
    """One sample with its feature plan, ready to batch (made by `Example.build`).

    Attributes:
      id: the record id.
      input_ids: int32[L], image/video tokens expanded to their exact counts.
      trained: bool[L], True where the token is a training target (assistant content).
      views: float32[V, S, S, 3] every image's views then every video's frames.
      media: the `feature_plan.Media` of each image / video, in record order.
      taps: int32[I, K] the sample's feature plan (`feature_plan.sample_plan`): indices into
        [image_newline, its own views' tokens], its image tokens first, then its video tokens.
      tap_weights: float32[I, K].
      num_image_tokens: how many of the first rows of `taps` are image tokens.
    """

    id: str
    input_ids: np.ndarray
    trained: np.ndarray
    views: np.ndarray
    media: tuple
    taps: np.ndarray
    tap_weights: np.ndarray
    num_image_tokens: int

    @classmethod
    def build(
        cls,
        cfg: LlavaConfig,
        id: str,
        input_ids: np.ndarray,
        trained: np.ndarray,
        views: np.ndarray,
        media: Sequence[Media],
        layouts: Sequence[MediaLayout] | None = None,
    ) -> Example:
        """The example with its feature plan, checked against its tokens and views.

        Runs in the sample transform (a Grain worker), so the batcher only offsets and pads.

        Args:
          cfg: the model config.
          id, input_ids, trained, views, media: as the attributes.
          layouts: `feature_plan.media_layouts(cfg, media)` when the caller has them.

        Raises:
          ValueError: the token or view counts disagree with the media (a transform bug).
        """
        layouts = feature_plan.given_layouts(cfg, media, layouts)
        taps, weights, n_image, n_video = feature_plan.sample_plan(cfg, media, None, layouts)
        ids = np.asarray(input_ids)
        found_image = int((ids == cfg.image_token_id).sum())
        found_video = 0 if cfg.video_token_id is None else int((ids == cfg.video_token_id).sum())
        if (found_image, found_video) != (n_image, n_video):
            raise ValueError(
                f"example {id}: has {found_image} image / {found_video} video tokens, "
                f"its media need {n_image} / {n_video}"
            )
        needed = sum(layout.num_views for layout in layouts)
        if len(views) != needed:
            raise ValueError(f"example {id}: has {len(views)} views, needs {needed}")
        if len(trained) != len(ids):
            raise ValueError(f"example {id}: trained and input_ids differ in length")
        # int32 / float32 as the batch holds them (the batcher's casts, done here, are exact
        # for the indices and the same rounding for the weights); half the bytes to pickle.
        return cls(id, input_ids, trained, views, tuple(media), taps.astype(np.int32),
                   weights.astype(np.float32), n_image)  # fmt: skip

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def num_media_tokens(self) -> int:
        return len(self.taps)


# The arrays of one batch (global shapes; each host holds its rows). B batch rows, T
# max_len, V max_views per row, S image size, I max image tokens per row, K taps per token.
BATCH_FIELDS = {
    "input_ids": "int32[B, T]; 0 at padding",
    "targets": "int32[B, T]; the token to predict at each position (next token, same segment)",
    "loss_mask": "float32[B, T]; 1 where `targets` is a trained token",
    "segment_ids": "int32[B, T]; 1, 2, ... per packed sample, 0 at padding",
    "positions": "int32[B, T]; restarting at 0 for each segment",
    "pixel_values": "float32[B, V, S, S, 3]; zeros for padded views",
    "view_mask": "bool[B, V]; True for real views",
    "taps": "int32[B, I, K]; the row's feature plan (see media/feature_plan.py)",
    "tap_weights": "float32[B, I, K]; 0 for padded image tokens",
}
