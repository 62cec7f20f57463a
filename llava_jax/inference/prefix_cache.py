"""The prefix cache: KV entries of prompts already prefilled, reused by later prompts that
start with the same tokens and the same media.

A chat sends its whole history every turn: the system prompt, the image tokens (hundreds to
thousands) and the earlier turns come again, with one new question at the end. Prefilling a
prompt stores its cache block here; a later prompt whose first `p` tokens (and the media those
hold) are those of a stored block prefills only its remaining tokens on top of a copy of it.

An entry is reachable at two prefix lengths: all but the prompt's last token (so the same
prompt sent again, or the next turn of its chat, hits) and the end of its last image or video
(so other questions about the same media hit). A prefix is keyed by the content hash of its
token ids and of the media's pixels and geometry, never by file names: a prefix that holds
media matches only the same pixels. Entries live within a byte budget, the least recently
used evicted first.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import jax
import numpy as np
from flax import struct

from llava_jax.inference.generator import Prompt


@struct.dataclass
class Block:
    """A prompt's cache, one row: `k`, `v` float[L, 1, K, C, H] and `segment` int32[1, C].

    Columns are positions (prompts are right-padded): the prompt's tokens fill [0, n).
    """

    k: jax.Array
    v: jax.Array
    segment: jax.Array

    @property
    def length(self) -> int:
        return self.segment.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.segment.nbytes


@dataclasses.dataclass(frozen=True)
class Hit:
    """`block`'s first `length` columns are the KV entries of the prompt's first `length`
    tokens."""

    block: Block
    length: int


@dataclasses.dataclass
class _Entry:
    block: Block
    input_ids: np.ndarray  # the prompt it was prefilled for
    keys: list[tuple[int, bytes]]


def media_digest(prompt: Prompt) -> bytes:
    """The content hash of a prompt's media: geometry (which sets the feature plan) and the
    preprocessed pixels of every view."""
    h = hashlib.blake2b(repr(prompt.media).encode(), digest_size=16)
    if prompt.views is not None:
        views = np.ascontiguousarray(prompt.views)
        h.update(repr((views.shape, views.dtype.str)).encode())
        h.update(memoryview(views).cast("B"))
    return h.digest()


def _key(input_ids: np.ndarray, length: int, media: bytes) -> tuple[int, bytes]:
    h = hashlib.blake2b(np.ascontiguousarray(input_ids[:length], np.int32).tobytes(),
                        digest_size=16)  # fmt: skip
    h.update(media)
    return length, h.digest()


class PrefixCache:
    """Prompt cache blocks within `budget_bytes`, least recently used evicted first.

    Args:
      budget_bytes: most bytes of KV entries held (device memory; 0 keeps nothing).
      media_token_ids: the token ids media features replace (image, video): a reused prefix
        must hold all of a prompt's media, the rest of the prompt is prefilled without any.
    """

    @classmethod
    def for_model(cls, cfg, budget_bytes: int) -> PrefixCache | None:
        """The cache for a `LlavaConfig`'s media tokens (image, and video where it has one);
        None, no cache, for a budget of 0."""
        if budget_bytes == 0:
            return None
        media = tuple(i for i in (cfg.image_token_id, cfg.video_token_id) if i is not None)
        return cls(budget_bytes, media)

    def __init__(self, budget_bytes: int, media_token_ids: tuple[int, ...]):
        if budget_bytes < 0:
            raise ValueError(f"the prefix cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.media_token_ids = media_token_ids
        self._entries: collections.OrderedDict[int, _Entry] = collections.OrderedDict()
        self._index: dict[tuple[int, bytes], int] = {}  # (length, digest) -> entry id
        self._lengths: collections.Counter[int] = collections.Counter()
        self._next_id = 0
        self.bytes = 0
        self.stats = {"prefix_hits": 0, "prefix_misses": 0, "prefix_hit_tokens": 0,
                      "prefix_evictions": 0}  # fmt: skip

    def __len__(self) -> int:
        return len(self._entries)

    def _media_end(self, input_ids: np.ndarray) -> int:
        """One past the last media token (0 without media)."""
        at = np.flatnonzero(np.isin(input_ids, self.media_token_ids))
        return int(at[-1]) + 1 if at.size else 0

    def lookup(self, input_ids: np.ndarray, media: bytes) -> Hit | None:
        """The longest stored prefix of `input_ids` (shorter than it, and holding all its
        media) whose media digest is `media`; counts a hit or a miss."""
        n, media_end = len(input_ids), self._media_end(input_ids)
        for length in sorted(self._lengths, reverse=True):
            if length >= n:
                continue
            if length < media_end:
                break  # shorter prefixes leave media tokens to prefill too
            entry_id = self._index.get(_key(input_ids, length, media))
            if entry_id is None:
                continue
            entry = self._entries[entry_id]
            if not np.array_equal(entry.input_ids[:length], input_ids[:length]):
                continue  # a hash collision
            self._entries.move_to_end(entry_id)
            self.stats["prefix_hits"] += 1
            self.stats["prefix_hit_tokens"] += length
            return Hit(entry.block, length)
        self.stats["prefix_misses"] += 1
        return None

    def store(self, input_ids: np.ndarray, media: bytes, block: Block) -> None:
        """Keeps `block`, the cache of prompt `input_ids` (with media digest `media`),
        reachable at its prefix lengths; evicts least recently used entries to fit."""
        if block.nbytes > self.budget_bytes:
            return
        n, media_end = len(input_ids), self._media_end(input_ids)
        lengths = {n - 1} | ({media_end} if 0 < media_end < n - 1 else set())
        keys = [_key(input_ids, p, media) for p in sorted(lengths) if p >= 1]
        keys = [k for k in keys if k not in self._index]  # a newer block of the same prefix
        if not keys:  # could only replace an equal one
            return
        while self.bytes + block.nbytes > self.budget_bytes:
            self._evict()
        entry_id, self._next_id = self._next_id, self._next_id + 1
        self._entries[entry_id] = _Entry(block, np.array(input_ids, np.int32), keys)
        for k in keys:
            self._index[k] = entry_id
            self._lengths[k[0]] += 1
        self.bytes += block.nbytes

    def _evict(self) -> None:
        _, entry = self._entries.popitem(last=False)
        for k in entry.keys:
            del self._index[k]
            self._lengths[k[0]] -= 1
            if not self._lengths[k[0]]:
                del self._lengths[k[0]]
        self.bytes -= entry.block.nbytes
        self.stats["prefix_evictions"] += 1
