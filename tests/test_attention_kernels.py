"""The fused attention kernels against the XLA reference (`nn/attention.py`), and which one
a run gets.

Splash runs in Pallas' interpreter on the CPU (`interpret=True`, the kernel's own code, its
block masks and its backward pass), inside the same `shard_map` as on a TPU mesh. cuDNN
cannot run here; its call runs with `implementation="xla"`, the same API and arguments.
Padding queries (segment 0) are compared nowhere: no loss reads them (see `FusedCausalMask`).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llava_jax.nn.attention import causal_mask, dot_product_attention
from llava_jax.nn.attention_kernels import (
    AttentionImpl,
    FusedAttention,
    attention_kernel,
    computed_blocks,
    cudnn_attention,
    resolve,
    splash_kernel_flops,
)
from llava_jax.planning import topology as topo_lib
from llava_jax.sharding import make_mesh

# Two packed samples and right padding in row 0, one sample filling row 1.
SEGMENTS = np.array([[1] * 9 + [2] * 8 + [0] * 3, [1] * 20])


def _inputs(b, t, n, k, h, dtype, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, t, n, h)), dtype)
    kv = [jnp.asarray(r.normal(size=(b, k, t, h)), dtype) for _ in range(2)]
    return q, *kv


def _reference(segments, causal, window):
    """The XLA path's attention for these masks: `causal_mask` or no mask."""
    if not causal:
        return lambda q, k, v: dot_product_attention(q, k, v, None)
    steps = jnp.broadcast_to(jnp.arange(segments.shape[1]), segments.shape)
    mask = causal_mask(steps, steps, segments, segments, window)
    return lambda q, k, v: dot_product_attention(q, k, v, mask)


def _values_and_grads(fn, q, k, v, real):
    """fn's output and the gradients of a loss over the real (non-padding) queries."""

    def loss(q, k, v):
        out = fn(q, k, v).astype(jnp.float32)
        return jnp.sum(jnp.where(real, out, 0.0) * jnp.cos(out))

    out = fn(q, k, v)
    return jnp.where(real, out, 0), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_close(got, want, tol, what):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        err = np.max(np.abs(a - b))
        assert err <= tol, f"{what}: {name} differs by {err:.3g} (> {tol})"


CASES = {
    # name: (mesh data, fsdp, tensor), (B, T, N, K, H), dtype, causal, window, tolerance
    "causal, packed, padding, GQA over tensor=2": ((2, 1, 2), (2, 20, 4, 2, 16), "float32",
                                                   True, None, 2e-5),
    "sliding window, 1 kv head for 2 tensor shards": ((1, 1, 2), (2, 20, 2, 1, 16), "float32",
                                                      True, 5, 2e-5),
    # bfloat16: both round q k^T and p to 8 bits of mantissa, at different points.
    "bfloat16": ((2, 1, 1), (2, 20, 4, 2, 16), "bfloat16", True, None, 0.1),
    # The vision tower: no mask, 20 tokens padded to 128 inside the kernel.
    "vision: full attention": ((1, 2, 2), (2, 20, 2, 2, 16), "float32", False, None, 2e-5),
}  # fmt: skip


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if i == 0 else pytest.mark.slow) for i, n in enumerate(CASES)]
)
def test_splash_equals_xla(name):
    (data, fsdp, tensor), shape, dtype, causal, window, tol = CASES[name]
    mesh = make_mesh(data, fsdp, tensor, devices=jax.devices()[: data * fsdp * tensor])
    q, k, v = _inputs(*shape, jnp.dtype(dtype))
    segments = jnp.asarray(SEGMENTS if causal else np.ones_like(SEGMENTS))
    real = (segments != 0)[:, :, None, None]
    splash = FusedAttention(AttentionImpl.SPLASH, mesh, interpret=True)
    kernel = lambda q, k, v: splash(  # noqa: E731
        q, k, v, segments if causal else None, causal=causal, sliding_window=window
    )
    got = _values_and_grads(kernel, q, k, v, real)
    want = _values_and_grads(_reference(segments, causal, window), q, k, v, real)
    out, grads = got
    _assert_close((out, *grads), (want[0], *want[1]), tol, name)


@pytest.mark.parametrize("window", [None, 5])
def test_cudnn_call_equals_xla(window):
    """The GPU kernel's arguments (segment mask, causal flag, window) mean the same masks."""
    q, k, v = _inputs(2, 20, 4, 2, 16, jnp.float32)
    segments = jnp.asarray(SEGMENTS)
    real = (segments != 0)[:, :, None, None]
    call = lambda q, k, v: cudnn_attention(q, k, v, segments, True, window, "xla")  # noqa: E731
    out, grads = _values_and_grads(call, q, k, v, real)
    want_out, want_grads = _values_and_grads(_reference(segments, True, window), q, k, v, real)
    _assert_close((out, *grads), (want_out, *want_grads), 2e-5, f"window {window}")


def _fake_mesh(platform):
    return types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=platform)]))


def test_auto_follows_the_devices_the_step_is_compiled_for():
    cpu = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    assert attention_kernel("auto", cpu) is None  # the XLA path
    assert resolve("auto", _fake_mesh("cuda")) == AttentionImpl.CUDNN
    assert resolve("auto", _fake_mesh("cuda"), "float32") == AttentionImpl.XLA  # no f32 cuDNN
    with pytest.raises(ValueError, match="'cudnn' needs bfloat16 or float16, not float32"):
        resolve("cudnn", _fake_mesh("cuda"), "float32")
    assert resolve("auto", _fake_mesh("tpu")) == AttentionImpl.SPLASH
    assert resolve("xla", _fake_mesh("tpu")) == AttentionImpl.XLA
    # A CPU host planning for a TPU topology: libtpu's compile-only devices.
    tpu = make_mesh(4, 1, 1, devices=topo_lib.compile_devices(topo_lib.parse_topology("v5p-8")))
    assert attention_kernel("auto", tpu) == FusedAttention(AttentionImpl.SPLASH, tpu)
    with pytest.raises(ValueError, match="'splash' does not run on cpu devices"):
        resolve("splash", cpu)
    with pytest.raises(ValueError, match="choose one of auto, xla, splash, cudnn"):
        resolve("flash", cpu)


