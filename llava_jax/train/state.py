"""The train state (step, parameters, optimizer state), created directly sharded.

Parameters are a nested dict of arrays (the tree `model_io.save_model_dir` writes), each
placed by the logical-axis rules of `sharding.py`; the optimizer's state covers the trained
parameters only, its moments in the shardings of their parameters (`train/setup.py`).
Nothing is ever gathered onto one host: random initialisation runs under `jit` with the
final `out_shardings`, and a loaded checkpoint is expected to arrive already sharded
(`model_io.load_params(shardings=...)`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import Mesh

from llava_jax.config import LlavaConfig
from llava_jax.models import lora
from llava_jax.models.build import abstract_model
from llava_jax.models.llava import LlavaModel
from llava_jax.param_paths import flat_to_nested, nested_to_flat
from llava_jax.train.optim import trainable_labels

if TYPE_CHECKING:
    from llava_jax.train.setup import TrainSetup


@struct.dataclass
class TrainState:
    """Attributes:
    step: int32[] optimizer steps taken (skipped non-finite steps included).
    params: nested {"language_model": {...}, ...} of arrays in `param_dtype`.
    opt_state: the optax state of `make_optimizer`, over the trained parameters only.
    """

    step: jax.Array
    params: dict[str, Any]
    opt_state: Any


def mesh_from_config(config, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh of `config.mesh` (per slice on a multi-slice TPU run)."""
    from llava_jax.sharding import make_mesh

    m = config.mesh
    try:
        return make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
    except ValueError as e:
        raise ValueError(f"config.mesh: {e}") from None


def train_model(model_cfg: LlavaConfig, config) -> LlavaModel:
    """The abstract model the train step runs: the plain model, or with `train.lora` the
    one with adapters (and quantized base kernels for QLoRA), run through qwix."""
    spec = lora.spec_from_config(config)
    if spec is None:
        return abstract_model(model_cfg)
    return nnx.eval_shape(
        lambda: lora.lora_model(LlavaModel(model_cfg, rngs=nnx.Rngs(0)), spec, jax.random.key(0))
    )


def merged_params(setup: TrainSetup, params: dict[str, Any]) -> dict:
    """The plain model's nested params from the trained ones: with `train.lora`, adapters
    merged into their kernels (`lora.merged_params`), in the plain model's shardings;
    otherwise `params` itself."""
    if setup.lora is None:
        return params
    graphdef, spec = setup.graphdef, setup.lora
    merge = lambda p: flat_to_nested(lora.merged_params(nnx.merge(graphdef, p), spec))  # noqa: E731
    out = flat_to_nested(setup.plain_param_shardings)
    return jax.jit(merge, out_shardings=out)(params)


def labels_for(model_cfg: LlavaConfig, config) -> dict[str, str]:
    """`trainable_labels` over the trained model's parameter paths (no mesh needed; a run
    reads them from its `TrainSetup`)."""
    params = nnx.to_pure_dict(nnx.state(train_model(model_cfg, config), nnx.Param))
    return trainable_labels(nested_to_flat(params), config)


def init_state(
    setup: TrainSetup,
    *,
    params: Mapping[str, jax.Array] | None = None,
    rng: jax.Array | int | None = None,
) -> TrainState:
    """A fresh TrainState at step 0, every array created in its final sharding.

    Args:
      setup: the run's `TrainSetup` (model, optimizer, shardings).
      params: flat {"a/b/c": array} of the plain model from `model_io.load_params`
        (ideally restored with `setup.plain_param_shardings`), or None for a random
        initialisation. With `train.lora`, fresh adapters are added to them.
      rng: the key (or seed) of a random initialisation; default `config.train.seed`.
    """
    shardings, spec = setup.shardings, setup.lora
    rng = setup.config.train.seed if rng is None else rng
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    adapter_key = jax.random.fold_in(key, 1)

    def with_adapters(model):  # the trained model's params from the plain model
        if spec is not None:
            lora.add_adapters(model, spec, adapter_key)
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    if params is None:
        model_cfg = setup.model_cfg
        make = lambda key: with_adapters(LlavaModel(model_cfg, rngs=nnx.Rngs(params=key)))  # noqa: E731
        nested = jax.jit(make, out_shardings=shardings.params)(key)
    else:
        nested = _place(setup, params)
        if spec is not None:
            graphdef = nnx.graphdef(setup.plain_model)
            add = lambda p: with_adapters(nnx.merge(graphdef, p))  # noqa: E731
            # Donated: the base weights pass through in place instead of being copied.
            nested = jax.jit(add, out_shardings=shardings.params, donate_argnums=0)(nested)
    init = lambda p: setup.tx.init(setup.split(p)[0])  # noqa: E731
    opt_state = jax.jit(init, out_shardings=shardings.opt_state)(nested)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=nested, opt_state=opt_state)


def _place(setup: TrainSetup, params: Mapping[str, jax.Array]) -> dict[str, Any]:
    """Flat params of the plain model, checked against it and placed in its shardings."""
    want = setup.plain_params
    missing, unexpected = sorted(set(want) - set(params)), sorted(set(params) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"params do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    flat_sh = setup.plain_param_shardings
    placed = {}
    for path, value in params.items():
        if tuple(value.shape) != tuple(want[path].shape):
            want_shape = want[path].shape
            raise ValueError(f"{path}: shape {value.shape}, the model expects {want_shape}")
        value = value.astype(want[path].dtype) if value.dtype != want[path].dtype else value
        placed[path] = jax.device_put(value, flat_sh[path])
    return flat_to_nested(placed)


def has_optimizer_state(opt_state: Any, path: str) -> bool:
    """Whether any optimizer-state leaf belongs to parameter `path` ("a/b/c")."""
    found = []

    def visit(p, leaf):
        keys = [str(k.key) for k in p if isinstance(k, jax.tree_util.DictKey)]
        if ("/" + "/".join(keys)).endswith("/" + path):
            found.append(leaf)

    jax.tree_util.tree_map_with_path(visit, opt_state)
    return bool(found)
