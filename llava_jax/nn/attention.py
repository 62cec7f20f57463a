"""Scaled dot-product attention with grouped query heads: scores in the compute dtype,
softmax in float32, as transformers' eager attention.

Axis legend: B batch, T query length, S key/value length, N query heads, K key/value heads,
G query heads per key/value head (N = K * G), H head dim, M = G * T query rows.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from llava_jax.nn.chunks import over_positions

_MASKED = -1e30  # finite, so fully masked rows (padding) give a uniform softmax, not NaN


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *more_kv
) -> jax.Array:
    """Softmax(q k^T / sqrt(H)) v: the scores in q's dtype (the matmul accumulates in float32
    and rounds once), the softmax in float32, the probabilities back in v's dtype, as
    transformers' eager attention does. In bfloat16 training the [B, N, T, S] scores are the
    largest tensors of a layer; keeping them in bfloat16 halves their memory traffic.

    Args:
      q: float[B, T, N, H].
      k: float[B, K, S, H] (heads before positions: the layout of the KV cache, so decoding
        reads it without a transpose).
      v: float[B, K, S, H].
      mask: bool[B, T, S] (True = attend), or None for full bidirectional attention.
      *more_kv: further (k, v, mask) blocks attended to jointly, one softmax over all keys.
        Decoding attends to the cache and the new tokens this way without concatenating
        (copying) the cache.

    Returns:
      float[B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    num_kv = k.shape[1]
    g = n // num_kv
    # Batch dimensions leading and (G, T) merged into one row axis: XLA's CPU backend runs
    # this plain batched matmul about 3x faster than the 5-D einsum it is equivalent to.
    q = q.reshape(b, t, num_kv, g, h).transpose(0, 2, 3, 1, 4).reshape(b, num_kv, g * t, h)
    blocks = [(k, v, mask), *zip(more_kv[::3], more_kv[1::3], more_kv[2::3], strict=True)]
    logits = []
    for k_i, _, mask_i in blocks:  # k_i: BKSH
        block = jnp.einsum("BKMH,BKSH->BKMS", q, k_i)
        block = block.reshape(b, num_kv, g, t, -1) * (h**-0.5)
        if mask_i is not None:
            block = jnp.where(mask_i[:, None, None, :, :], block, _MASKED)
        logits.append(block)
    scores = jnp.concatenate(logits, axis=-1).astype(jnp.float32)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    probs = probs.reshape(b, num_kv, g * t, -1)
    out, start = 0, 0
    for k_i, v_i, _ in blocks:
        size = k_i.shape[2]
        out = out + jnp.einsum("BKMS,BKSH->BKMH", probs[..., start : start + size], v_i)
        start += size
    return out.reshape(b, num_kv, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def causal_mask(
    q_index: jax.Array,
    kv_index: jax.Array,
    q_segment: jax.Array,
    kv_segment: jax.Array,
    sliding_window: int | None = None,
) -> jax.Array:
    """Decoder mask: causal, within one segment, never onto padding (segment 0).

    Args:
      q_index: int[B, T] position of each query in the key/value timeline.
      kv_index: int[B, S] position of each key in the same timeline.
      q_segment: int[B, T] segment id of each query (0 = padding).
      kv_segment: int[B, S] segment id of each key (0 = padding or not yet written).
      sliding_window: keys more than this many steps back are masked (Mistral).

    Returns:
      bool[B, T, S].
    """
    dist = q_index[:, :, None] - kv_index[:, None, :]
    mask = dist >= 0
    if sliding_window is not None:
        mask &= dist < sliding_window
    same = q_segment[:, :, None] == kv_segment[:, None, :]
    return mask & same & (kv_segment[:, None, :] != 0)


@struct.dataclass
class ChunkedCausalMask:
    """`causal_mask(steps, steps, segment_ids, segment_ids, window)`, never materialised.

    For long training sequences the [B, T, T] mask and the [B, N, T, T] scores do not fit;
    `chunked_causal_attention` builds them one chunk of queries at a time instead.
    """

    steps: jax.Array  # int[B, T]
    segment_ids: jax.Array  # int[B, T]
    sliding_window: int | None = struct.field(pytree_node=False, default=None)
    chunk: int = struct.field(pytree_node=False, default=2048)
    unroll: bool = struct.field(pytree_node=False, default=False)  # chunks as straight code


def chunked_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: ChunkedCausalMask
) -> jax.Array:
    """`dot_product_attention(q, k, v, causal_mask(...))` in chunks of queries.

    Each chunk attends to all T keys (the masked future included, so no dynamic shapes) and
    is rematerialised in the backward pass: memory O(chunk * T) per layer instead of O(T^2),
    for the same FLOPs as full attention plus the masked half.

    Args:
      q: float[B, T, N, H]; k, v: float[B, K, T, H]; mask: the mask's ingredients.

    Returns:
      float[B, T, N, H].
    """

    def one(q_i, steps_i, segments_i):  # one chunk of queries (padded ones: segment 0)
        m = causal_mask(steps_i, mask.steps, segments_i, mask.segment_ids, mask.sliding_window)
        return dot_product_attention(q_i, k, v, m)

    return over_positions(one, (q, mask.steps, mask.segment_ids), mask.chunk, unroll=mask.unroll)


@struct.dataclass
class FusedCausalMask:
    """`causal_mask(steps, steps, segment_ids, segment_ids, window)` for a fused kernel
    (`nn/attention_kernels.FusedAttention`), which builds it block by block itself.

    Padding differs only where nothing reads it: a padding query (segment 0) attends to the
    padding keys before it instead of uniformly to all keys.
    """

    segment_ids: jax.Array  # int[B, T]
    kernel: Any = struct.field(pytree_node=False)  # FusedAttention
    sliding_window: int | None = struct.field(pytree_node=False, default=None)
