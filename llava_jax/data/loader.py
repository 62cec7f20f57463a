"""The Grain training pipeline: order -> host shard -> transform -> batch, checkpointable.

    source (all records, every host)
      -> epoch order: seeded shuffle, or LLaVA's modality/length grouping
      -> repeat for `num_epochs` (a new order each epoch), cut at num_epochs * N records
      -> this host's shard: global positions p, p + P, p + 2P, ...
      -> transform (in `num_workers` processes): an `Example` with its feature plan, or a
         `Skipped` sentinel for a SkipSample
      -> batcher (main process): counts and logs skips, pads or packs into `BatchShape`

The batcher runs after `mp_prefetch`, so batches do not depend on the worker count's slicing
(grain's `mp_prefetch` docstring, `_src/python/dataset/dataset.py`: with filtering or
stateful transforms before it, its output "may change if `num_workers` is changed"), and it
is the only stateful stage: its state is the upstream state from before the one sample it
holds over (packing) plus the running totals, so a restored iterator re-reads that sample
and yields exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags as absl_flags

from llava_jax.config import LlavaConfig
from llava_jax.data import batching
from llava_jax.data.batching import BatchShape
from llava_jax.data.schema import SKIP_REASONS, Example, RawRecord, SkipSample

logger = logging.getLogger("llava_jax.data")


@dataclasses.dataclass(frozen=True)
class Skipped:
    """What a worker returns in place of an Example it could not build."""

    reason: str
    record_id: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class _SafeTransform:
    """Runs the transform; SkipSample becomes a `Skipped` sentinel (other errors are bugs)."""

    transform: Callable[[RawRecord], Example]

    def __call__(self, record: RawRecord) -> Example | Skipped:
        try:
            return self.transform(record)
        except SkipSample as e:
            record_id = record.id if e.record_id == "?" else e.record_id
            return Skipped(e.reason, record_id, e.detail)


class _EpochOrder(grain.MapDataset):
    """`parent` in a new order each epoch: global position i -> parent[order_e[i % N]]."""

    def __init__(self, parent, order_fn: Callable[[int], np.ndarray], num_records: int | None):
        super().__init__(parent)
        self._order_fn, self._n = order_fn, len(parent)
        self._len = num_records
        # The last two epochs' orders, replaced as one tuple: Grain reads with threads, and
        # one attribute store is atomic where two (epoch, then order) would not be.
        self._orders: tuple[tuple[int, np.ndarray], ...] = ()

    def __len__(self) -> int:
        return self._len if self._len is not None else np.iinfo(np.int64).max

    def __str__(self) -> str:
        return "EpochOrder"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(index, self._n)
        cached = self._orders
        order = next((o for e, o in cached if e == epoch), None)
        if order is None:
            order = self._order_fn(epoch)
            self._orders = ((epoch, order), *cached[:1])
        return self._parent[int(order[i])]


@dataclasses.dataclass(frozen=True)
class _SourceOrder:
    n: int

    def __call__(self, epoch: int) -> np.ndarray:
        return np.arange(self.n)


@dataclasses.dataclass(frozen=True)
class _ShuffleOrder:
    seed: int
    n: int

    def __call__(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)


@dataclasses.dataclass(frozen=True)
class _GroupedOrder:
    lengths: np.ndarray
    multimodal: np.ndarray
    global_batch_size: int
    seed: int

    def __call__(self, epoch: int) -> np.ndarray:
        # A per-epoch seed that no other epoch or run seed collides with.
        seed = np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]
        return batching.group_by_modality_length(
            self.lengths, self.multimodal, self.global_batch_size, int(seed)
        )


def _no_skips() -> dict[str, int]:
    return dict.fromkeys(SKIP_REASONS, 0)


class _BatchIterator(grain.DatasetIterator):
    """Examples and `Skipped` sentinels in, batch dicts out (see module docstring)."""

    def __init__(self, parent, shape: BatchShape, cfg: LlavaConfig, packing: bool):
        super().__init__(parent)
        self._shape, self._cfg, self._packing = shape, cfg, packing
        self._held: Example | None = None  # the next batch's first sample
        self._held_state: Any = None  # the parent's state from before `_held` was read
        self._skipped_total, self._samples_total = _no_skips(), 0

    @property
    def skipped_total(self) -> dict[str, int]:
        """Records skipped since the start of the run, by reason (restored with the state)."""
        return dict(self._skipped_total)

    def _skip(self, counts: dict[str, int], reason: str, record_id: str, detail: str):
        counts[reason] += 1
        self._skipped_total[reason] += 1
        logger.warning("skipped record %s: %s: %s", record_id, reason, detail)

    def __next__(self) -> dict[str, Any]:
        packer = batching.RowPacker(self._shape, self._packing)
        skipped = _no_skips()
        if self._held is not None:
            packer.add(self._held)
            self._held = self._held_state = None
        while not packer.full:
            state = copy.deepcopy(self._parent.get_state()) if self._packing else None
            try:
                item = next(self._parent)
            except StopIteration:
                if not packer.rows:
                    raise
                break
            if isinstance(item, Skipped):
                self._skip(skipped, item.reason, item.record_id, item.detail)
                continue
            if not batching.fits_row(item, self._shape):
                detail = (
                    f"needs {item.length} tokens, {item.num_views} views, "
                    f"{item.num_media_tokens} image tokens; a row holds {self._shape}"
                )
                self._skip(skipped, "too_long", item.id, detail)
                continue
            if not packer.add(item):
                self._held, self._held_state = item, state
                break
        self._samples_total += packer.num_samples
        batch: dict[str, Any] = batching.pack_rows(packer.rows, self._shape, self._cfg)
        batch["num_samples"] = packer.num_samples
        batch["skipped"] = skipped
        batch["sample_ids"] = [e.id for row in packer.rows for e in row]
        return batch

    def get_state(self) -> dict[str, Any]:
        parent = self._held_state if self._held is not None else self._parent.get_state()
        return {
            "parent": copy.deepcopy(parent),
            "skipped_total": dict(self._skipped_total),
            "samples_total": self._samples_total,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._held = self._held_state = None
        self._skipped_total = {**_no_skips(), **state["skipped_total"]}
        self._samples_total = int(state["samples_total"])

    def __str__(self) -> str:
        return f"BatchIterator(shape={self._shape}, packing={self._packing})"


class _BatchIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, shape, cfg, packing: bool):
        super().__init__(parent)
        self._shape, self._cfg, self._packing = shape, cfg, packing

    def __iter__(self) -> _BatchIterator:
        return _BatchIterator(self._parent.__iter__(), self._shape, self._cfg, self._packing)

    def __str__(self) -> str:
        return f"BatchIterDataset(packing={self._packing})"


def host_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
    """Rows per host: the global batch split evenly over the JAX processes."""
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(
            f"global batch {global_batch_size} does not split evenly over {process_count} hosts"
        )
    return global_batch_size // process_count


def make_loader(
    source: grain.MapDataset,
    transform: Callable[[RawRecord], Example],
    shape: BatchShape,
    cfg: LlavaConfig,
    *,
    seed: int,
    num_epochs: float | None,
    shuffle: bool = True,
    packing: bool = False,
    group_by_length: bool = False,
    num_workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    modality_lengths: tuple[Sequence[int], Sequence[bool]] | None = None,
) -> grain.DatasetIterator:
    """This host's batches of `source`, as a checkpointable Grain iterator.

    Call it after `jax.distributed.initialize()`: the process index and count default to
    JAX's. Every host must pass the same source, seed, shape and epochs; each then reads
    only its shard (global positions p, p + P, ...), and the global batch is
    `shape.batch_size * process_count` samples (see `global_batch`). Hosts skip records
    independently, so with a finite `num_epochs` they may run out after different numbers
    of batches: a multi-host run should pass `num_epochs=None` and stop at a step count.

    Args:
      source: every record (`data.sources.open_source`).
      transform: record -> Example, raising SkipSample for records it cannot use.
      shape: the static shapes of this host's batches.
      cfg: the model config (feature plans).
      seed: the order's seed; the same seed gives the same batches.
      num_epochs: passes over `source` (fractions allowed); None repeats forever.
      shuffle: a new seeded order each epoch; False keeps the source order.
      packing: pack several samples into a row (first fit, in arrival order).
      group_by_length: LLaVA's `group_by_modality_length` order (implies an order per
        epoch; `shuffle` is then ignored).
      num_workers: transform processes (`mp_prefetch`); 0 transforms in this process.
        Keep it fixed across a resume.
      process_index, process_count: this host's shard; default `jax.process_index()` and
        `jax.process_count()`.
      modality_lengths: (lengths, multimodal) per record for `group_by_length`; measured
        from the source with `batching.modality_length` (one pass over it) when None.

    Returns:
      An iterator of dicts: the `schema.BATCH_FIELDS` arrays, plus "num_samples" (int),
      "skipped" ({reason: count} for records skipped since the previous batch) and
      "sample_ids" (the record ids of the batch's samples). `get_state()` / `set_state()`
      save and restore its position; `skipped_total` has the run's skip counts.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
    n = len(source)
    if n == 0:
        raise ValueError("the source has no records")
    num_records = None
    if num_epochs is not None:
        if num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive, got {num_epochs}")
        num_records = math.ceil(num_epochs * n)

    if group_by_length:
        if modality_lengths is None:
            measured = [batching.modality_length(r) for r in source]
            modality_lengths = ([m[0] for m in measured], [m[1] for m in measured])
        lengths, multimodal = (np.asarray(a) for a in modality_lengths)
        if len(lengths) != n or len(multimodal) != n:
            raise ValueError(f"modality_lengths cover {len(lengths)} records, the source {n}")
        order = _GroupedOrder(lengths, multimodal, shape.batch_size * process_count, seed)
        ds = _EpochOrder(source, order, num_records)
    elif shuffle:
        ds = _EpochOrder(source, _ShuffleOrder(seed, n), num_records)
    else:
        ds = _EpochOrder(source, _SourceOrder(n), num_records)
    ds = ds[process_index::process_count]
    ds = ds.map(_SafeTransform(transform))
    # Grain's default read-ahead (500 examples) would hold gigabytes of float32 views for
    # AnyRes samples (a OneVision example is up to 37 x 384^2 x 3 floats, 65 MB): keep two
    # batches in flight, transformed by as many threads.
    ahead = max(2 * shape.batch_size, 8)
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=min(16, ahead), prefetch_buffer_size=ahead)
    )
    if num_workers > 0:
        # Grain reads absl flags when it starts workers; outside absl.app nothing parsed them.
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(_BatchIterDataset(it_ds, shape, cfg, packing))


