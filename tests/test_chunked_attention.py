"""Chunked causal attention (long training sequences) against the full-mask attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_helpers import TINY

from llava_jax.models.llava import LlavaModel
from llava_jax.nn.attention import (
    ChunkedCausalMask,
    causal_mask,
    chunked_causal_attention,
    dot_product_attention,
)


def _inputs(b=2, t=21, n=4, kv=2, h=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k = jax.random.normal(keys[1], (b, kv, t, h))
    v = jax.random.normal(keys[2], (b, kv, t, h))
    steps = jnp.broadcast_to(jnp.arange(t), (b, t))
    # Row 0: two packed samples and padding; row 1: one sample.
    seg = jnp.array([[1] * 9 + [2] * 8 + [0] * (t - 17), [1] * t])
    return q, k, v, steps, seg


@pytest.mark.parametrize("chunk, unroll", [(4, False), (7, False), (21, False), (7, True)])
@pytest.mark.parametrize("window", [None, 5])
def test_chunked_equals_full_attention_and_its_gradient(chunk, unroll, window):
    q, k, v, steps, seg = _inputs()
    full_mask = causal_mask(steps, steps, seg, seg, window)
    chunked = ChunkedCausalMask(steps, seg, window, chunk, unroll=unroll)

    def full(q, k, v):
        return dot_product_attention(q, k, v, full_mask)

    def part(q, k, v):
        return chunked_causal_attention(q, k, v, chunked)

    np.testing.assert_allclose(part(q, k, v), full(q, k, v), atol=1e-5)
    weights = jax.random.normal(jax.random.key(1), q.shape)
    g_full = jax.grad(lambda *a: jnp.sum(full(*a) * weights), argnums=(0, 1, 2))(q, k, v)
    g_part = jax.grad(lambda *a: jnp.sum(part(*a) * weights), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", g_part, g_full, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"d/d{name}")


@pytest.mark.parametrize("scan_layers", [True, False])
def test_language_model_chunks_long_training_sequences_only(scan_layers):
    tiny_cfg = TINY.with_run(scan_layers=scan_layers)
    model = LlavaModel(tiny_cfg.with_run(attention_chunk=0), rngs=nnx.Rngs(0))
    chunked = LlavaModel(tiny_cfg.with_run(attention_chunk=8), rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(2), (2, 30), 0, 100)
    seg = jnp.array([[1] * 12 + [2] * 14 + [0] * 4, [1] * 30])
    pos = jnp.concatenate([jnp.arange(12), jnp.arange(14), jnp.zeros(4, int)])
    pos = jnp.stack([pos, jnp.arange(30)])
    want = model(ids, positions=pos, segment_ids=seg).logits
    got = chunked(ids, positions=pos, segment_ids=seg).logits
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-4)


def test_unrolled_chunks_are_straight_line_code():
    """Unrolled (layers unrolled, as `llava-jax plan` compiles for its cost estimate), the
    chunks leave no loop for XLA's cost analysis to count once."""
    q, k, v, steps, seg = _inputs(t=28)
    for unroll, loops in ((False, True), (True, False)):
        mask = ChunkedCausalMask(steps, seg, None, 7, unroll=unroll)
        hlo = jax.jit(chunked_causal_attention).lower(q, k, v, mask).as_text()
        assert ("while" in hlo) == loops, unroll


def test_bfloat16_attention_rounds_as_transformers_eager():
    """bf16 inputs: the scores come out of the matmul in bf16 (as torch's bf16 matmul), the
    softmax runs in float32, the probabilities go back to bf16: the result equals that recipe
    written out, and neither matmul produces float32."""
    q, k, v, steps, seg = _inputs()
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    mask = causal_mask(steps, steps, seg, seg)
    out = dot_product_attention(q, k, v, mask)
    # The reference, heads expanded: scores [B, N, T, S].
    kk, vv = (jnp.repeat(x, 2, axis=1) for x in (k, v))
    scores = jnp.einsum("BTNH,BNSH->BNTS", q, kk) * jnp.bfloat16(8**-0.5)
    scores = jnp.where(mask[:, None], scores, -1e30)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(jnp.bfloat16)
    want = jnp.einsum("BNTS,BNSH->BTNH", probs, vv)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(out), np.float32(want), atol=1e-2, rtol=1e-2)
    jaxpr = jax.make_jaxpr(dot_product_attention)(q, k, v, mask)
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert [e.outvars[0].aval.dtype for e in dots] == [jnp.bfloat16, jnp.bfloat16]
