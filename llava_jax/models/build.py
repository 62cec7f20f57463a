"""Building a `LlavaModel` without memory (abstractly) or around given parameters."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from llava_jax.config import LlavaConfig
from llava_jax.models.llava import LlavaModel
from llava_jax.param_paths import flat_to_nested, nested_to_flat


def abstract_model(cfg: LlavaConfig) -> LlavaModel:
    """The model with ShapeDtypeStruct parameters: no memory allocated."""
    return nnx.eval_shape(lambda: LlavaModel(cfg, rngs=nnx.Rngs(0)))


def abstract_params(cfg: LlavaConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat {"a/b/c": ShapeDtypeStruct} of every parameter of `LlavaModel(cfg)`."""
    state = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
    return nested_to_flat(state)


def default_sharding() -> jax.sharding.Sharding:
    """Where a loaded model's parameters go unless a mesh says otherwise: the first local device."""
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def model_from_params(cfg: LlavaConfig, params: Mapping[str, Any]) -> LlavaModel:
    """`LlavaModel(cfg)` holding `params` (flat {path: array}), each placed on the device.

    Host NumPy arrays would be copied into the device again at every jitted call (a decode
    step reads all weights), so every parameter becomes a device array here, whichever
    loader produced it; arrays already placed stay where they are.
    """
    device = default_sharding()
    placed = {
        path: value if isinstance(value, jax.Array) else jax.device_put(value, device)
        for path, value in params.items()
    }
    model = abstract_model(cfg)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, flat_to_nested(placed))
    nnx.update(model, state)
    return model


def model_params(model: LlavaModel) -> dict[str, np.ndarray]:
    """Flat {path: array} of a model's parameters."""
    return nested_to_flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
