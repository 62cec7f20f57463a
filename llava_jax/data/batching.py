"""Examples -> fixed-shape batch arrays: right padding, sequence packing, length grouping.

Pure NumPy (no JAX): it runs on the host, after the Grain workers. Every batch has the
static shapes of a `BatchShape`, so the jitted train step compiles once. Each example
arrives with its own feature plan (`Example.build`, run in the worker by the sample
transform), so batching only offsets and pads.

A row holds one sample (`pad_batch`) or several (`pack_rows`). Packed samples are told
apart by `segment_ids` 1, 2, ... (0 is padding), which confine attention
(`nn/attention.py::causal_mask`); positions restart at 0 for each sample, and the row's
views are the views of its samples, concatenated. The model fills the n-th image token of a
row with the n-th row of `taps` and puts video tokens after all image tokens of the row
(`LlavaModel.embed`), so a row's taps are every sample's image tokens in order, then every
sample's video tokens, each with its view indices shifted past the views before it.

Axis legend: B batch rows, T max_len, V max_views per row, S image size, I max image tokens
per row, K taps per token, L one sample's length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from llava_jax.config import LlavaConfig
from llava_jax.data.schema import BATCH_FIELDS, Example, RawRecord
from llava_jax.media import feature_plan


@dataclasses.dataclass(frozen=True)
class BatchShape:
    """The static shapes of one host's batches (see `schema.BATCH_FIELDS`).

    Attributes:
      batch_size: B, rows per host (the global batch divided by the process count).
      max_len: T, tokens per row.
      max_views: V, views (crops, frames) per row.
      max_image_tokens: I, image + video tokens per row.
      image_size: S, the side of a view in pixels.
      taps_per_token: K (`feature_plan.num_taps(cfg)`).
    """

    batch_size: int
    max_len: int
    max_views: int
    max_image_tokens: int
    image_size: int
    taps_per_token: int

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if value < 1:
                raise ValueError(f"BatchShape.{name} must be at least 1, got {value}")

    @classmethod
    def for_model(
        cls, cfg: LlavaConfig, batch_size: int, max_len: int, max_views: int, max_image_tokens: int
    ) -> BatchShape:
        """The shape with the image size and taps per token that `cfg` implies."""
        return cls(
            batch_size,
            max_len,
            max_views,
            max_image_tokens,
            cfg.vision.image_size,
            feature_plan.num_taps(cfg),
        )


def fits_row(example: Example, shape: BatchShape) -> bool:
    """Whether the sample fits an empty row."""
    return (
        example.length <= shape.max_len
        and example.num_views <= shape.max_views
        and example.num_media_tokens <= shape.max_image_tokens
    )


class RowPacker:
    """Greedy first-fit of samples into the rows of one batch, in arrival order.

    Each sample goes into the first row with room for its tokens, views and image tokens;
    with `packing=False` every row takes one sample. `add` returns False when no row has
    room: the batch is then complete and the sample starts the next one.
    """

    def __init__(self, shape: BatchShape, packing: bool):
        self.shape, self.packing = shape, packing
        self.rows: list[list[Example]] = []
        self._used: list[list[int]] = []  # per row: tokens, views, media tokens

    @property
    def num_samples(self) -> int:
        return sum(len(r) for r in self.rows)

    @property
    def full(self) -> bool:
        """No further sample can join (only decided early without packing)."""
        return not self.packing and len(self.rows) == self.shape.batch_size

    def add(self, example: Example) -> bool:
        if not fits_row(example, self.shape):
            raise ValueError(f"example {example.id} does not fit an empty row")
        size = (example.length, example.num_views, example.num_media_tokens)
        limits = (self.shape.max_len, self.shape.max_views, self.shape.max_image_tokens)
        if self.packing:
            for row, used in zip(self.rows, self._used, strict=True):
                if all(u + s <= m for u, s, m in zip(used, size, limits, strict=True)):
                    row.append(example)
                    used[:] = [u + s for u, s in zip(used, size, strict=True)]
                    return True
        if len(self.rows) == self.shape.batch_size:
            return False
        self.rows.append([example])
        self._used.append(list(size))
        return True


def _fill_row(arrays: dict[str, np.ndarray], b: int, row: Sequence[Example], p: int):
    """Writes the samples of row `b` (segments 1..n) into the batch arrays."""
    t = v = 0
    image_taps, video_taps = [], []
    for segment, ex in enumerate(row, start=1):
        n = ex.length
        ids = np.asarray(ex.input_ids)
        trained = np.asarray(ex.trained, bool)
        arrays["input_ids"][b, t : t + n] = ids
        # Predict the next token of the same sample; the last token has no target.
        arrays["targets"][b, t : t + n - 1] = ids[1:]
        arrays["loss_mask"][b, t : t + n - 1] = trained[1:]
        arrays["segment_ids"][b, t : t + n] = segment
        arrays["positions"][b, t : t + n] = np.arange(n)
        arrays["pixel_values"][b, v : v + ex.num_views] = ex.views
        arrays["view_mask"][b, v : v + ex.num_views] = True
        # Index 0 is image_newline; view tokens move past the `v` views before this sample.
        taps = np.where(ex.taps > feature_plan.NEWLINE, ex.taps + v * p, ex.taps)
        split = ex.num_image_tokens
        image_taps.append((taps[:split], ex.tap_weights[:split]))
        video_taps.append((taps[split:], ex.tap_weights[split:]))
        t, v = t + n, v + ex.num_views
    i = 0
    for taps, weights in image_taps + video_taps:
        arrays["taps"][b, i : i + len(taps)] = taps
        arrays["tap_weights"][b, i : i + len(taps)] = weights
        i += len(taps)


def empty_batch(shape: BatchShape) -> dict[str, np.ndarray]:
    """All-padding arrays of every `BATCH_FIELDS` entry."""
    b, t, v, s = shape.batch_size, shape.max_len, shape.max_views, shape.image_size
    i, k = shape.max_image_tokens, shape.taps_per_token
    arrays = {
        "input_ids": np.zeros((b, t), np.int32),
        "targets": np.zeros((b, t), np.int32),
        "loss_mask": np.zeros((b, t), np.float32),
        "segment_ids": np.zeros((b, t), np.int32),
        "positions": np.zeros((b, t), np.int32),
        "pixel_values": np.zeros((b, v, s, s, 3), np.float32),
        "view_mask": np.zeros((b, v), bool),
        "taps": np.zeros((b, i, k), np.int32),
        "tap_weights": np.zeros((b, i, k), np.float32),
    }
    assert arrays.keys() == BATCH_FIELDS.keys()
    return arrays


def pack_rows(
    rows: Sequence[Sequence[Example]], shape: BatchShape, cfg: LlavaConfig
) -> dict[str, np.ndarray]:
    """The batch arrays of `rows`, each a list of examples packed into one row (rows beyond
    `len(rows)` are padding).

    Returns:
      {name: array} with exactly the `schema.BATCH_FIELDS`.
    """
    if len(rows) > shape.batch_size:
        raise ValueError(f"{len(rows)} rows do not fit batch_size {shape.batch_size}")
    arrays = empty_batch(shape)
    for b, row in enumerate(rows):
        used = (
            sum(e.length for e in row),
            sum(e.num_views for e in row),
            sum(e.num_media_tokens for e in row),
        )
        limits = (shape.max_len, shape.max_views, shape.max_image_tokens)
        if any(u > m for u, m in zip(used, limits, strict=True)):
            raise ValueError(
                f"row {b} needs (tokens, views, image tokens) {tuple(used)}; "
                f"the batch shape allows {limits}"
            )
        _fill_row(arrays, b, row, cfg.tokens_per_view)
    return arrays


def pad_batch(
    examples: Sequence[Example], shape: BatchShape, cfg: LlavaConfig
) -> dict[str, np.ndarray]:
    """One sample per row, right-padded to `shape` (see `pack_rows`)."""
    return pack_rows([[e] for e in examples], shape, cfg)


def first_fit_rows(examples: Sequence[Example], shape: BatchShape) -> list[list[list[Example]]]:
    """Greedy first-fit packing of `examples` in order: batches of rows of examples.

    The loader packs the same way, one batch at a time; examples that fit no empty row
    raise ValueError here (the loader counts them as `too_long`).
    """
    batches, packer = [], RowPacker(shape, packing=True)
    for e in examples:
        if not packer.add(e):
            batches.append(packer.rows)
            packer = RowPacker(shape, packing=True)
            packer.add(e)
    if packer.rows:
        batches.append(packer.rows)
    return batches


# -- length grouping (LLaVA's group_by_modality_length) --------------------------------------


def modality_length(record: RawRecord) -> tuple[int, bool]:
    """(word count of the conversation, has images or videos), as LLaVA's trainer measures.

    Malformed conversations count as length 1; the transform rejects them later.
    """
    words = 0
    if isinstance(record.conversations, list):
        for turn in record.conversations:
            value = turn.get("value") if isinstance(turn, dict) else None
            if isinstance(value, str):
                words += len(value.split())
    return max(words, 1), bool(record.images or record.videos)


def _length_grouped(lengths: np.ndarray, group: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation whose consecutive groups are each sorted longest first."""
    order = rng.permutation(len(lengths))
    chunks = [order[i : i + group] for i in range(0, len(order), group)]
    # Stable sort on negated lengths: ties keep the random order, deterministically.
    return np.concatenate(
        [c[np.argsort(-lengths[c], kind="stable")] for c in chunks] or [order]
    ).astype(np.int64)