def test_splash_compiles_for_tpu_and_its_flops_are_counted():
    """Forward and backward of splash, compiled for a v5p-8 mesh (data 1, fsdp 2, tensor 2):
    three kernel calls per chip, counted by hand: forward 4, dq 6, dkv 8 x b n H x the
    query-key pairs of the blocks computed (causal, 1024 tokens in 512-blocks: 3 of 4)."""
    devices = topo_lib.compile_devices(topo_lib.parse_topology("v5p-8"))
    mesh = make_mesh(1, 2, 2, devices=devices)
    b, t, n, k, h = 4, 1024, 8, 2, 128
    kernel = FusedAttention(AttentionImpl.SPLASH, mesh)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

    def loss(q, k_, v):
        segments = jnp.ones((b, t), jnp.int32)
        return jnp.sum(kernel(q, k_, v, segments, causal=True).astype(jnp.float32))

    args = [
        jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding)
        for s in ((b, t, n, h), (b, k, t, h), (b, k, t, h))
    ]
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    text = compiled.as_text()
    for name in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
        assert name in text and 'custom_call_target="tpu_custom_call"' in text
    per_chip = (b // 2) * (n // 2) * h * 3 * 512 * 512  # rows over fsdp, heads over tensor
    assert splash_kernel_flops(text) == (4 + 6 + 8) * per_chip
    assert "splash_mask_causal" in text  # the scope the count reads the mask from
    assert splash_kernel_flops(text.replace("splash_mha", "other")) == 0  # no kernel, no FLOPs
    # What XLA counts by itself: almost nothing (the kernels are opaque custom calls).
    assert compiled.cost_analysis()["flops"] < 0.01 * splash_kernel_flops(text)


@pytest.mark.slow
def test_model_with_splash_equals_the_xla_path():
    """The whole tiny LLaVA (scanned layers) with the kernel in the vision tower and the
    decoder: same features and hidden states; a prefill into an empty cache writes the same
    keys and values."""
    from flax import nnx
    from train_helpers import TINY

    from llava_jax.models.llava import LlavaModel
    from llava_jax.models.llm import KVCache

    model = LlavaModel(TINY, rngs=nnx.Rngs(0))
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    splash = FusedAttention(AttentionImpl.SPLASH, mesh, interpret=True)
    pixels = jax.random.normal(jax.random.key(1), (2, 1, 28, 28, 3))
    want_views, _ = model.encode_views(pixels)
    got_views, _ = model.encode_views(pixels, splash)
    np.testing.assert_allclose(got_views, want_views, atol=2e-5, err_msg="vision tower")

    ids = jax.random.randint(jax.random.key(2), SEGMENTS.shape, 0, 64)
    segments = jnp.asarray(SEGMENTS)
    real = (segments != 0)[..., None]
    want = model.hidden_states(ids, segment_ids=segments).hidden
    got = model.hidden_states(ids, segment_ids=segments, attention=splash).hidden
    np.testing.assert_allclose(jnp.where(real, got, 0), jnp.where(real, want, 0), atol=2e-5)

    cache = KVCache.init(TINY.text, 2, 24, jnp.float32)
    want_cache = model.hidden_states(ids, segment_ids=segments, cache=cache).cache
    got_cache = model.hidden_states(ids, segment_ids=segments, cache=cache, attention=splash).cache
    written = real[None, :, None]  # [1, B, 1, T, 1] against [L, B, K, S, H]
    for name in ("k", "v"):
        a, b = getattr(got_cache, name)[:, :, :, :20], getattr(want_cache, name)[:, :, :, :20]
        np.testing.assert_allclose(a * written, b * written, atol=2e-5, err_msg=f"cache {name}")


def test_splash_refuses_heads_that_do_not_split_over_tensor():
    """Qwen2-0.5B's 14 query heads over tensor=4: an error that names the fix."""
    mesh = make_mesh(1, 1, 4, devices=jax.devices()[:4])
    q, k, v = _inputs(1, 16, 14, 2, 8, jnp.float32)
    splash = FusedAttention(AttentionImpl.SPLASH, mesh, interpret=True)
    with pytest.raises(ValueError, match="14 query and 2 key/value heads do not split over "
                       "mesh.tensor=4; .* or --config.train.attention=xla"):  # fmt: skip
        splash(q, k, v, causal=True)


@pytest.mark.parametrize(
    "name, want",
    [
        ("full", 16),
        ("causal", 10),  # the lower triangle of 4 x 4 blocks
        ("causal_window1", 4),  # the diagonal only
        ("causal_window128", 7),  # and the block before: query 128 sees key 127
        ("causal_window130", 9),  # and two before: query 256 sees key 127
    ],
)
def test_computed_blocks_are_those_the_mask_touches(name, want):
    """512 tokens in blocks of 128: the blocks holding at least one allowed pair."""
    assert computed_blocks(name, 512, 128, 128) == want


def test_cudnn_call_without_segments_is_full_attention():
    """The vision tower's call: no segment ids, no mask, every key attended."""
    q, k, v = _inputs(2, 20, 4, 4, 16, jnp.float32)
    got = cudnn_attention(q, k, v, None, False, None, "xla")
    np.testing.assert_allclose(got, dot_product_attention(q, k, v, None), atol=2e-6)
