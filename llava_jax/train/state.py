"""The train state (step, parameters, optimizer state), created directly sharded.

Parameters are a nested dict of arrays (the tree `model_io.save_model_dir` writes), each
placed by the logical-axis rules of `sharding.py`; the optimizer's moments take the sharding
of the parameter they belong to. Nothing is ever gathered onto one host: random
initialisation runs under `jit` with the final `out_shardings`, and a loaded checkpoint is
expected to arrive already sharded (`model_io.load_params(shardings=...)`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llava_jax.config import LlavaConfig
from llava_jax.models import lora
from llava_jax.models.build import abstract_model, abstract_params
from llava_jax.models.llava import LlavaModel
from llava_jax.param_paths import flat_to_nested, nested_to_flat
from llava_jax.sharding import param_shardings
from llava_jax.train.optim import make_optimizer, trainable_labels


@struct.dataclass
class TrainState:
    """Attributes:
    step: int32[] optimizer steps taken (skipped non-finite steps included).
    params: nested {"language_model": {...}, ...} of arrays in `param_dtype`.
    opt_state: the optax state of `make_optimizer` (nothing for frozen parameters).
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


def flat_param_shardings(model_cfg: LlavaConfig, mesh: Mesh) -> dict[str, NamedSharding]:
    """Flat {"a/b/c": NamedSharding} of every parameter of the plain model (what
    `init_from` holds), from abstract shapes."""
    return param_shardings(abstract_model(model_cfg), mesh)


def train_model(model_cfg: LlavaConfig, config) -> LlavaModel:
    """The abstract model the train step runs: the plain model, or with `train.lora` the
    one with adapters (and quantized base kernels for QLoRA), run through qwix."""
    spec = lora.spec_from_config(config)
    if spec is None:
        return abstract_model(model_cfg)
    return nnx.eval_shape(
        lambda: lora.lora_model(LlavaModel(model_cfg, rngs=nnx.Rngs(0)), spec, jax.random.key(0))
    )


def merged_params(model_cfg: LlavaConfig, config, mesh: Mesh, params: dict[str, Any]) -> dict:
    """The plain model's nested params from the trained ones: with `train.lora`, adapters
    merged into their kernels (`lora.merged_params`), in the plain model's shardings;
    otherwise `params` itself."""
    spec = lora.spec_from_config(config)
    if spec is None:
        return params
    graphdef = nnx.graphdef(train_model(model_cfg, config))
    merge = lambda p: flat_to_nested(lora.merged_params(nnx.merge(graphdef, p), spec))  # noqa: E731
    out = flat_to_nested(flat_param_shardings(model_cfg, mesh))
    return jax.jit(merge, out_shardings=out)(params)


def labels_for(model_cfg: LlavaConfig, config) -> dict[str, str]:
    """`trainable_labels` over the trained model's parameter paths."""
    return trainable_labels(nested_to_flat(_abstract_params(model_cfg, config)), config)


def _abstract_params(model_cfg: LlavaConfig, config) -> dict[str, Any]:
    return nnx.to_pure_dict(nnx.state(train_model(model_cfg, config), nnx.Param))


def _opt_state_shardings(opt_state: Any, params: Mapping, flat_shardings: Mapping, mesh):
    """Each optimizer-state leaf takes the sharding of the parameter whose path ends its own
    path and whose shape it has (the moments); everything else (counts) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = {k: tuple(v.shape) for k, v in nested_to_flat(params).items()}

    def pick(path, leaf):
        keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
        for i in range(len(keys)):
            name = "/".join(keys[i:])
            if shapes.get(name) == tuple(leaf.shape):
                return flat_shardings[name]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def state_shardings(model_cfg: LlavaConfig, config, mesh: Mesh, total_steps: int) -> TrainState:
    """A TrainState of NamedShardings: the `out_shardings` / orbax restore layout."""
    return _abstract(model_cfg, config, mesh, total_steps)[1]


def abstract_state(model_cfg: LlavaConfig, config, mesh: Mesh, total_steps: int) -> TrainState:
    """A TrainState of ShapeDtypeStructs carrying their shardings; nothing is allocated."""
    shapes, shardings = _abstract(model_cfg, config, mesh, total_steps)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def _abstract(model_cfg, config, mesh, total_steps):
    model = train_model(model_cfg, config)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_shardings = param_shardings(model, mesh)
    labels = trainable_labels(flat_shardings.keys(), config)
    tx = make_optimizer(config, total_steps, labels)
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=params,
        opt_state=jax.eval_shape(tx.init, params),
    )
    shardings = TrainState(
        step=NamedSharding(mesh, PartitionSpec()),
        params=flat_to_nested(flat_shardings),
        opt_state=_opt_state_shardings(shapes.opt_state, params, flat_shardings, mesh),
    )
    return shapes, shardings


def init_state(
    model_cfg: LlavaConfig,
    config,
    mesh: Mesh,
    total_steps: int,
    *,
    params: Mapping[str, jax.Array] | None = None,
    rng: jax.Array | int | None = None,
) -> TrainState:
    """A fresh TrainState at step 0, every array created in its final sharding.

    Args:
      model_cfg: the model (its `param_dtype` is the parameters' dtype).
      config: the training config (`train.trainable`, `optimizer.*`).
      mesh: the device mesh.
      total_steps: optimizer updates in the run (the schedule's length).
      params: flat {"a/b/c": array} of the plain model from `model_io.load_params`
        (ideally restored with `flat_param_shardings(model_cfg, mesh)`), or None for a
        random initialisation. With `train.lora`, fresh adapters are added to them.
      rng: the key (or seed) of a random initialisation; default `config.train.seed`.
    """
    shapes, shardings = _abstract(model_cfg, config, mesh, total_steps)
    labels = trainable_labels(nested_to_flat(shapes.params).keys(), config)
    tx = make_optimizer(config, total_steps, labels)
    spec = lora.spec_from_config(config)
    rng = config.train.seed if rng is None else rng
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    adapter_key = jax.random.fold_in(key, 1)

    def with_adapters(model):  # the trained model's params from the plain model
        if spec is not None:
            lora.add_adapters(model, spec, adapter_key)
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    if params is None:
        make = lambda key: with_adapters(LlavaModel(model_cfg, rngs=nnx.Rngs(params=key)))  # noqa: E731
        nested = jax.jit(make, out_shardings=shardings.params)(key)
    else:
        nested = _place(model_cfg, mesh, params)
        if spec is not None:
            graphdef = nnx.graphdef(abstract_model(model_cfg))
            add = lambda p: with_adapters(nnx.merge(graphdef, p))  # noqa: E731
            # Donated: the base weights pass through in place instead of being copied.
            nested = jax.jit(add, out_shardings=shardings.params, donate_argnums=0)(nested)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(nested)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=nested, opt_state=opt_state)


def _place(model_cfg: LlavaConfig, mesh: Mesh, params: Mapping[str, jax.Array]) -> dict[str, Any]:
    """Flat params of the plain model, checked against it and placed in its shardings."""
    want = abstract_params(model_cfg)
    missing, unexpected = sorted(set(want) - set(params)), sorted(set(params) - set(want))
    if missing or unexpected:
        raise ValueError(
            f"params do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    flat_sh = flat_param_shardings(model_cfg, mesh)
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
