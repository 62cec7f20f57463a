"""Batched generation with a preallocated KV cache: one jitted prefill, one jitted decode step.

Prompts of different lengths are left-padded into a shape bucket (prompt length, views,
image tokens and cache length rounded up), so a new prompt reuses a compiled program unless
it falls in a new bucket. Decoding runs one jitted step per token from a Python loop, which
is what lets tokens stream out and stop strings end a row; the step donates the cache so it
is updated in place.

Sampling follows transformers' logits processors, in their order: repetition penalty,
temperature, top-k, top-p; temperature 0 is greedy. Every setting is per row and traced, and
every row draws with its own key, so requests with different settings share a batch.

The prefill (vision tower and decoder) attends through the fused kernel `attention` resolves
to on the devices holding the weights (`nn/attention_kernels.py`: splash on TPU, cuDNN on
GPU, the XLA path on CPU, so CPU tokens are those of the XLA path); decode steps read the
cache with the XLA path.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_jax.media.feature_plan import (
    Media,
    MediaLayout,
    build_feature_plan,
    check_placeholders,
)
from llava_jax.models.llava import LlavaModel
from llava_jax.models.llm import KVCache
from llava_jax.nn.attention_kernels import FusedAttention, attention_kernel
from llava_jax.sharding import MESH_AXES, make_mesh


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. `temperature=0` is greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        # Each check names the one bad setting; written so that NaN fails them too.
        rules = (
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0 is greedy)"),
            ("top_k", self.top_k >= 0, ">= 0 (0 is off)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 is off)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 is off)"),
        )
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt: token ids with image/video tokens expanded, and its preprocessed media.

    Attributes:
      input_ids: int[T].
      views: float32[V, S, S, 3] all views of the prompt's media, images first then videos
        (None for text only).
      media: the media items in order of appearance.
      layouts: the media's `feature_plan.media_layouts`, worked out once when the prompt was
        tokenized (None: worked out when the prompt is batched).
    """

    input_ids: np.ndarray
    views: np.ndarray | None = None
    media: tuple[Media, ...] = ()
    layouts: tuple[MediaLayout, ...] | None = None


@dataclasses.dataclass
class Generation:
    """The result for one prompt."""

    token_ids: list[int]  # generated ids only, stop token included if one was produced
    prompt_tokens: int
    finish_reason: str  # "stop" (stop token or string) or "length"
    time_to_first_token_s: float = 0.0
    decode_tokens_per_s: float | None = None  # None: under 3 tokens, no decode step timed


