"""Placement: the mesh, and where every parameter, batch and activation lives on it.

Every parameter names its axes (`layers`, `embed`, `mlp`, `q_heads`, `kv_heads`, `vocab`,
...), and the models name their activations' axes at layer boundaries (`activation_batch`,
`activation_length`, `activation_embed`). One rules table maps each logical name to mesh
axes; FSDP in one sentence: the `embed` axis of weights goes to `fsdp`, and the batch of
inputs and activations goes to (`data`, `fsdp`). With `tensor` > 1 the layers' inner
dimensions (heads, MLP, vocabulary) split over `tensor` and the residual stream between
layers is replicated over it (Megatron-LM's layout). A dimension the mesh axes do not divide
stays replicated rather than failing, so one table serves a tiny test model and a 72B one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llava_jax.param_paths import flat_to_nested, nested_to_flat

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes that split a batch's rows
# Logical axes of the hidden states between layers, float[B, T, D] (the tower's [N, P, D]).
HIDDEN = ("activation_batch", "activation_length", "activation_embed")

# (logical axis, mesh axis, several axes, or None), first match wins.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("layers", None),
    ("embed", "fsdp"),
    ("vision_embed", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    # LoRA's rank axis: FSDP-sharded where the adapter has no `embed` axis (B of q/k/v/
    # gate/up, A of down), so no adapter is replicated on every chip.
    ("lora_rank", "fsdp"),
    # Activations between layers: rows over the batch axes, the rest replicated.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
)


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); -1 takes what is left.

    On several TPU slices (multi-slice: the devices' `slice_index` differs) the sizes
    describe one slice and `data` is multiplied by the slice count, so data parallelism is
    the only traffic over the data-centre network and FSDP and tensor parallelism stay on
    each slice's ICI.

    Raises:
      ValueError: the sizes do not divide the devices (one line).
    """

    def slice_of(d):  # absent or 0 except on multi-slice TPUs
        return getattr(d, "slice_index", None) or 0

    devices = sorted(devices if devices is not None else jax.devices(),
                     key=lambda d: (slice_of(d), d.id))  # fmt: skip
    num_slices = len({slice_of(d) for d in devices})
    per_slice = len(devices) // num_slices
    sizes = [data, fsdp, tensor]
    where = f"{per_slice} devices per slice" if num_slices > 1 else f"{len(devices)} devices"
    named = dict(zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {named}: sizes must be positive, at most one of them -1")
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % num_slices or per_slice % known:
        raise ValueError(f"mesh {named} does not divide {where}")
    sizes = [per_slice // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != per_slice:
        named = dict(zip(MESH_AXES, sizes, strict=True))
        raise ValueError(f"mesh {named} needs {math.prod(sizes)} devices, found {where}")
    # JAX's mesh_utils lay each axis along the physical torus (TPU device coordinates; other
    # platforms keep the given order); on several slices `data` is slice-major: its rows fill
    # one slice, then the next.
    if num_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(
            sizes, [num_slices, 1, 1], devices, allow_split_physical_axes=True
        )
    else:
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)


def logical_to_mesh(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=DEFAULT_RULES
) -> PartitionSpec:
    """The mesh PartitionSpec of one array from its logical axis names.

    A rule's mesh axes that `mesh` lacks are left out; a dimension they do not divide, or
    whose axes another dimension already uses, is replicated.
    """
    table = dict(rules)
    spec, used = [], set()
    for name, dim in zip(names, shape, strict=True):
        rule = table.get(name) if name is not None else None
        axes = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ())
                     if a in mesh.shape)  # fmt: skip
        if not axes or dim % math.prod(mesh.shape[a] for a in axes) or used & set(axes):
            spec.append(None)
            continue
        used |= set(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: Sequence[str | None], rules=DEFAULT_RULES) -> jax.Array:
    """`x` pinned to the mesh axes of its logical axis `names` when traced under a mesh
    (`jax.sharding.use_abstract_mesh`, as the train step is); unchanged without one, so
    the models run as they are on one device.

    The models call it on the hidden states at every layer boundary, so that how a layer's
    input and output are split is stated, not left to XLA's propagation (which, with
    `tensor` > 1, may keep the residual stream split in whatever way the last matmul left it).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh(names, x.shape, mesh, rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Dimension 0 (rows) split over the batch axes; the rest replicated."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return NamedSharding(mesh, PartitionSpec(axes or None))


def shard_batch(
    local: Mapping[str, np.ndarray], mesh: Mesh, fields: Iterable[str] | None = None
) -> dict[str, jax.Array]:
    """Global arrays, rows over the batch axes, from this process's rows of `fields`
    (default: every entry of `local`).

    Every process passes its own consecutive block of rows (process p holds rows
    p * B / P ... (p + 1) * B / P - 1 of the global batch of B rows); the rest of `local`
    (a loader's counters and sample ids) stays on the host.
    """
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(local[k]))
        for k in (local if fields is None else fields)
    }


def param_shardings(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, NamedSharding]:
    """Flat {"a/b/c": NamedSharding} for every parameter (the form `load_params` takes)."""
    params = nested_to_flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    names = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    shardings = {}
    for path, var in nnx.to_flat_state(names):
        key = "/".join(map(str, path))
        spec = logical_to_mesh(tuple(var.get_value()), params[key].shape, mesh, rules)
        shardings[key] = NamedSharding(mesh, spec)
    return shardings


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
    """Moves the model's parameters onto `mesh` (in place) and returns the model."""
    shardings = param_shardings(model, mesh, rules)
    params = nested_to_flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    placed = {k: jax.device_put(v, shardings[k]) for k, v in params.items()}
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, flat_to_nested(placed))
    nnx.update(model, state)
    return model