def group_by_modality_length(
    lengths: Sequence[int], multimodal: Sequence[bool], global_batch_size: int, seed: int
) -> np.ndarray:
    """An epoch's order in which each global batch holds one modality, sorted by length.

    LLaVA's `get_modality_length_grouped_indices`: shuffle each modality, cut it into
    global batches sorted longest first (the strided host split `order[p::P]` then gives
    every host a similar share of long samples), shuffle the full batches of both
    modalities together, and put the two partial leftovers, mixed, at the end. (LLaVA moves
    the last batch of each modality to the end even when it is full; here only partial
    ones move.)

    Args:
      lengths: int[N] per record, e.g. the word counts of `modality_length`.
      multimodal: bool[N] per record, True when it has images or videos.
      global_batch_size: samples per global batch (all hosts together).
      seed: the same seed gives the same order.

    Returns:
      int64[N], a permutation of range(N).
    """
    lengths, multimodal = np.asarray(lengths), np.asarray(multimodal, bool)
    if lengths.shape != multimodal.shape or lengths.ndim != 1:
        raise ValueError(f"lengths {lengths.shape} and multimodal {multimodal.shape} differ")
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be at least 1, got {global_batch_size}")
    rng = np.random.default_rng(seed)
    full, leftovers = [], []
    for mask in (multimodal, ~multimodal):
        members = np.flatnonzero(mask)
        order = members[_length_grouped(lengths[members], global_batch_size, rng)]
        n_full = len(order) // global_batch_size * global_batch_size
        full += np.split(order[:n_full], n_full // global_batch_size) if n_full else []
        leftovers.append(order[n_full:])
    batches = [full[i] for i in rng.permutation(len(full))]
    leftover = np.concatenate(leftovers)
    batches.append(leftover[np.argsort(-lengths[leftover], kind="stable")])
    return np.concatenate(batches).astype(np.int64)
