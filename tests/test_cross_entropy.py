"""The blockwise vocabulary projection + cross-entropy (`nn/cross_entropy.py`) against the
chunked loss it replaces on TPU and GPU, and which one a run gets.

The tiny model's 64-entry vocabulary in blocks of 24: three blocks, the last one padded.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from train_helpers import TINY, model_config, random_batch

from llava_jax.models.llava import LlavaModel
from llava_jax.nn import cross_entropy
from llava_jax.nn.cross_entropy import LossImpl, blockwise_cross_entropy, resolve_loss
from llava_jax.param_paths import nested_to_flat
from llava_jax.planning import topology as topo_lib
from llava_jax.sharding import make_mesh
from llava_jax.train.step import token_losses


@pytest.mark.parametrize("vocab_axis", [1, 0])
@pytest.mark.parametrize("unroll", [False, True])
def test_blockwise_equals_optax(vocab_axis, unroll):
    """CE, argmax and both gradients, against optax on the whole float32 logits; ties in the
    logits resolve to the first maximum, as jnp.argmax."""
    r = np.random.default_rng(0)
    hidden = jnp.asarray(r.normal(size=(2, 7, 16)), jnp.float32)
    weight = jnp.asarray(r.normal(size=(16, 50)), jnp.float32)
    weight = weight.at[:, 40].set(weight[:, 3])  # entries 3 and 40 tie everywhere
    targets = jnp.asarray(r.integers(0, 50, (2, 7)))
    scale = jnp.cos(jnp.arange(7.0))  # a cotangent that differs per position

    def ours(h, w):
        w = w if vocab_axis == 1 else w.T
        return blockwise_cross_entropy(h, w, targets, vocab_axis=vocab_axis, block=16,
                                       unroll=unroll)  # fmt: skip

    def reference(h, w):
        logits = jnp.einsum("BTD,DV->BTV", h, w)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return ce, jnp.argmax(logits, axis=-1) == targets

    (ce, ok), (ce_ref, ok_ref) = ours(hidden, weight), reference(hidden, weight)
    np.testing.assert_allclose(ce, ce_ref, rtol=1e-6, atol=3e-6, err_msg="CE")
    np.testing.assert_array_equal(ok, ok_ref, err_msg="argmax == target")
    grads = [jax.grad(lambda h, w, f=f: jnp.sum(f(h, w)[0] * scale), argnums=(0, 1))
             for f in (ours, reference)]  # fmt: skip
    for name, a, b in zip(("d hidden", "d weight"), grads[0](hidden, weight),
                          grads[1](hidden, weight), strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


CASES = {  # name: (tied embeddings, compute dtype, scan_layers, tolerance of CE and gradients)
    "untied, float32": (False, "float32", True, 1e-5),
    "tied, float32, unrolled": (True, "float32", False, 1e-5),
    # bfloat16: the logits' gradient enters its matmuls rounded to bfloat16 here, float32 in
    # the chunked path; the loss itself is float32 in both.
    "untied, bfloat16": (False, "bfloat16", True, 2e-2),
    "tied, bfloat16": (True, "bfloat16", True, 2e-2),  # OneVision-0.5B's head
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if i == 0 else pytest.mark.slow) for i, n in enumerate(CASES)]
)
def test_blockwise_equals_the_chunked_loss(name, monkeypatch):
    """`token_losses` with the whole tiny model: the masked mean CE, the argmax hits and the
    gradient of every parameter, blockwise (3 vocabulary blocks) against chunked (5
    positions at a time); only supervised positions count, as in the step."""
    tied, dtype, scan, tol = CASES[name]
    monkeypatch.setattr(cross_entropy, "VOCAB_BLOCK", 24)
    cfg = model_config(
        text=dataclasses.replace(TINY.text, tie_word_embeddings=tied),
        scan_layers=scan,
        dtype=dtype,
    )
    graphdef, params = nnx.split(LlavaModel(cfg, rngs=nnx.Rngs(params=0)), nnx.Param)
    params = nnx.to_pure_dict(params)
    batch = {k: jnp.asarray(v) for k, v in random_batch(1, rows=2, length=16).items()}
    mask = batch["loss_mask"]

    def loss(p, impl):
        ce, correct = token_losses(graphdef, p, batch, 5, loss_impl=impl)
        return jnp.sum(ce * mask) / jnp.sum(mask), (ce * mask, correct & (mask > 0))

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    g_block, (ce_block, ok_block) = grad(params, LossImpl.BLOCKWISE)
    g_chunk, (ce_chunk, ok_chunk) = grad(params, LossImpl.CHUNKED)
    np.testing.assert_allclose(ce_block, ce_chunk, rtol=tol, atol=tol, err_msg=f"{name}: CE")
    np.testing.assert_array_equal(ok_block, ok_chunk, err_msg=f"{name}: argmax == target")
    flat_b, flat_c = nested_to_flat(g_block), nested_to_flat(g_chunk)
    assert flat_b.keys() == flat_c.keys()
    # Relative to the largest gradient entry of the model: some gradients are zero but for
    # rounding (a key bias does not change a softmax), and their noise is not comparable.
    scale = max(np.max(np.abs(np.asarray(g, np.float32))) for g in flat_c.values())
    for path, want in flat_c.items():
        err = np.max(np.abs(np.asarray(flat_b[path], np.float32) - np.asarray(want, np.float32)))
        assert err <= tol * scale, f"{name}: d {path} differs by {err / scale:.3g} of the largest"


def _fake_mesh(platform):
    return types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=platform)]))


def test_auto_follows_the_devices_the_step_is_compiled_for():
    cpu = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    assert resolve_loss("auto", cpu) == LossImpl.CHUNKED  # CPU numbers unchanged
    assert resolve_loss("blockwise", cpu) == LossImpl.BLOCKWISE  # runs anywhere
    assert resolve_loss("auto", _fake_mesh("cuda")) == LossImpl.BLOCKWISE
    assert resolve_loss("chunked", _fake_mesh("tpu")) == LossImpl.CHUNKED
    # A CPU host planning for a TPU topology: libtpu's compile-only devices.
    tpu = make_mesh(4, 1, 1, devices=topo_lib.compile_devices(topo_lib.parse_topology("v5p-8")))
    assert resolve_loss("auto", tpu) == LossImpl.BLOCKWISE
    with pytest.raises(
        ValueError, match="loss_impl='fused': choose one of auto, chunked, blockwise"
    ):
        resolve_loss("fused", cpu)


@pytest.mark.skipif(not topo_lib.libtpu_available(), reason="libtpu not installed")
def test_unrolled_blocks_hold_one_block_of_logits_on_tpu():
    """The plan's cost compile unrolls the block loop; its blocks must still run one after
    another, or XLA:TPU keeps every block's float32 logits at once (the OneVision-0.5B cost
    compile asked for 19 GB). Compiled for a v5e chip: unrolled needs what the loop needs."""
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2",
                                        chip_config_name="default")  # fmt: skip
    on_chip = jax.sharding.SingleDeviceSharding(desc.devices[0])
    b, t, d, v, block = 2, 1024, 256, 8 * 4096, 4096  # eight blocks
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=on_chip) for shape, dtype in
            [((b, t, d), jnp.bfloat16), ((v, d), jnp.bfloat16), ((b, t), jnp.int32)]]  # fmt: skip

    def temp_bytes(unroll):
        def loss(hidden, weight, targets):
            return cross_entropy._blockwise(hidden, weight, targets, 0, block, unroll)[0].sum()

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    looped, unrolled = temp_bytes(False), temp_bytes(True)
    one_block = b * t * block * 4
    assert unrolled < looped + one_block, (unrolled, looped, one_block)