def bucket(n: int, minimum: int = 16) -> int:
    """The padded size for n: powers of two up to 256, then multiples of 256 (a prompt of
    1,500 image and text tokens pads to 1,536, not 2,048)."""
    n = max(n, minimum)
    if n <= 256:
        return 1 << (n - 1).bit_length()
    return -(-n // 256) * 256


def _penalise(logits, seen, knobs):
    """HF's repetition penalty on the tokens `seen` (prompt and answer so far), per row."""
    penalty = knobs["repetition_penalty"][:, None]
    return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def _truncate(penalised, knobs):
    """Temperature, top-k (keep logits >= the k-th largest, ties kept; 0 = off) and top-p
    (drop the low tail whose mass is <= 1 - top_p, keep at least one token), per row."""
    logits = penalised / knobs["temperature"][:, None]
    vocab = logits.shape[-1]
    order = jnp.argsort(logits, axis=-1)  # ascending
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    k = jnp.clip(knobs["top_k"], 0, vocab)[:, None]
    kth = jnp.take_along_axis(ranked, vocab - jnp.maximum(k, 1), axis=-1)
    ranked = jnp.where((k > 0) & (ranked < kth), -jnp.inf, ranked)  # still ascending
    tail = jnp.cumsum(jax.nn.softmax(ranked, axis=-1), axis=-1) <= knobs["top_p_tail"][:, None]
    ranked = jnp.where(tail.at[:, -1].set(False), -jnp.inf, ranked)
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros_like(logits).at[rows, order].set(ranked)


def warp(logits, seen, knobs):
    """HF's logits processors, per row: float32[B, V] -> float32[B, V], -inf where dropped.

    `knobs` holds one value per row (float32[B] temperature, repetition_penalty and
    top_p_tail = 1 - top_p, subtracted in float64 as transformers does; int32[B] top_k), all
    traced: a batch may mix settings and none of them recompiles. Order and rules as
    transformers: repetition penalty, temperature, top-k, top-p.
    """
    return _truncate(_penalise(logits, seen, knobs), knobs)


def _sample(logits, keys, seen, knobs, *, greedy: bool):
    """float32[B, V] logits -> int32[B] tokens, as HF's logits processors and samplers do.

    `greedy` (static) is True when every row is greedy; otherwise rows with `knobs["greedy"]`
    take the argmax and the others draw from `warp`'s logits with their own key (typed
    key[B]), so a row's sample depends on its seed, not on the rows batched with it.
    """
    penalised = _penalise(logits, seen, knobs)
    best = jnp.argmax(penalised, axis=-1).astype(jnp.int32)
    if greedy:
        return best
    drawn = jax.vmap(jax.random.categorical)(keys, _truncate(penalised, knobs))
    return jnp.where(knobs["greedy"], best, drawn.astype(jnp.int32))


class Generator:
    """Generates from a `LlavaModel`; compiled programs are cached per shape bucket.

    Args:
      model: the model (its parameters may be sharded over a (data, fsdp, tensor) mesh).
      decode: optional ids -> text, needed for stop strings and streaming text.
      attention: the prefill's attention, as `train.attention` ("auto", "xla", "splash",
        "cudnn"), resolved for the devices holding the weights; or a `FusedAttention`.
    """

    def __init__(
        self,
        model: LlavaModel,
        decode: Callable[[list[int]], str] | None = None,
        attention: str | FusedAttention = "auto",
    ):
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self.decode = decode
        if not isinstance(attention, FusedAttention):
            attention = attention_kernel(attention, weights_mesh(self.state), self.cfg.run.dtype)
        self.attention = attention
        static = ("greedy",)
        self._prefill = jax.jit(self._prefill_fn, static_argnames=static)
        self._step = jax.jit(self._step_fn, static_argnames=static, donate_argnums=(1,))

    # -- the two compiled programs ---------------------------------------------------------

    def _prefill_fn(self, state, cache, ids, positions, segment, pixels, taps, weights, keys,
                    knobs, greedy):  # fmt: skip
        model = nnx.merge(self.graphdef, state)
        out = model.hidden_states(
            ids, pixel_values=pixels, taps=taps, tap_weights=weights, positions=positions,
            segment_ids=segment, cache=cache, attention=self.attention,
        )  # fmt: skip
        logits = model.language_model.logits(out.hidden[:, -1:])[:, 0]
        vocab = logits.shape[-1]
        seen = jnp.zeros((ids.shape[0], vocab), bool)
        seen = seen.at[jnp.arange(ids.shape[0])[:, None], ids].max(segment > 0)
        keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 0)
        token = _sample(logits, keys, seen, knobs, greedy=greedy)
        return token, out.cache, seen.at[jnp.arange(ids.shape[0]), token].set(True)

    def _step_fn(self, state, cache, token, position, seen, keys, step, knobs, greedy):
        model = nnx.merge(self.graphdef, state)
        ones = jnp.ones_like(token)[:, None]
        out = model.hidden_states(token[:, None], positions=position[:, None], segment_ids=ones,
                                  cache=cache)  # fmt: skip
        logits = model.language_model.logits(out.hidden)[:, 0]
        keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
        token = _sample(logits, keys, seen, knobs, greedy=greedy)
        return token, out.cache, seen.at[jnp.arange(token.shape[0]), token].set(True)

    # -- host side -------------------------------------------------------------------------

    def _batch(self, prompts: Sequence[Prompt], max_new_tokens: int):
        """Left-pads the prompts into one shape bucket and builds the feature plan."""
        lengths = [len(p.input_ids) for p in prompts]
        t = bucket(max(lengths))
        cache_len = t + bucket(max_new_tokens)
        limit = self.cfg.text.max_position_embeddings
        if max(lengths) + max_new_tokens > limit:
            raise ValueError(
                f"prompt of {max(lengths)} tokens + {max_new_tokens} new tokens exceeds the "
                f"model's context of {limit} tokens"
            )
        b = len(prompts)
        ids = np.zeros((b, t), np.int32)
        segment = np.zeros((b, t), np.int32)
        for row, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
            ids[row, t - n :], segment[row, t - n :] = p.input_ids, 1
        positions = np.maximum(np.cumsum(segment, axis=1) - 1, 0).astype(np.int32)
        pixels = taps = weights = None
        media, layouts = [p.media for p in prompts], [p.layouts for p in prompts]
        plan = build_feature_plan(self.cfg, media, batch_layouts=layouts)
        check_placeholders(self.cfg, ids, plan)
        if any(p.media for p in prompts):
            size = self.cfg.vision.image_size
            pixels = np.zeros((b, bucket(max(plan.num_views), 1), size, size, 3), np.float32)
            for row, p in enumerate(prompts):
                given = 0 if p.views is None else len(p.views)
                if given != plan.num_views[row]:
                    raise ValueError(
                        f"prompt {row}: {given} views given, its media need {plan.num_views[row]}"
                    )
                if given:
                    pixels[row, :given] = p.views
            # Image tokens padded to a bucket too (padding taps read the newline with weight 0).
            pad = bucket(plan.taps.shape[1]) - plan.taps.shape[1]
            taps = np.pad(plan.taps, ((0, 0), (0, pad), (0, 0)))
            weights = np.pad(plan.weights, ((0, 0), (0, pad), (0, 0)))
        return ids, positions, segment, pixels, taps, weights, cache_len, lengths

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingConfig | Sequence[SamplingConfig] = SamplingConfig(),
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[Generation]:
        """Generates a continuation for every prompt.

        Args:
          prompts: the prompts, of any lengths and numbers of images.
          sampling: decoding settings for every prompt, or one per prompt (a row's tokens
            then depend only on its own prompt and settings, seed included, not on the rows
            batched with it).
          on_token: called as `on_token(row, token_id)` for each new token, for streaming.

        Returns:
          One `Generation` per prompt.
        """
        b = len(prompts)
        rows = [sampling] * b if isinstance(sampling, SamplingConfig) else list(sampling)
        if len(rows) != b:
            raise ValueError(f"{len(rows)} sampling settings for {b} prompts")
        asked = b
        if self.attention is not None:
            # The kernel splits rows over (data, fsdp): extra rows repeat row 0 (same
            # prompt, settings and seed, so they end with it) and are dropped at the end.
            mesh = self.attention.mesh
            b += -b % (mesh.shape["data"] * mesh.shape["fsdp"])
            prompts, rows = [*prompts] + [prompts[0]] * (b - asked), rows + [rows[0]] * (b - asked)
        most_new = max(r.max_new_tokens for r in rows)
        ids, positions, segment, pixels, taps, weights, cache_len, lengths = self._batch(
            prompts, most_new
        )
        cache = KVCache.init(self.cfg.text, b, cache_len, self.cfg.run.dtype)
        keys = jax.vmap(jax.random.key)(np.array([r.seed % 2**32 for r in rows], np.uint32))
        knobs = {
            "greedy": np.array([r.temperature == 0 for r in rows]),
            "temperature": np.array([r.temperature or 1.0 for r in rows], np.float32),
            "top_k": np.array([r.top_k for r in rows], np.int32),
            "top_p_tail": np.array([1 - r.top_p for r in rows], np.float32),
            "repetition_penalty": np.array([r.repetition_penalty for r in rows], np.float32),
        }
        greedy = bool(knobs["greedy"].all())
        knobs = jax.device_put(knobs)  # once, not at every decode step
        start = time.perf_counter()
        token, cache, seen = self._prefill(
            self.state, cache, ids, positions, segment, pixels, taps, weights, keys, knobs,
            greedy=greedy,
        )  # fmt: skip
        position = positions[:, -1] + 1
        outputs: list[list[int]] = [[] for _ in range(b)]
        reasons = [""] * b
        # The decode rate is timed from the second token on, so that a first call's compile of
        # the decode step is not counted as decoding.
        first_token_at = decode_start = None
        for step in range(1, most_new + 1):
            host_tokens = np.asarray(token)
            if step == 1:
                first_token_at = time.perf_counter()
            elif step == 2:
                decode_start = time.perf_counter()
            for row in range(b):
                if reasons[row]:
                    continue
                outputs[row].append(int(host_tokens[row]))
                if on_token is not None and row < asked:
                    on_token(row, int(host_tokens[row]))
                reasons[row] = self._finished(outputs[row], rows[row])
            if all(reasons):
                break
            token, cache, seen = self._step(
                self.state, cache, token, position, seen, keys, step, knobs, greedy=greedy
            )
            position = position + 1
        end = time.perf_counter()
        decoded = max(len(o) for o in outputs) - 2
        rate = decoded / (end - decode_start) if decoded > 0 else None
        return [
            Generation(
                token_ids=out,
                prompt_tokens=n,
                finish_reason=reason,
                time_to_first_token_s=first_token_at - start,
                decode_tokens_per_s=rate,
            )
            for out, n, reason in zip(outputs, lengths, reasons, strict=True)
        ][:asked]

    def _finished(self, out: list[int], sampling: SamplingConfig) -> str:
        """Why `out` ends: "stop" (a stop token or string), "length" (max_new_tokens) or ""."""
        if out[-1] in sampling.stop_token_ids:
            return "stop"
        if sampling.stop_strings and self.decode is not None:
            # Only the tail can hold a stop string that was not there a token ago; every token
            # decodes to at least one character, so this many tokens cover the longest one.
            tail = 2 * max(map(len, sampling.stop_strings)) + 2
            text = self.decode(out[-tail:])
            if any(s in text for s in sampling.stop_strings):
                return "stop"
        return "length" if len(out) >= sampling.max_new_tokens else ""


def weights_mesh(state) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh the weights live on, for the prefill's attention kernel;
    weights placed otherwise get a mesh of their devices with rows split over all of them."""
    sharding = jax.tree.leaves(state)[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.axis_names == MESH_AXES:
        return sharding.mesh
    devices = list(sharding.device_set)
    return make_mesh(len(devices), 1, 1, devices=devices)
