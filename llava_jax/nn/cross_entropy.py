"""The vocabulary projection and cross-entropy, `train.loss_impl` positions or vocabulary
blocks at a time, so the float32 logits [B, T, V] never exist whole.

Two implementations of the same numbers (CE = logsumexp(logits) - logits[target], and the
argmax for the accuracy metric):

- `chunked`: `train.loss_chunk` positions of every row at a time (`nn/chunks.over_positions`),
  each chunk's [B, chunk, V] logits through `optax`, rematerialised in the backward pass.
- `blockwise`: every position at once, `VOCAB_BLOCK` vocabulary entries at a time
  (`blockwise_cross_entropy`): an online logsumexp over the blocks forward, a custom VJP that
  recomputes each [B, T, block] logits block backward and writes its gradient in the compute
  dtype straight into the two matmuls (the gradient of the logits never exists in float32).

Axis legend: B batch, T positions, D model width, V vocabulary.
"""

from __future__ import annotations

import enum
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llava_jax.nn.attention_kernels import mesh_platform

VOCAB_BLOCK = 8192  # vocabulary entries per block: [B, T, 8192] float32 = 256 MB per row at 8K


class LossImpl(enum.StrEnum):
    """The run setting `train.loss_impl`."""

    AUTO = "auto"  # blockwise on TPU and GPU, chunked elsewhere
    CHUNKED = "chunked"  # `train.loss_chunk` positions at a time, optax's CE
    BLOCKWISE = "blockwise"  # VOCAB_BLOCK vocabulary entries at a time, custom VJP


def resolve_loss(impl: str | LossImpl, mesh: Mesh) -> LossImpl:
    """The implementation `impl` means on `mesh`'s devices: `auto` follows the devices the
    step is compiled for (as `attention_kernels.resolve`), so CPU runs keep today's numbers
    bit for bit and a CPU host planning for a TPU topology gets what the TPU VM will."""
    try:
        impl = LossImpl(impl)
    except ValueError:
        choices = ", ".join(i.value for i in LossImpl)
        raise ValueError(f"train.loss_impl={impl!r}: choose one of {choices}") from None
    if impl == LossImpl.AUTO:
        return LossImpl.BLOCKWISE if mesh_platform(mesh) in ("tpu", "gpu") else LossImpl.CHUNKED
    return impl


def _vocab_slice(weight: jax.Array, vocab_axis: int, start, size: int) -> jax.Array:
    """Vocabulary entries [start, start + size) of the weight, in its own layout."""
    return jax.lax.dynamic_slice_in_dim(weight, start, size, axis=vocab_axis)


def _w(vocab_axis: int) -> str:
    """The weight's einsum subscripts: "VD" (the tied table) or "DV" (lm_head); written per
    layout rather than transposed, which XLA's CPU dot cannot take in bfloat16 -> float32."""
    return "VD" if vocab_axis == 0 else "DV"


def _over_blocks(fn, init, num_blocks: int, unroll: bool, operands: tuple):
    """`carry = fn(carry, j, operands)` for j < num_blocks, returning (carry, stacked per-block
    outputs): a `scan`, or straight-line code when `unroll` (XLA's cost analysis counts a loop
    body once; see `chunks.map_chunks`). Unrolled, each block reads `operands` through an
    optimization barrier with the previous block's carry, so the blocks run one after another
    as in the loop: otherwise nothing orders them, and XLA keeps every block's float32 logits
    alive at once (the plan's cost compile of OneVision-0.5B asked for 19 GB)."""
    if not unroll:
        return jax.lax.scan(lambda c, j: fn(c, j, operands), init, jnp.arange(num_blocks))
    carry, outs = init, []
    for j in range(num_blocks):
        carry, out = fn(carry, j, operands)
        outs.append(out)
        carry, operands = jax.lax.optimization_barrier((carry, operands))
    return carry, (None if outs[0] is None else jnp.stack(outs))


def _logits_block(hidden, weight, vocab_axis, j, block, vocab):
    """float32[B, T, block] logits of vocabulary block j; entries past V are -inf."""
    w = _vocab_slice(weight, vocab_axis, j * block, block)
    spec = f"BTD,{_w(vocab_axis)}->BTV"
    logits = jnp.einsum(spec, hidden, w, preferred_element_type=jnp.float32)
    ids = j * block + jnp.arange(block)
    return jnp.where(ids < vocab, logits, -jnp.inf), ids


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _blockwise(hidden, weight, targets, vocab_axis, block, unroll):
    return _blockwise_fwd(hidden, weight, targets, vocab_axis, block, unroll)[0]


