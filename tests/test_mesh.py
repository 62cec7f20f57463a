"""The (data, fsdp, tensor) mesh: sizes, errors, and multi-slice layout (one builder serves
`llava-jax train` and `llava-jax plan`)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from llava_jax.planning import topology as topo_lib
from llava_jax.sharding import make_mesh
from llava_jax.train.config_loader import load_config
from llava_jax.train.state import mesh_from_config


def test_sizes_and_the_rest():
    mesh = make_mesh(data=2, fsdp=-1, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert [d.id for d in mesh.devices.flat] == sorted(d.id for d in jax.devices())
    assert dict(make_mesh(1, 1, 1, devices=jax.devices()[:1]).shape) == {
        "data": 1, "fsdp": 1, "tensor": 1
    }  # fmt: skip


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((3, -1, 1), r"mesh \{'data': 3, 'fsdp': -1, 'tensor': 1\} does not divide 8 devices"),
        ((2, 2, 1), r"needs 4 devices, found 8 devices"),
        ((-1, -1, 1), "at most one of them -1"),
        ((0, -1, 1), "sizes must be positive"),
    ],
)
def test_bad_sizes_are_one_line_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(*sizes)


def test_config_errors_name_the_field():
    config = load_config("configs/shapes_tiny.py", ["--config.mesh.data=3"])
    with pytest.raises(ValueError, match=r"^config\.mesh: mesh .* does not divide 8 devices$"):
        mesh_from_config(config)


@pytest.mark.skipif(not topo_lib.libtpu_available(), reason="libtpu not installed")
def test_multislice_training_mesh_keeps_fsdp_inside_each_slice():
    """Two v5p-16 slices (8 chips each): the recipe's `fsdp=-1` means one slice's chips, and
    `data` runs over the slices, so only gradients' data-parallel traffic crosses DCN."""
    devices = topo_lib.compile_devices(topo_lib.parse_topology("v5p-16", num_slices=2))
    shuffled = [devices[i] for i in np.random.default_rng(0).permutation(len(devices))]
    config = load_config("configs/llava15_7b_finetune.py", ["--config.mesh.tensor=2"])
    mesh = mesh_from_config(config, shuffled)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 2}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()
    with pytest.raises(ValueError, match="does not divide 8 devices per slice"):
        make_mesh(3, -1, 1, devices=devices)


@pytest.mark.skipif(not topo_lib.libtpu_available(), reason="libtpu not installed")
@pytest.mark.parametrize("name, tensor", [("v5p-64", 4), ("v5p-64", 2), ("v5e-16", 4)])
def test_the_tensor_axis_follows_the_torus(name, tensor):
    """mesh_utils lays the tensor axis (the most traffic) along one physical axis of the
    slice; in device-id order a group of 4 was a 2x2 square of chips."""
    devices = topo_lib.compile_devices(topo_lib.parse_topology(name))
    mesh = make_mesh(1, -1, tensor, devices=devices)
    for group in mesh.devices.reshape(-1, tensor):
        coords = np.array([d.coords for d in group])
        varying = [axis for axis in range(coords.shape[1]) if len(set(coords[:, axis])) > 1]
        assert len(varying) == 1, f"tensor group spans {coords.tolist()}"
