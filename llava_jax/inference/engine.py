"""Continuous batching: a decode engine of fixed slots that requests join and leave at every
step.

The engine's KV cache has B rows (slots) of up to S columns, and each row its own next column
(`KVCache.index` int32[B]). A prompt is right-padded, so a row's columns are its tokens'
positions. At each `step`, waiting requests take free slots: each is prefilled alone in a
cache of its own (prompt length bucketed as the `Generator` buckets it: one compiled program
per bucket, none per request), its first token sampled, its cache block copied into the slot;
then one decode step is launched for all B rows, and the tokens of the step launched before
are handed out. One step is always in flight while rows decode: the host's work on a step's
tokens (stop checks, detokenizing and streaming them, admitting requests) overlaps the next
step's compute instead of leaving the accelerator idle. A row that ends (stop token or
string, its `max_new_tokens`, or cancelled) frees its slot when its last token is handed out;
the one token it decoded meanwhile is dropped. Free slots decode along, as
padding of segment 0 that attends to nothing.

The cache is only as large as its rows need. Decoding requests are kept in the first slots (a
row that ends is replaced by the last one, one row copied), and the cache holds the occupied
slots rounded up to a power of two (at most B) and the longest row's columns rounded up to
2^k or 1.5 x 2^k (at most S). It grows when a request is admitted or a row decodes past it,
and shrinks when what is left has needed at most half of it for `SHRINK_AFTER` steps (so that
requests coming and going do not resize it back and forth). A decode step reads the whole
cache, so one client decodes one row, not B, and short answers in long slots cost what their
length costs, not S. Each resize is one copy of the cache; each shape met is one compiled step
(about 2 log2(S) x log2(B) at most).

Sampling is as `Generator.generate`'s, per row: settings, seed, the repetition penalty's seen
tokens and the key folded with the token's step all live in the row, so a request's tokens do
not depend on the requests decoding beside it (greedy and sampled, tested).

With a `PrefixCache`, a prompt that starts with a stored prefix (same tokens, same media)
prefills only the rest of its tokens on top of a copy of the stored block.

Axis legend: B slots, S slot length, C a prompt's cache length, T a prompt's bucket, L
layers, K key/value heads, H head dim, V vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
import weakref
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from llava_jax.inference.generator import (
    Generation,
    Generator,
    Prompt,
    SamplingConfig,
    _sample,
    bucket,
)
from llava_jax.inference.prefix_cache import Block, PrefixCache, media_digest
from llava_jax.models.llm import KVCache


@dataclasses.dataclass(eq=False)
class Request:
    """One request to the engine.

    Attributes:
      prompt: the tokenized prompt with its views.
      sampling: its settings.
      on_token: called with each new token id; returning True ends the request ("stop"),
        for callers with their own stop rules.
      on_finish: called once when the request ends, `finish_reason` set.
      token_ids: the tokens generated so far.
      finish_reason: "" while running; "stop", "length", "cancelled" or "error" (`error` set).
      cached_tokens: prompt tokens whose KV entries came from the prefix cache.
    """

    prompt: Prompt
    sampling: SamplingConfig
    on_token: Callable[[int], bool | None] | None = None
    on_finish: Callable[[Request], None] | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str = ""
    error: Exception | None = None
    cached_tokens: int = 0
    submitted_at: float = 0.0
    first_token_at: float = 0.0
    finished_at: float = 0.0

    def generation(self) -> Generation:
        n = len(self.token_ids)
        rate = (n - 1) / (self.finished_at - self.first_token_at) if n >= 3 else None
        return Generation(self.token_ids, len(self.prompt.input_ids), self.finish_reason,
                          self.first_token_at - self.submitted_at, rate)  # fmt: skip


@struct.dataclass
class Rows:
    """Each slot's decoding state besides its cache row.

    Attributes:
      token: int32[B], the last token (the next step's input).
      seen: bool[B, V], the prompt's and answer's tokens (repetition penalty).
      keys: uint32[B, 2], the raw key of the row's seed.
      step: int32[B], tokens generated so far (the key is folded with it).
      knobs: per row sampling settings, as `Generator.generate`'s.
    """

    token: jax.Array
    seen: jax.Array
    keys: jax.Array
    step: jax.Array
    knobs: dict[str, jax.Array]


def _knobs(rows: Sequence[SamplingConfig]) -> dict[str, np.ndarray]:
    return {
        "greedy": np.array([r.temperature == 0 for r in rows]),
        "temperature": np.array([r.temperature or 1.0 for r in rows], np.float32),
        "top_k": np.array([r.top_k for r in rows], np.int32),
        "top_p_tail": np.array([1 - r.top_p for r in rows], np.float32),
        "repetition_penalty": np.array([r.repetition_penalty for r in rows], np.float32),
    }


class Engine:
    """Decodes requests in `num_slots` rows that they join and leave at every step.

    Not thread-safe: one thread calls `add`, `cancel` and `step` (the server's scheduler).

    Args:
      generator: the `Generator` whose model (and tokenizer decode, for stop strings) is used.
      num_slots: rows decoded together.
      max_length: each slot's longest cache S (prompt and answer); rounded up to a bucket;
        default: the model's context. The cache is allocated as the rows need it, up to S.
      prefix_cache: reuse of prompt prefixes; None: off.
    """

    def __init__(self, generator: Generator, num_slots: int = 8, max_length: int | None = None,
                 prefix_cache: PrefixCache | None = None):  # fmt: skip
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.generator, self.cfg = generator, generator.cfg
        self.context = self.cfg.text.max_position_embeddings
        self.num_slots = num_slots
        self.max_length = bucket(max_length or self.context)
        self.prefix_cache = prefix_cache
        self._prefill, self._insert, self._step, self._move, self._resize = _programs(generator)
        self.waiting: collections.deque[Request] = collections.deque()
        self.slots: list[Request | None] = [None] * num_slots
        self.stats = {"steps": 0, "decoded_tokens": 0, "prefilled_tokens": 0, "resizes": 0}
        self.reset()

    def reset(self) -> None:
        """Empties the slots (after a device error, say); waiting requests stay."""
        b, v = self.num_slots, self.cfg.text.vocab_size
        cache = KVCache.init(self.cfg.text, 1, _window(1, self.max_length), self.cfg.run.dtype)
        self._cache = dataclasses.replace(cache, index=jnp.zeros((1,), jnp.int32), empty=False)
        self._rows = Rows(  # one row to start with; `_fit` grows both with the requests
            token=jnp.zeros((1,), jnp.int32),
            seen=jnp.zeros((1, v), bool),
            keys=jnp.zeros((1, 2), jnp.uint32),
            step=jnp.zeros((1,), jnp.int32),
            knobs=jax.tree.map(jnp.asarray, _knobs([SamplingConfig()])),
        )
        self.slots = [None] * b
        self._in_flight: tuple[jax.Array, list[Request | None]] | None = None
        self._lengths = np.zeros((b,), np.int64)  # each slot's cache index, mirrored
        self._small_for = 0  # calls of `_fit` in a row that needed at most half a dimension

    def clear(self) -> None:
        """Forgets every request, waiting, decoding or in flight, without finishing them (the
        caller answers them)."""
        self.waiting.clear()
        self.slots = [None] * self.num_slots
        self._in_flight = None

    # -- the host side ------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queues a request; it takes a slot at a coming `step`.

        Raises:
          ValueError: its prompt and answer cannot fit a slot.
        """
        n, new = len(request.prompt.input_ids), request.sampling.max_new_tokens
        room = min(self.max_length, self.context)
        if n + new > room:
            raise ValueError(
                f"prompt of {n} tokens + {new} new tokens exceeds the {room} "
                "tokens of an engine slot (the model's context, or max_length)"
            )
        request.submitted_at = request.submitted_at or time.perf_counter()
        self.waiting.append(request)

    def cancel(self, request: Request) -> None:
        """Ends a request now (finish reason "cancelled"), waiting or decoding."""
        if request in self.waiting:
            self.waiting.remove(request)
        self._leave(request)
        if not request.finish_reason:
            self._finish(request, "cancelled")

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or self.active > 0 or self._in_flight is not None

    def step(self) -> None:
        """Admits waiting requests into free slots, launches one decode step for every slot,
        then hands out the tokens of the step launched before."""
        while self.waiting and self.active < self.num_slots:
            self._admit(self.waiting.popleft(), self.active)
        launched = None
        if n := self.active:
            greedy = all(r.sampling.temperature == 0 for r in self.slots[:n])
            self._fit(n, int(self._lengths[:n].max()) + 1)  # room for this step's column
            active = np.arange(self._cache.index.shape[0]) < n
            self._cache, self._rows = self._step(self.generator.state, self._cache, self._rows,
                                                 active, greedy=greedy)  # fmt: skip
            self._lengths[:n] += 1
            self.stats["steps"] += 1
            launched = (self._rows.token, self.slots[:n])
        if self._in_flight is not None:
            self._hand_out(*self._in_flight)
        self._in_flight = launched

    def _hand_out(self, tokens: jax.Array, slots: list[Request | None]) -> None:
        """Gives each request decoding in a launched step its token; a request that ended
        since (its previous token, or cancelled) drops it."""
        tokens = np.asarray(tokens)  # waits for that step, not for the one launched after it
        for slot, request in enumerate(slots):  # the slots as launched; rows may have moved
            if request is None or request.finish_reason:
                continue
            self.stats["decoded_tokens"] += 1
            if self._emit(request, int(tokens[slot])):
                self._leave(request)

    def _leave(self, request: Request) -> None:
        """Frees a decoding request's slot: the last occupied slot's row moves into it, so
        that the occupied slots stay the first ones."""
        if request not in self.slots:
            return
        slot, last = self.slots.index(request), self.active - 1
        if slot != last:
            self._cache, self._rows = self._move(self._cache, self._rows, last, slot)
            self.slots[slot], self._lengths[slot] = self.slots[last], self._lengths[last]
        self.slots[last] = None

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingConfig | Sequence[SamplingConfig] = SamplingConfig(),  # noqa: B008
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[Generation]:
        """`Generator.generate` through the slots: every prompt runs to its end, and a slot
        freed by one takes the next at once."""
        rows = [sampling] * len(prompts) if isinstance(sampling, SamplingConfig) else sampling
        if len(rows) != len(prompts):
            raise ValueError(f"{len(rows)} sampling settings for {len(prompts)} prompts")
        requests = []
        for i, (prompt, s) in enumerate(zip(prompts, rows, strict=True)):
            call = None if on_token is None else (lambda t, i=i: on_token(i, t))
            requests.append(Request(prompt, s, on_token=call))
        for r in requests:
            self.add(r)
        while not all(r.finish_reason for r in requests):
            self.step()
        for r in requests:
            if r.error is not None:
                raise r.error
        return [r.generation() for r in requests]

    def _admit(self, request: Request, slot: int) -> None:
        """Prefills `request` (reusing a stored prefix) and puts it in `slot`."""
        try:
            token, block, seen = self._prefill_one(request)
        except Exception as e:  # noqa: BLE001 (this request fails; the others go on)
            request.error = e
            self._finish(request, "error")
            return
        if self._emit(request, token):
            return
        key = jax.random.key_data(jax.random.key(request.sampling.seed % 2**32))
        row = Rows(token=np.array([token], np.int32), seen=seen, keys=key[None],
                   step=np.ones((1,), np.int32), knobs=_knobs([request.sampling]))  # fmt: skip
        length = len(request.prompt.input_ids)
        self._fit(slot + 1, max([block.length, *(int(n) + 1 for n in self._lengths[:slot])]))
        self._cache, self._rows = self._insert(self._cache, self._rows, slot, block, length, row)
        self._lengths[slot] = length
        self.slots[slot] = request

    def _prefill_one(self, request: Request):
        prompt, s = request.prompt, request.sampling
        n = len(prompt.input_ids)
        media, hit = b"", None
        if self.prefix_cache is not None:
            media = media_digest(prompt)
            hit = self.prefix_cache.lookup(prompt.input_ids, media)
        if hit is not None and hit.length + bucket(n - hit.length) > self.max_length:
            hit = None  # no slot holds this prefix block plus the rest's bucket: prefill all
        start = hit.length if hit is not None else 0
        rest = prompt if hit is None else Prompt(prompt.input_ids[start:])  # media: all in the hit
        # The generator's shape buckets and media checks, its left padding moved right.
        ids, _, segment, pixels, taps, weights, _, _ = self.generator._batch([rest], 1)
        pad = ids.shape[1] - (n - start)
        ids, segment = np.roll(ids, -pad, axis=1), np.roll(segment, -pad, axis=1)
        cache_len = ids.shape[1] if hit is None else bucket(max(hit.block.length,
                                                                start + ids.shape[1]))  # fmt: skip
        seen = np.zeros((1, self.cfg.text.vocab_size), bool)
        seen[0, prompt.input_ids] = True
        knobs = _knobs([s])
        key = jax.random.key_data(jax.random.key(s.seed % 2**32))
        token, block, seen = self._prefill(
            self.generator.state, None if hit is None else hit.block, np.int32(start), ids,
            segment, np.int32(n - start - 1), pixels, taps, weights, seen, key, knobs,
            cache_len=cache_len, greedy=s.temperature == 0,
        )  # fmt: skip
        request.cached_tokens = start
        self.stats["prefilled_tokens"] += n - start
        if self.prefix_cache is not None:
            self.prefix_cache.store(prompt.input_ids, media, block)
        return int(token[0]), block, seen

    def _fit(self, rows: int, columns: int) -> None:
        """Resizes the cache (and the rows' state) to hold `rows` slots of `columns` columns,
        rounded up: at once when it is too small; when at most half of it has been needed in
        a dimension for `SHRINK_AFTER` calls in a row (requests coming and going would
        otherwise resize it back and forth, a copy of the cache each time)."""
        slots = min(1 << (rows - 1).bit_length(), self.num_slots)
        want = (slots, _window(columns, self.max_length))
        have = self._cache.segment.shape
        small = any(2 * w <= h for w, h in zip(want, have, strict=True))
        self._small_for = self._small_for + 1 if small else 0
        if self._small_for < SHRINK_AFTER:  # grow only
            want = tuple(max(w, h) for w, h in zip(want, have, strict=True))
        if want != have:
            self._cache, self._rows = self._resize(self._cache, self._rows, shape=want)
            self._small_for = 0
            self.stats["resizes"] += 1

    def _emit(self, request: Request, token: int) -> bool:
        """Hands a new token to the request; True when that ended it."""
        if not request.token_ids:
            request.first_token_at = time.perf_counter()
        request.token_ids.append(token)
        ended = request.on_token(token) if request.on_token is not None else False
        reason = "stop" if ended else self.generator._finished(request.token_ids,
                                                               request.sampling)  # fmt: skip
        if reason:
            self._finish(request, reason)
        return bool(reason)

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason = reason
        request.finished_at = time.perf_counter()
        if request.on_finish is not None:
            request.on_finish(request)


SHRINK_AFTER = 64  # `_fit` calls (about decode steps) a smaller need must last to shrink


def _window(columns: int, max_length: int) -> int:
    """The cache length that holds `columns`: rounded up to 2^k or 1.5 x 2^k (at least 16; at
    most 1.5x the need, about 2 log2(S) windows), at most the slot length."""
    n = max(columns, 16)
    window = 1 << (n - 1).bit_length()
    if window * 3 // 4 >= n:
        window = window * 3 // 4
    return min(max_length, window)


# -- the compiled programs, shared by the engines of one generator ----------------------------

_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _programs(generator: Generator):
    """The jitted prefill, insert, step, move and resize for `generator`'s model: every engine
    of one generator (a server's, an eval's) shares their compiled programs."""
    if generator not in _PROGRAMS:
        graphdef, text = generator.graphdef, generator.cfg.text
        dtype = generator.cfg.run.dtype
        _PROGRAMS[generator] = (
            jax.jit(functools.partial(_prefill_fn, graphdef, text, dtype),
                    static_argnames=("cache_len", "greedy")),
            jax.jit(_insert_fn, donate_argnums=(0,)),
            # Rows are never donated: the host reads a step's tokens after the next launched.
            jax.jit(functools.partial(_step_fn, graphdef), static_argnames=("greedy",),
                    donate_argnums=(1,)),
            jax.jit(_move_fn, donate_argnums=(0,)),
            jax.jit(_resize_fn, static_argnames=("shape",)),  # a new shape: nothing to donate
        )  # fmt: skip
    return _PROGRAMS[generator]


def _prefill_fn(graphdef, text, dtype, state, prefix, start, ids, segment, last, pixels, taps,
                weights, seen, key, knobs, *, cache_len, greedy):  # fmt: skip
    """One prompt (or the rest of it after a stored `prefix` of `start` tokens) into a cache
    of `cache_len` columns; returns its first token, cache block and seen tokens."""
    model = nnx.merge(graphdef, state)
    cache = KVCache.init(text, 1, cache_len, dtype)
    if prefix is not None:
        at = (0, 0, 0, 0, 0)
        cache = dataclasses.replace(
            cache,
            k=jax.lax.dynamic_update_slice(cache.k, prefix.k, at),
            v=jax.lax.dynamic_update_slice(cache.v, prefix.v, at),
            segment=jax.lax.dynamic_update_slice(cache.segment, prefix.segment, (0, 0)),
            index=start,
            empty=False,
        )
    positions = start + jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
    out = model.hidden_states(
        ids, pixel_values=pixels, taps=taps, tap_weights=weights, positions=positions,
        segment_ids=segment, cache=cache,
    )  # fmt: skip
    hidden = jax.lax.dynamic_slice_in_dim(out.hidden, last, 1, axis=1)
    logits = model.language_model.logits(hidden)[:, 0]
    keys = jax.random.fold_in(jax.random.wrap_key_data(key), 0)[None]
    token = _sample(logits, keys, seen, knobs, greedy=greedy)
    block = Block(out.cache.k, out.cache.v, out.cache.segment)
    return token, block, seen.at[0, token].set(True)


def _insert_fn(cache, rows, slot, block, length, row):
    """Copies a prompt's cache `block` and decoding state `row` into `slot`."""
    cache = dataclasses.replace(
        cache,
        k=jax.lax.dynamic_update_slice(cache.k, block.k, (0, slot, 0, 0, 0)),
        v=jax.lax.dynamic_update_slice(cache.v, block.v, (0, slot, 0, 0, 0)),
        segment=jax.lax.dynamic_update_slice(cache.segment, block.segment, (slot, 0)),
        index=cache.index.at[slot].set(length),
    )
    return cache, jax.tree.map(lambda a, r: a.at[slot].set(r[0]), rows, row)


def _move_fn(cache, rows, src, dst):
    """Slot `src`'s cache row and decoding state copied into slot `dst`."""
    cache = dataclasses.replace(
        cache,
        k=cache.k.at[:, dst].set(cache.k[:, src]),
        v=cache.v.at[:, dst].set(cache.v[:, src]),
        segment=cache.segment.at[dst].set(cache.segment[src]),
        index=cache.index.at[dst].set(cache.index[src]),
    )
    return cache, jax.tree.map(lambda a: a.at[dst].set(a[src]), rows)


def _resize_fn(cache, rows, shape):
    """The cache and the rows' state cut or padded to `shape` = (slots, columns): new cache
    entries are zeros (segment 0: nothing written), new rows copy the last one's settings."""

    def fit(x, axis, size, mode="constant"):
        have = x.shape[axis]
        if size <= have:
            return jax.lax.slice_in_dim(x, 0, size, axis=axis)
        return jnp.pad(x, [(0, size - have if a == axis else 0) for a in range(x.ndim)], mode)

    b, columns = shape
    cache = dataclasses.replace(
        cache,
        k=fit(fit(cache.k, 1, b), 3, columns),
        v=fit(fit(cache.v, 1, b), 3, columns),
        segment=fit(fit(cache.segment, 0, b), 1, columns),
        index=fit(cache.index, 0, b),
    )
    return cache, jax.tree.map(lambda a: fit(a, 0, b, "edge"), rows)


def _step_fn(graphdef, state, cache, rows, active, greedy):
    """One token for every slot; free slots (`active` False) write nothing they read."""
    model = nnx.merge(graphdef, state)
    out = model.hidden_states(rows.token[:, None], positions=cache.index[:, None],
                              segment_ids=active[:, None].astype(jnp.int32),
                              cache=cache)  # fmt: skip
    logits = model.language_model.logits(out.hidden)[:, 0]
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(rows.keys), rows.step)
    token = _sample(logits, keys, rows.seen, rows.knobs, greedy=greedy)
    b = jnp.arange(token.shape[0])
    seen = rows.seen.at[b, token].set(rows.seen[b, token] | active)
    cache = dataclasses.replace(out.cache, index=cache.index + active)
    return cache, rows.replace(token=token, seen=seen, step=rows.step + active)
