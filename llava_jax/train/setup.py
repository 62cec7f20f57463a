"""The training setup, built once: what the loop, `plan`, the GPU smoke test and the
benchmarks all train with.

`TrainSetup.build(config, total_steps)` derives, from the config alone and without
allocating anything: the model config, the mesh, the global batch shape, the abstract model
(built once), each parameter's label, the optimizer and its schedules, the abstract train
state with its shardings, and the model FLOPs of a step. MaxText builds its run the same
way (`setup_train_loop`, shared with the ahead-of-time `train_compile.py`), so a plan and the
run it plans cannot drift apart.

The parameters split once into the trained ones (the optimizer's, the step's gradients) and
the frozen ones (constants of the forward pass): `split` and `merge` take nested trees apart
and back by a mask computed here, so the step never goes through flat paths.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llava_jax.config import LlavaConfig
from llava_jax.data.batching import BatchShape
from llava_jax.models import lora
from llava_jax.models.build import abstract_model
from llava_jax.param_paths import flat_to_nested, nested_to_flat
from llava_jax.sharding import param_shardings
from llava_jax.train import config_loader, flops
from llava_jax.train.optim import lr_schedules, make_optimizer, trainable_labels
from llava_jax.train.state import TrainState, mesh_from_config, train_model


@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity: it holds a model
class TrainSetup:
    """Everything a run derives from its config before touching data or devices' memory.

    Attributes:
      model_cfg: the model (`model_cfg.run`: compute dtype, master weights, remat).
      config: the training config.
      mesh: the (data, fsdp, tensor) mesh the state lives on.
      total_steps: optimizer updates in the run (the schedules' length).
      batch_shape: the global batch's static shapes (`batch_size` = all processes' rows).
      model: the abstract model the step runs (with `train.lora`: adapters, and quantized
        base kernels for QLoRA).
      labels: flat {"a/b/c": label} of every parameter of `model` (`optim.trainable_labels`).
      tx: the optimizer, over the trained parameters only.
      schedules: {"train": lr(count), ...} (`optim.lr_schedules`).
      abstract: the TrainState as ShapeDtypeStructs carrying their shardings.
      shardings: the TrainState as NamedShardings (`out_shardings`, orbax's restore layout).
      flops_per_step: model FLOPs of one optimizer step on the padded global batch
        (`train/flops.py`, MaxText's convention).
      trained_mask: nested like the params, True where a parameter trains (`split`).
    """

    model_cfg: LlavaConfig
    config: Any
    mesh: Mesh
    total_steps: int
    batch_shape: BatchShape
    model: nnx.Module
    labels: Mapping[str, str]
    tx: optax.GradientTransformation
    schedules: Mapping[str, Callable[[jax.Array], jax.Array]]
    abstract: TrainState
    shardings: TrainState
    flops_per_step: float
    trained_mask: Mapping[str, Any]

    @classmethod
    def build(
        cls,
        config,
        total_steps: int,
        *,
        mesh: Mesh | None = None,
        devices=None,
        model_cfg: LlavaConfig | None = None,
    ) -> TrainSetup:
        """The setup of `config` for a run of `total_steps` updates.

        Args:
          config: a loaded training config (`config_loader.load_config`).
          total_steps: optimizer updates in the run.
          mesh: the mesh to use; default `config.mesh` over `devices`.
          devices: the devices of `config.mesh` (default: all; `plan` passes a
            topology's compile-only devices).
          model_cfg: the model; default `config_loader.model_config(config)`.

        Raises:
          ValueError: `config.mesh` does not divide the devices, or bad `train.trainable`
            patterns (one line each).
        """
        model_cfg = model_cfg or config_loader.model_config(config)
        mesh = mesh if mesh is not None else mesh_from_config(config, devices)
        model = train_model(model_cfg, config)
        flat_shardings = param_shardings(model, mesh)
        labels = trainable_labels(flat_shardings.keys(), config)
        trained = {p: label for p, label in labels.items() if label != "frozen"}
        mask = flat_to_nested({p: label != "frozen" for p, label in labels.items()})
        tx = make_optimizer(config, total_steps, trained)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        trained_params = _split(params, mask)[0]
        replicated = NamedSharding(mesh, PartitionSpec())
        params_sh = flat_to_nested(flat_shardings)
        opt_shapes = jax.eval_shape(tx.init, trained_params)
        shardings = TrainState(
            step=replicated,
            params=params_sh,
            opt_state=opt_state_shardings(opt_shapes, _split(params_sh, mask)[0], replicated),
        )
        shapes = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_shapes
        )
        abstract = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        )
        shape = global_batch_shape(model_cfg, config)
        step_flops = flops.train_flops_per_step(
            model_cfg,
            labels,
            seq_lens=[shape.max_len] * shape.batch_size,
            num_views=shape.batch_size * shape.max_views,
        )
        return cls(
            model_cfg=model_cfg,
            config=config,
            mesh=mesh,
            total_steps=int(total_steps),
            batch_shape=shape,
            model=model,
            labels=labels,
            tx=tx,
            schedules=lr_schedules(config, total_steps),
            abstract=abstract,
            shardings=shardings,
            flops_per_step=step_flops,
            trained_mask=mask,
        )

    @functools.cached_property
    def graphdef(self) -> nnx.GraphDef:
        """The trained model's structure; `nnx.merge(graphdef, params)` is the model."""
        return nnx.graphdef(self.model)

    @functools.cached_property
    def trained(self) -> frozenset[str]:
        """Flat paths of the parameters the optimizer updates."""
        return frozenset(p for p, label in self.labels.items() if label != "frozen")

    @functools.cached_property
    def lora(self) -> lora.LoraSpec | None:
        return lora.spec_from_config(self.config)

    def split(self, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(trained, frozen) nested subtrees of a nested tree shaped like the params."""
        return _split(params, self.trained_mask)

    @staticmethod
    def merge(trained: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
        """The nested tree `split` took apart."""
        return _merge(trained, frozen)

    @functools.cached_property
    def plain_model(self) -> nnx.Module:
        """The abstract model without adapters (what `init_from` and an export hold): the
        trained model itself unless `train.lora` is set."""
        return self.model if self.lora is None else abstract_model(self.model_cfg)

    @functools.cached_property
    def plain_params(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Flat {"a/b/c": ShapeDtypeStruct} of the plain model's parameters."""
        return nested_to_flat(nnx.to_pure_dict(nnx.state(self.plain_model, nnx.Param)))

    @functools.cached_property
    def plain_param_shardings(self) -> dict[str, NamedSharding]:
        """Flat {"a/b/c": NamedSharding} of the plain model's parameters."""
        if self.lora is None:
            return nested_to_flat(self.shardings.params)
        return param_shardings(self.plain_model, self.mesh)

    def process_batch_shape(self, process_count: int) -> BatchShape:
        """The shape of one process's rows of the global batch."""
        rows = self.batch_shape.batch_size
        if rows % process_count:
            raise config_loader.ConfigLoadError(
                f"config.train.batch_size={rows} does not divide over {process_count} processes"
            )
        return dataclasses.replace(self.batch_shape, batch_size=rows // process_count)


def global_batch_shape(model_cfg: LlavaConfig, config) -> BatchShape:
    """The global batch's static shapes: `train.batch_size` rows of `data.max_len` tokens,
    `data.max_views` views and `data.max_image_tokens` image tokens (0: `max_len`, as image
    tokens can never outnumber a row's tokens)."""
    max_image_tokens = int(config.data.max_image_tokens) or int(config.data.max_len)
    return BatchShape.for_model(
        model_cfg,
        int(config.train.batch_size),
        int(config.data.max_len),
        int(config.data.max_views),
        max_image_tokens,
    )


def opt_state_shardings(opt_state: Any, params_sh: Mapping, replicated: NamedSharding) -> Any:
    """Each optimizer-state subtree shaped like the trained parameters (optax's moments
    mirror the params tree; `multi_transform` puts MaskedNodes where another group's
    parameters are) takes the parameters' shardings leaf by leaf; every other leaf (the
    counts) is replicated."""
    structure = jax.tree.structure(params_sh)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731

    def mirrors_params(node) -> bool:
        return isinstance(node, Mapping) and jax.tree.structure(node, is_leaf=masked) == structure

    def place(node):
        if not mirrors_params(node):
            return replicated
        return jax.tree.map(lambda sh, leaf: leaf if masked(leaf) else sh, params_sh, node)

    return jax.tree.map(place, opt_state, is_leaf=mirrors_params)


def _split(tree: Mapping[str, Any], mask: Mapping[str, Any]) -> tuple[dict, dict]:
    trained, frozen = {}, {}
    for key, value in tree.items():
        m = mask[key]
        if isinstance(m, Mapping):
            t, f = _split(value, m)
            if t:
                trained[key] = t
            if f:
                frozen[key] = f
        elif m:
            trained[key] = value
        else:
            frozen[key] = value
    return trained, frozen


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if key in out else value
    return out
