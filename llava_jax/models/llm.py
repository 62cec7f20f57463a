"""The decoder LLM: one implementation for LLaMA / Vicuna / Mistral and Qwen2.

Qwen2 is LLaMA plus q/k/v biases (`attention_bias`), another RoPE theta and, for the small
models, tied embeddings. Names mirror HF `LlamaForCausalLM`. Axis legend: B batch, T query
length, S key/value length, D width, F MLP width, N query heads, K key/value heads,
H head dim, L layers, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from llava_jax.config import Activation, LlavaConfig, TextConfig
from llava_jax.nn.attention import (
    ChunkedCausalMask,
    FusedCausalMask,
    causal_mask,
    chunked_causal_attention,
    dot_product_attention,
)
from llava_jax.nn.attention_kernels import FusedAttention
from llava_jax.nn.layers import RMSNorm, activation, dense, partitioned
from llava_jax.nn.rotary import apply_rope
from llava_jax.nn.stack import run_stacked, stacked
from llava_jax.sharding import HIDDEN, constrain


@struct.dataclass
class KVCache:
    """Keys and values of every layer for decoding, as an explicit pytree.

    A batch generated together writes every row at the same slot (`index` int32[]); left
    padding is expressed by segment 0. The serving engine's rows are requests that joined at
    different steps, each with its own next slot (`index` int32[B]).

    Attributes:
      k: float[L, B, K, S, H].
      v: float[L, B, K, S, H].
      segment: int32[B, S], 0 where nothing (or padding) has been written.
      index: int32[] or int32[B], the next slot to write (of all rows, or of each row).
      empty: static; True until the first write, so that prefill skips attending to an
        empty cache (a [T, S] block of masked logits otherwise).
    """

    k: jax.Array
    v: jax.Array
    segment: jax.Array
    index: jax.Array
    empty: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def init(cls, cfg: TextConfig, batch: int, max_len: int, dtype) -> KVCache:
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            segment=jnp.zeros((batch, max_len), jnp.int32),
            index=jnp.zeros((), jnp.int32),
            empty=True,
        )


def _append(cache: KVCache, new_kv, segment_ids: jax.Array) -> KVCache:
    """Writes the T new entries (float[L, B, K, T, H] twice) of all layers at once, at the
    cache's index (of all rows, or per row); in place when the cache is donated."""
    k, v = (x.astype(cache.k.dtype) for x in new_kv)
    if cache.index.ndim == 0:
        at = (0, 0, 0, cache.index, 0)
        write = lambda c, x: jax.lax.dynamic_update_slice(c, x, at)  # noqa: E731
        segment = jax.lax.dynamic_update_slice_in_dim(cache.segment, segment_ids, cache.index, 1)
    else:  # each row at its own index: a scatter (in place; a vmapped slice update copies)
        b, t = segment_ids.shape
        rows = jnp.arange(b)[:, None]
        cols = cache.index[:, None] + jnp.arange(t)  # past the end (a free row): dropped
        write = lambda c, x: c.at[:, rows, :, cols].set(x.transpose(1, 3, 0, 2, 4))  # noqa: E731
        segment = cache.segment.at[rows, cols].set(segment_ids)
    return dataclasses.replace(cache, k=write(cache.k, k), v=write(cache.v, v), segment=segment,
                               index=cache.index + segment_ids.shape[1], empty=False)  # fmt: skip


class DecoderAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(d, n * h, ("embed", "q_heads"), use_bias=cfg.attention_bias, **kw)
        self.k_proj = dense(d, k * h, ("embed", "kv_heads"), use_bias=cfg.attention_bias, **kw)
        self.v_proj = dense(d, k * h, ("embed", "kv_heads"), use_bias=cfg.attention_bias, **kw)
        self.o_proj = dense(n * h, d, ("q_heads", "embed"), use_bias=False, **kw)

    def __call__(self, x, positions, mask, cached=None):
        """Attention of x float[B, T, D] over itself and, when decoding, the cache.

        Args:
          x: float[B, T, D].
          positions: int[B, T].
          mask: bool[B, T, T] among the new tokens, or a ChunkedCausalMask or
            FusedCausalMask that describes it.
          cached: (k, v, mask) of this layer's cache, float[B, K, S, H] twice and
            bool[B, T, S], or None.

        Returns:
          (float[B, T, D], the new (k, v) float[B, K, T, H] for the caller to cache).
        """
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta).transpose(0, 2, 1, 3)  # BKTH
        v = v.transpose(0, 2, 1, 3)
        blocks = [k, v, mask]
        if cached is not None:
            cache_k, cache_v, cache_mask = cached
            blocks += [cache_k.astype(q.dtype), cache_v.astype(q.dtype), cache_mask]
        if isinstance(mask, FusedCausalMask):  # training or prefill, no cache to attend to
            out = mask.kernel(q, k, v, mask.segment_ids, causal=True,
                              sliding_window=mask.sliding_window)  # fmt: skip
        elif isinstance(mask, ChunkedCausalMask):  # a long training sequence, no cache
            out = chunked_causal_attention(q, k, v, mask)
        else:
            out = dot_product_attention(q, *blocks)
        return self.o_proj(out.reshape(b, t, -1)), (k, v)


class DecoderMLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = dense(d, f, ("embed", "mlp"), **kw)
        self.up_proj = dense(d, f, ("embed", "mlp"), **kw)
        self.down_proj = dense(f, d, ("mlp", "embed"), **kw)
        self.act = activation(Activation.SILU)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.self_attn = DecoderAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.mlp = DecoderMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, mask, cached=None):
        attn, kv = self.self_attn(self.input_layernorm(x), positions, mask, cached)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class LanguageModel(nnx.Module):
    """A causal LM: `embed_tokens`, stacked `layers`, final `norm`, `lm_head` unless tied."""

    def __init__(self, cfg: LlavaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        t = cfg.text
        kw = dict(dtype=cfg.run.dtype, param_dtype=cfg.run.param_dtype, rngs=rngs)
        self.embed_tokens = nnx.Embed(
            t.vocab_size,
            t.hidden_size,
            embedding_init=partitioned(nnx.initializers.normal(0.02), "vocab", "embed"),
            **kw,
        )
        self.layers = stacked(
            lambda r: DecoderLayer(t, **{**kw, "rngs": r}), t.num_hidden_layers, rngs
        )
        self.norm = RMSNorm(
            t.hidden_size, t.rms_norm_eps, param_dtype=cfg.run.param_dtype, rngs=rngs
        )
        if not t.tie_word_embeddings:
            self.lm_head = dense(
                t.hidden_size, t.vocab_size, ("embed", "vocab"), use_bias=False, **kw
            )

    def __call__(
        self,
        inputs_embeds: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: KVCache | None = None,
        attention: FusedAttention | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Runs the decoder stack.

        Args:
          inputs_embeds: float[B, T, D].
          positions: int32[B, T] RoPE positions.
          segment_ids: int32[B, T]; 0 marks padding, tokens attend only within their segment.
          cache: when given, the T new keys/values are written at `cache.index` and the
            queries attend to everything written so far.
          attention: a fused kernel for the new tokens among themselves (training, and a
            prefill into an empty cache); None = the XLA path of `nn/attention.py`.

        Returns:
          (hidden float[B, T, D] after the final norm, the updated cache or None).
        """
        t = self.cfg.text
        b, seq = segment_ids.shape
        steps = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (b, seq))
        # The new tokens attend to each other causally, and to everything already cached.
        chunk = self.cfg.run.attention_chunk
        if attention is not None and (cache is None or cache.empty):
            mask = FusedCausalMask(segment_ids, attention, t.sliding_window)
        elif cache is None and chunk and seq > chunk:
            mask = ChunkedCausalMask(
                steps, segment_ids, t.sliding_window, chunk, unroll=not self.cfg.run.scan_layers
            )
        else:
            mask = causal_mask(steps, steps, segment_ids, segment_ids, t.sliding_window)
        xs = None
        if cache is not None and not cache.empty:
            kv_steps = jnp.broadcast_to(jnp.arange(cache.segment.shape[1], dtype=jnp.int32),
                                        cache.segment.shape)  # fmt: skip
            index = cache.index if cache.index.ndim == 0 else cache.index[:, None]
            written = jnp.where(kv_steps < index, cache.segment, 0)
            cache_mask = causal_mask(steps + index, kv_steps, segment_ids, written,
                                     t.sliding_window)  # fmt: skip
            xs = (cache.k, cache.v)

        def layer_fn(layer, h, kv):
            cached = None if kv is None else (*kv, cache_mask)
            return layer(constrain(h, HIDDEN), positions, mask, cached)

        h, new_kv = run_stacked(
            self.layers,
            inputs_embeds.astype(self.cfg.run.dtype),
            xs,
            fn=layer_fn,
            num_layers=t.num_hidden_layers,
            scan=self.cfg.run.scan_layers,
            remat=self.cfg.run.remat_policy,
        )
        if cache is not None:
            cache = _append(cache, new_kv, segment_ids)
        return self.norm(constrain(h, HIDDEN)), cache

    def vocab_projection(self, dtype) -> tuple[jax.Array, int]:
        """(weight, vocab_axis) in `dtype`: the lm_head kernel [D, V] (axis 1) or, with tied
        embeddings, the embedding table [V, D] (axis 0)."""
        if self.cfg.text.tie_word_embeddings:
            return self.embed_tokens.embedding[...].astype(dtype), 0
        return self.lm_head.kernel[...].astype(dtype), 1

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float[B, T, D] -> float32[B, T, V], the matmul accumulated in float32."""
        weight, vocab_axis = self.vocab_projection(hidden.dtype)
        spec = "BTD,VD->BTV" if vocab_axis == 0 else "BTD,DV->BTV"
        return jnp.einsum(spec, hidden, weight, preferred_element_type=jnp.float32)
