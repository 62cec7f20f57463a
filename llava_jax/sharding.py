"""Placing parameters on a device mesh from their logical axis names.

Every parameter names its axes (`layers`, `embed`, `mlp`, `q_heads`, `kv_heads`, `vocab`,
...). One rules table maps each logical name to a mesh axis; FSDP in one sentence: the
`embed` axis goes to `fsdp`, and activations' batch goes to (`data`, `fsdp`). A dimension the
mesh axis does not divide stays replicated rather than failing, so one table serves a tiny
test model and a 72B one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llava_jax.models.build import model_params
from llava_jax.param_paths import flat_to_nested

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axis or None), first match wins.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
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
    """The mesh PartitionSpec of one array from its logical axis names."""
    table = dict(rules)
    spec = []
    for name, dim in zip(names, shape, strict=True):
        axis = table.get(name) if name is not None else None
        if axis is not None and (dim % mesh.shape[axis] or axis in spec):
            axis = None  # uneven, or the mesh axis is already used by another dimension
        spec.append(axis)
    return PartitionSpec(*spec)


def param_shardings(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> dict[str, NamedSharding]:
    """Flat {"a/b/c": NamedSharding} for every parameter (the form `load_params` takes)."""
    params = model_params(model)
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
    placed = {k: jax.device_put(v, shardings[k]) for k, v in model_params(model).items()}
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, flat_to_nested(placed))
    nnx.update(model, state)
    return model
