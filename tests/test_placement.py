"""Placement (`sharding.py`): logical axis names to mesh axes, the batch's sharding, and the
activation constraints the models state at every layer boundary."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from train_helpers import STAGE2, model_config, random_batch, train_config

from llava_jax.sharding import (
    HIDDEN,
    batch_sharding,
    constrain,
    logical_to_mesh,
    make_mesh,
    shard_batch,
)
from llava_jax.train.setup import TrainSetup
from llava_jax.train.step import make_train_step


def test_rules_take_several_axes_skip_absent_ones_and_replicate_what_does_not_divide():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert logical_to_mesh(HIDDEN, (8, 16, 32), mesh) == PartitionSpec(("data", "fsdp"), None, None)
    assert logical_to_mesh(HIDDEN, (6, 16, 32), mesh) == PartitionSpec(None, None, None)  # 6 % 4
    assert logical_to_mesh(("embed", "mlp"), (32, 64), mesh) == PartitionSpec("fsdp", "tensor")
    # A mesh axis serves one dimension only; the second asking for it is replicated.
    assert logical_to_mesh(("activation_batch", "embed"), (8, 8), mesh) == PartitionSpec(
        ("data", "fsdp"), None
    )
    # A mesh without `fsdp` (an inference mesh, say): rows over `data` alone.
    data_only = Mesh(np.array(jax.devices()[:2]), ("data",))
    assert logical_to_mesh(HIDDEN, (4, 3, 2), data_only) == PartitionSpec("data", None, None)
    assert batch_sharding(data_only).spec == PartitionSpec("data")


def test_shard_batch_takes_the_named_fields_and_leaves_the_rest_on_the_host():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    local = {"input_ids": np.arange(16).reshape(8, 2), "num_samples": 8}
    arrays = shard_batch(local, mesh, ["input_ids"])
    assert arrays.keys() == {"input_ids"}
    assert arrays["input_ids"].sharding.spec == PartitionSpec(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(arrays["input_ids"]), local["input_ids"])


def test_constrain_changes_nothing_without_a_mesh():
    """One device (inference, the CPU tests): no constraint in the program at all."""
    jaxpr = jax.make_jaxpr(lambda x: constrain(x, HIDDEN))(jnp.ones((8, 4, 2)))
    assert "sharding_constraint" not in str(jaxpr)


def test_train_step_states_the_hidden_layout_at_the_layer_boundaries():
    """On a (2, 2, 2) mesh the step's program pins the hidden states [B, T, D] of the
    decoder and [N, P, D] of the tower to rows over (data, fsdp), replicated over `tensor`,
    instead of leaving the layout between layers to XLA's propagation."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    cfg, config = model_config(), train_config(STAGE2)
    setup = TrainSetup.build(config, 10, mesh=mesh, model_cfg=cfg)
    state, step = setup.abstract, make_train_step(setup)
    batch = shard_batch(random_batch(0), mesh)
    text = step.jitted.lower(state, batch).as_text()
    hidden = re.findall(
        r'sdy\.sharding_constraint %\S+ <@\w+, \[\{"data", "fsdp"\}, \{\}, \{\}\]> : '
        r"tensor<(\d+)x(\d+)x(\d+)x",
        text,
    )
    widths = {int(d) for _, _, d in hidden}
    assert {cfg.text.hidden_size, cfg.vision.hidden_size} <= widths, hidden
