"""A stack of identical layers stored with a leading `layers` axis.

Parameters always live stacked (float[L, ...]), whatever the execution switches say, so a
checkpoint is independent of them. `run_stacked` either scans over the stack (one compiled
layer, fast compiles) or unrolls a Python loop over slices of it (XLA sees every layer);
either way each layer can be rematerialised with a named policy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from llava_jax.config import RematPolicy

_POLICIES = {
    RematPolicy.FULL: jax.checkpoint_policies.nothing_saveable,
    RematPolicy.DOTS: jax.checkpoint_policies.checkpoint_dots,
    RematPolicy.DOTS_NO_BATCH: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs):
    """Builds `num_layers` independently initialised layers as one module with stacked params."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return make_layer(rngs)

    return make(rngs)


LayerFn = Callable[[nnx.Module, Any, Any], tuple[Any, Any]]


def run_stacked(
    layers: nnx.Module,
    carry: Any,
    xs: Any = None,
    *,
    fn: LayerFn,
    num_layers: int,
    scan: bool,
    remat: RematPolicy = RematPolicy.NONE,
) -> tuple[Any, Any]:
    """Applies the first `num_layers` layers in order, like `jax.lax.scan`.

    Args:
      layers: a module built by `stacked`.
      carry: threaded through the layers (the hidden states).
      xs: per-layer inputs with a leading layer axis (a KV cache), or None.
      fn: `fn(layer, carry, x) -> (carry, y)` for one layer.
      num_layers: how many layers to run (later ones are skipped, e.g. past the vision
        feature layer).
      scan: scan over layers instead of unrolling.
      remat: rematerialisation policy for each layer.

    Returns:
      (carry, ys) with ys stacked on a leading layer axis.
    """
    if num_layers == 0:
        return carry, None
    graphdef, state = nnx.split(layers)
    state = jax.tree.map(lambda p: p[:num_layers], state)

    def body(carry, layer_and_x):
        layer_state, x = layer_and_x
        return fn(nnx.merge(graphdef, layer_state), carry, x)

    if remat != RematPolicy.NONE:
        body = jax.checkpoint(body, policy=_POLICIES[remat], prevent_cse=not scan)
    if scan:
        return jax.lax.scan(body, carry, (state, xs))
    ys = []
    for i in range(num_layers):
        carry, y = body(carry, jax.tree.map(lambda p, i=i: p[i], (state, xs)))
        ys.append(y)
    return carry, jax.tree.map(lambda *y: jax.numpy.stack(y), *ys) if ys[0] is not None else None
