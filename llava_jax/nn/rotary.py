"""Rotary position embeddings, rotate-half convention (HF LLaMA / Qwen2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates pairs (i, i + H/2) of x by angle position / theta^(2i/H).

    Args:
      x: float[B, T, N, H].
      positions: int[B, T].
      theta: the RoPE base (10,000 for LLaMA-2, 1,000,000 for Qwen2 and Mistral v0.2).

    Returns:
      float[B, T, N, H] in x's dtype; angles, sin and cos in float32 as in HF.
    """
    h = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, H]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)
