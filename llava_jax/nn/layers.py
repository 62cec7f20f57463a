"""Small building blocks: partitioned initialisers, dense layers, norms, activations.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `vocab`, ...); the
training code maps them onto a device mesh with one rules table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llava_jax.config import Activation

Dtype = jnp.dtype | str


def partitioned(init, *names: str | None):
    """`init` annotated with logical axis names; placement happens later, under a mesh."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    use_bias: bool,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """`nnx.Linear` with kernel float[in, out] named `axes` (HF stores the transpose)."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=partitioned(nnx.initializers.lecun_normal(), *axes),
        bias_init=partitioned(nnx.initializers.zeros_init(), axes[1]),
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """LLaMA/Qwen2 RMSNorm: normalise in float32, cast back, then multiply by the weight."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Dtype, rngs: nnx.Rngs):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(
            partitioned(nnx.initializers.ones_init(), "norm")(None, (dim,), param_dtype)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with weight and bias, statistics in float32 (torch does the same for fp32)."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Dtype, rngs: nnx.Rngs):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(
            partitioned(nnx.initializers.ones_init(), "norm")(None, (dim,), param_dtype)
        )
        self.bias = nnx.Param(
            partitioned(nnx.initializers.zeros_init(), "norm")(None, (dim,), param_dtype)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def activation(kind: Activation):
    """The exact activation function each checkpoint was trained with."""
    if kind == Activation.QUICK_GELU:
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if kind == Activation.GELU_TANH:
        return lambda x: jax.nn.gelu(x, approximate=True)
    if kind == Activation.GELU:  # jax.nn.gelu defaults to the tanh approximation
        return lambda x: jax.nn.gelu(x, approximate=False)
    if kind == Activation.SILU:
        return jax.nn.silu
    raise ValueError(f"unsupported activation {kind!r}")