def _blockwise_fwd(hidden, weight, targets, vocab_axis, block, unroll):
    vocab = weight.shape[vocab_axis]
    padded = _pad_vocab(weight, vocab_axis, block)
    num_blocks = padded.shape[vocab_axis] // block
    shape = targets.shape

    def body(carry, j, operands):
        m, s, target_logit, best = carry
        logits, ids = _logits_block(*operands, vocab_axis, j, block, vocab)
        block_max = jnp.max(logits, axis=-1)
        new_m = jnp.maximum(m, block_max)
        s = s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(logits - new_m[..., None]), axis=-1)
        target_logit += jnp.sum(jnp.where(ids == targets[..., None], logits, 0.0), axis=-1)
        # The first maximum wins, as jnp.argmax over the whole vocabulary.
        best = jnp.where(block_max > m, j * block + jnp.argmax(logits, axis=-1), best)
        return (new_m, s, target_logit, best), None

    init = (
        jnp.full(shape, -jnp.inf, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros(shape, jnp.int32),
    )
    (m, s, target_logit, best), _ = _over_blocks(body, init, num_blocks, unroll, (hidden, padded))
    lse = m + jnp.log(s)
    return (lse - target_logit, best == targets), (hidden, weight, targets, lse)


def _blockwise_bwd(vocab_axis, block, unroll, residuals, cotangents):
    hidden, weight, targets, lse = residuals
    g = cotangents[0]  # float32[B, T]; the bool `correct` has no cotangent
    vocab = weight.shape[vocab_axis]
    padded = _pad_vocab(weight, vocab_axis, block)
    num_blocks = padded.shape[vocab_axis] // block

    def body(d_hidden, j, operands):
        hidden, padded = operands
        logits, ids = _logits_block(hidden, padded, vocab_axis, j, block, vocab)
        # d CE / d logits = softmax - onehot(target), scaled by the incoming cotangent.
        d_logits = jnp.exp(logits - lse[..., None]) - (ids == targets[..., None])
        d_logits = (d_logits * g[..., None]).astype(hidden.dtype)
        w = _vocab_slice(padded, vocab_axis, j * block, block)
        w_spec, f32 = _w(vocab_axis), jnp.float32
        d_hidden += jnp.einsum(f"BTV,{w_spec}->BTD", d_logits, w, preferred_element_type=f32)
        d_w = jnp.einsum(f"BTD,BTV->{w_spec}", hidden, d_logits, preferred_element_type=f32)
        return d_hidden, d_w.astype(weight.dtype)

    d_hidden, d_blocks = _over_blocks(
        body, jnp.zeros(hidden.shape, jnp.float32), num_blocks, unroll, (hidden, padded)
    )
    # [n, D, block] -> [D, n * block] (or [n, block, D] -> [n * block, D]), padding dropped.
    if vocab_axis == 1:
        d_blocks = jnp.moveaxis(d_blocks, 0, 1)
    d_weight = d_blocks.reshape(padded.shape)
    d_weight = jax.lax.slice_in_dim(d_weight, 0, vocab, axis=vocab_axis)
    return d_hidden.astype(hidden.dtype), d_weight, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _pad_vocab(weight, vocab_axis, block):
    pad = -weight.shape[vocab_axis] % block
    if not pad:
        return weight
    widths = [(0, 0), (0, 0)]
    widths[vocab_axis] = (0, pad)
    return jnp.pad(weight, widths)


def blockwise_cross_entropy(
    hidden: jax.Array,
    weight: jax.Array,
    targets: jax.Array,
    *,
    vocab_axis: int = 1,
    block: int | None = None,
    unroll: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(CE float32[B, T], correct bool[B, T]) of the logits `hidden @ weight`, built
    `block` vocabulary entries at a time, forward and backward.

    Args:
      hidden: float[B, T, D], the final norm's output in the compute dtype.
      weight: the vocabulary projection in the compute dtype: float[D, V] (`lm_head`,
        `vocab_axis=1`) or float[V, D] (the tied embedding table, `vocab_axis=0`).
      targets: int32[B, T]; a target outside [0, V) (a masked position) gets CE =
        logsumexp and must be masked by the caller, as with optax.
      block: vocabulary entries per block, default VOCAB_BLOCK (V is padded to a multiple
        with -inf logits).
      unroll: straight-line code instead of a `scan` over the blocks (for cost analysis).

    The logits are accumulated in float32 (as `LanguageModel.logits`); the logits'
    gradient is rounded to the compute dtype before its two matmuls, which is what the MXU
    reads anyway at default precision (float32 models keep float32 throughout).
    """
    block = min(block or VOCAB_BLOCK, weight.shape[vocab_axis])
    return _blockwise(hidden, weight, targets.astype(jnp.int32), vocab_axis, block, unroll)
