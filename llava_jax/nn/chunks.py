"""Running a function over chunks of sequence positions, for bounded memory at long T.

Used by chunked attention (`nn/attention.py`) and the chunked loss (`train/step.py`): each
chunk is recomputed in the backward pass, so only one chunk's intermediates (attention
scores, vocabulary logits) exist at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def map_chunks(fn: Callable[[Any], Any], xs: Any, unroll: bool = False) -> Any:
    """`jax.lax.map(fn, xs)`, or the same as straight-line code when `unroll` (so XLA's cost
    analysis, which counts a loop body once, counts every chunk)."""
    if not unroll:
        return jax.lax.map(fn, xs)
    n = jax.tree.leaves(xs)[0].shape[0]
    outs = [fn(jax.tree.map(lambda x, i=i: x[i], xs)) for i in range(n)]
    return jax.tree.map(lambda *ys: jnp.stack(ys), *outs)


def over_positions(
    fn: Callable[..., Any], xs: Sequence[jax.Array], chunk: int, *, unroll: bool = False
) -> Any:
    """`fn(*xs)`, computed `chunk` positions at a time and rematerialised in the backward pass.

    Args:
      fn: maps arrays [B, chunk, ...] (one per `xs`) to a pytree of arrays [B, chunk, ...];
        it must treat positions independently (it may close over whole-sequence arrays).
      xs: arrays [B, T, ...]; T is zero-padded to a multiple of `chunk`.
      chunk: positions per call.
      unroll: straight-line code instead of a loop (see `map_chunks`).

    Returns:
      fn's outputs for all T positions, [B, T, ...]. Rows stay on axis 0 of every chunk, so
      their (data, fsdp) sharding carries through.
    """
    b, t = xs[0].shape[:2]
    pad = -t % chunk
    n = (t + pad) // chunk

    def split(x):  # [B, T, ...] -> [n, B, chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    def join(y):  # [n, B, chunk, ...] -> [B, T, ...]
        return y.swapaxes(0, 1).reshape(b, n * chunk, *y.shape[3:])[:, :t]

    out = map_chunks(jax.checkpoint(lambda parts: fn(*parts)), tuple(map(split, xs)), unroll)
    return jax.tree.map(join, out)