class SkipBudgetExceeded(ValueError):
    """Too large a share of the records was skipped."""


class SkipBudget:
    """Stops a run whose skipped share of records passes `max_fraction`.

    The check starts after `min_records` records, so one bad record early on does not end
    a run. Feed it every batch's "skipped" and "num_samples".
    """

    def __init__(self, max_fraction: float = 0.01, min_records: int = 100):
        if not 0 <= max_fraction <= 1:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
        self.max_fraction, self.min_records = max_fraction, min_records
        self.skipped: collections.Counter[str] = collections.Counter()
        self.samples = 0

    @property
    def seen(self) -> int:
        return self.samples + sum(self.skipped.values())

    def update(self, skipped: Mapping[str, int], num_samples: int) -> None:
        """Adds one batch's counts; raises SkipBudgetExceeded when over budget."""
        self.skipped.update({k: int(v) for k, v in skipped.items() if v})
        self.samples += int(num_samples)
        total = sum(self.skipped.values())
        if self.seen >= self.min_records and total > self.max_fraction * self.seen:
            top = ", ".join(f"{r} {c}" for r, c in self.skipped.most_common(3))
            raise SkipBudgetExceeded(
                f"{total} of {self.seen} records skipped ({total / self.seen:.1%}), over the "
                f"{self.max_fraction:.1%} budget; top reasons: {top} (each is logged with its "
                "record id under 'llava_jax.data')"
            )
