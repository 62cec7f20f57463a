"""Fused attention kernels behind one signature, chosen by the devices a step runs on.

`attention_kernel(impl, mesh)` returns a `FusedAttention` (TPU: Pallas splash attention,
GPU: cuDNN flash attention through `jax.nn.dot_product_attention`) or None for the XLA path
of `nn/attention.py`, which stays the numerical reference. Every kernel takes the same
arguments: q float[B, T, N, H], k and v float[B, K, S, H] (the KV-cache layout), segment
ids int[B, T] (0 = padding; queries attend only to keys of their own non-zero segment),
`causal` and `sliding_window`. None of them materialises the [B, N, T, S] scores (cuDNN
takes packed segments as a [B, 1, T, S] mask, see `cudnn_attention`).

Axis legend as in `nn/attention.py`: B batch, T query length, S key/value length, N query
heads, K key/value heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import Mesh, PartitionSpec

from llava_jax.sharding import BATCH_AXES

HEAD_AXIS = "tensor"
_BLOCKS = (512, 256, 128)  # splash block sizes tried, largest first (MaxText's default: 512)


class AttentionImpl(enum.StrEnum):
    """The run setting `train.attention`."""

    AUTO = "auto"  # splash on TPU, cudnn on GPU, xla elsewhere
    XLA = "xla"  # nn/attention.py: scores in HBM (chunked for long sequences)
    SPLASH = "splash"  # jax.experimental.pallas.ops.tpu.splash_attention
    CUDNN = "cudnn"  # jax.nn.dot_product_attention(implementation="cudnn")


_BY_PLATFORM = {"tpu": AttentionImpl.SPLASH, "gpu": AttentionImpl.CUDNN}


def mesh_platform(mesh: Mesh) -> str:
    """The platform of the mesh's devices: "tpu" (compile-only ones too), "gpu" or "cpu"."""
    platform = mesh.devices.flat[0].platform.lower()
    return "gpu" if platform in ("cuda", "rocm") else platform


def resolve(impl: str | AttentionImpl, mesh: Mesh, dtype: str = "bfloat16") -> AttentionImpl:
    """The implementation `impl` means on `mesh`'s devices for compute `dtype`: `auto`
    follows the devices the step is compiled for, not `jax.default_backend()` (a CPU host
    planning for a TPU topology gets splash). cuDNN flash attention has no float32
    (jax's `cudnn/fused_attention_stablehlo.py` refuses it), so `auto` on a GPU takes the
    XLA path for a float32 model. An explicit kernel that cannot run is an error."""
    try:
        impl = AttentionImpl(impl)
    except ValueError:
        choices = ", ".join(i.value for i in AttentionImpl)
        raise ValueError(f"train.attention={impl!r}: choose one of {choices}") from None
    platform = mesh_platform(mesh)
    half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if impl == AttentionImpl.AUTO:
        impl = _BY_PLATFORM.get(platform, AttentionImpl.XLA)
        return AttentionImpl.XLA if impl == AttentionImpl.CUDNN and not half else impl
    if impl != AttentionImpl.XLA and _BY_PLATFORM.get(platform) != impl:
        raise ValueError(f"train.attention={impl.value!r} does not run on {platform} devices")
    if impl == AttentionImpl.CUDNN and not half:
        raise ValueError(f"train.attention='cudnn' needs bfloat16 or float16, not {dtype}")
    return impl


def attention_kernel(
    impl: str | AttentionImpl, mesh: Mesh, dtype: str = "bfloat16"
) -> FusedAttention | None:
    """The fused kernel `impl` resolves to on `mesh` for compute `dtype`, or None for the
    XLA path."""
    impl = resolve(impl, mesh, dtype)
    return None if impl == AttentionImpl.XLA else FusedAttention(impl, mesh)


@dataclasses.dataclass(frozen=True)
class FusedAttention:
    """One fused kernel on one mesh; hashable, so models hold it as a static field.

    Attributes:
      impl: SPLASH or CUDNN.
      mesh: the (data, fsdp, tensor) mesh; splash runs per shard (`shard_map`), rows on
        (data, fsdp) and heads on tensor.
      interpret: run splash in Pallas' interpreter (tests on CPU).
    """

    impl: AttentionImpl
    mesh: Mesh
    interpret: bool = False

    def __call__(
        self,
        q: jax.Array,
        k: jax.Array,
        v: jax.Array,
        segment_ids: jax.Array | None = None,
        *,
        causal: bool,
        sliding_window: int | None = None,
    ) -> jax.Array:
        """Softmax(q k^T / sqrt(H)) v over the keys the mask allows.

        Args:
          q: float[B, T, N, H].
          k, v: float[B, K, S, H] with S = T (self-attention).
          segment_ids: int[B, T]; None = one segment.
          causal: query t attends to keys s <= t only.
          sliding_window: and to keys s > t - sliding_window (Mistral).

        Returns:
          float[B, T, N, H] in q's dtype.
        """
        if k.shape[2] != q.shape[1]:
            raise ValueError(f"fused attention is self-attention: T={q.shape[1]}, S={k.shape[2]}")
        if self.impl == AttentionImpl.CUDNN:
            return cudnn_attention(q, k, v, segment_ids, causal, sliding_window)
        if segment_ids is None:
            segment_ids = jnp.ones(q.shape[:2], jnp.int32)
        return splash_attention(
            q, k, v, segment_ids, causal, sliding_window, self.mesh, self.interpret
        )


# -- GPU -----------------------------------------------------------------------------------


def cudnn_attention(
    q, k, v, segment_ids, causal: bool, sliding_window: int | None, implementation="cudnn"
):
    """`jax.nn.dot_product_attention` (cuDNN flash attention) with packed segments.

    jax 0.10's API has no segment ids, so packed rows and padding enter as a bool mask
    [B, 1, T, S], which jax's cuDNN wrapper turns into an additive bias of that shape
    (`combine_bias_and_mask`): one value per query-key pair, shared by the heads, not the
    [B, N, T, S] scores. `implementation="xla"` runs the same call on any backend (the
    CPU tests). Without segment ids (the vision tower) there is no mask at all."""
    mask = None
    if segment_ids is not None:
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        mask &= (segment_ids != 0)[:, None, None, :]
    window = None if sliding_window is None else (sliding_window - 1, 0)
    out = jax.nn.dot_product_attention(
        q,
        k.transpose(0, 2, 1, 3),  # BKSH -> BSKH, the API's layout
        v.transpose(0, 2, 1, 3),
        mask=mask,
        is_causal=causal,
        local_window_size=window,
        implementation=implementation,
    )
    return out.astype(q.dtype)


# -- TPU -----------------------------------------------------------------------------------


def _block(length: int) -> int:
    return next(b for b in _BLOCKS if length % b == 0)


def _splash_kernel(heads: int, length: int, causal: bool, window: int | None, interpret: bool):
    """A splash kernel for `heads` local query heads and sequences of `length` (a multiple
    of 128); its masks are static numpy (block-sparse: fully masked blocks are skipped).
    Built at every trace, not cached: it holds arrays, which must not outlive a trace."""
    shape = (length, length)
    if window is not None:
        # LocalMask's (left, right) sizes: key s is kept when t - left <= s <= t + right.
        one = splash.LocalMask(shape, (window - 1, 0 if causal else None), offset=0)
    elif causal:
        one = splash.CausalMask(shape)
    else:
        one = splash.FullMask(shape)
    b = _block(length)
    blocks = splash.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b,
        block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
        block_q_dq=b, block_kv_dq=b,
    )  # fmt: skip
    mask = splash.MultiHeadMask([one] * heads)
    return splash.make_splash_mha(
        mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def splash_attention(q, k, v, segment_ids, causal, sliding_window, mesh: Mesh, interpret=False):
    """Pallas splash attention per shard: rows split over (data, fsdp), query heads over
    `tensor`; key/value heads split the same way when `tensor` divides them, otherwise
    (fewer key/value heads than `tensor` shards) each shard takes the one it needs.

    Sequences are padded to a multiple of 128 with segment 0, which no real query attends
    to; the scale 1/sqrt(H) is applied to q (splash does not scale)."""
    b, t, n, h = q.shape
    num_kv = k.shape[1]
    shards = mesh.shape[HEAD_AXIS]
    if n % shards or (num_kv % shards and shards % num_kv):
        raise ValueError(
            f"splash attention: {n} query and {num_kv} key/value heads do not split over "
            f"mesh.tensor={shards}; choose a tensor size that divides them, or "
            "--config.train.attention=xla"
        )
    split_kv = num_kv % shards == 0
    pad = -t % 128
    q = (q * h**-0.5).astype(q.dtype).transpose(0, 2, 1, 3)  # BNTH
    pad4 = [(0, 0), (0, 0), (0, pad), (0, 0)]
    q, k, v = (jnp.pad(x, pad4) for x in (q, k, v))
    segment_ids = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, pad)])
    kernel = _splash_kernel(n // shards, t + pad, causal, sliding_window, interpret)

    def local(q, k, v, segments):  # per shard: [b, n/shards, T, H], ...
        if not split_kv:  # every query head of this shard reads the same key/value head
            per_kv = shards // num_kv
            i = jax.lax.axis_index(HEAD_AXIS) // per_kv
            k, v = (jax.lax.dynamic_slice_in_dim(x, i, 1, axis=1) for x in (k, v))
        one = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s))  # noqa: E731
        return jax.vmap(one)(q, k, v, segments)

    heads = PartitionSpec(BATCH_AXES, HEAD_AXIS)
    kv = heads if split_kv else PartitionSpec(BATCH_AXES)
    # The scope names the static mask in the compiled program's op names, so that
    # `splash_kernel_flops` can count the blocks the kernel computes.
    with jax.named_scope(f"{_SCOPE}{_mask_name(causal, sliding_window)}"):
        out = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(heads, kv, kv, PartitionSpec(BATCH_AXES)),
            out_specs=heads,
            check_vma=False,  # the Pallas call has no replication rule
        )(q, k, v, segment_ids)
    return out[:, :, :t].transpose(0, 2, 1, 3)


_SCOPE = "splash_mask_"


def _mask_name(causal: bool, window: int | None) -> str:
    return ("causal" if causal else "full") + ("" if window is None else f"_window{window}")


def computed_blocks(name: str, length: int, block_q: int, block_kv: int) -> int:
    """Blocks [block_q, block_kv] of a length x length mask that splash computes: those with
    at least one query-key pair the static mask `name` allows (the others it skips)."""
    q0 = np.arange(0, length, block_q)[:, None]  # first query of each block row
    k0 = np.arange(0, length, block_kv)[None, :]
    q1, k1 = q0 + block_q - 1, k0 + block_kv - 1
    keep = np.ones((q0.size, k0.size), bool)
    if name.startswith("causal"):
        keep &= k0 <= q1  # some key at or before some query
    window = re.search(r"_window(\d+)$", name)
    if window:
        keep &= q0 - k1 < int(window[1])  # some pair closer than the window
        if not name.startswith("causal"):
            keep &= k0 - q1 < int(window[1])
    return int(keep.sum())


def splash_kernel_flops(hlo_text: str) -> float:
    """FLOPs of the splash kernels in a compiled TPU program, which XLA counts as zero.

    Splash's `pallas_call`s carry no cost estimate, so `cost_analysis()` sees each as an
    opaque custom call. Counted here for each call from its q and k shapes (its operand
    layout), its block sizes (its kernel metadata) and its static mask (the scope
    `splash_attention` names it in): per head and computed block [bq, bkv], forward
    4 * bq * bkv * H (q k^T, p v), dq 6 (q k^T again, dO v^T, dS k), dkv 8 (q k^T, p^T dO,
    dO v^T, dS^T q). The blocks a causal or windowed mask leaves empty are skipped by the
    kernel and not counted; a call outside `splash_attention` is counted dense."""
    total = 0.0
    per_kind = {"fwd": 4, "dq": 6, "dkv": 8}
    calls = list(_SPLASH_CALL.finditer(hlo_text))
    for i, call in enumerate(calls):
        end = calls[i + 1].start() if i + 1 < len(calls) else len(hlo_text)
        kind, operands = call.group(1), call.group(2)
        text = hlo_text[call.start() : end]  # this call's instruction and what follows
        q, k = (tuple(map(int, s.split(","))) for s in _FLOAT_SHAPE.findall(operands)[:2])
        *heads, length, head_dim = q
        pairs = length * k[-2]
        scope = re.search(rf"[/(]{_SCOPE}(\w+?)[/)]", text)  # in a jvp(...) or not
        suffix = {"fwd": "", "dq": "_dq", "dkv": "_dkv"}[kind]
        blocks = [re.search(rf'\\"block_{axis}{suffix}\\": (\d+)', text) for axis in "q kv".split()]
        if scope and all(blocks) and length == k[-2]:
            bq, bkv = (int(b[1]) for b in blocks)
            pairs = computed_blocks(scope[1], length, bq, bkv) * bq * bkv
        total += per_kind[kind] * math.prod(heads) * head_dim * pairs
    return total


# `%splash_mha_fwd... = (...) custom-call(...), custom_call_target="tpu_custom_call",
# operand_layout_constraints={s8[..]{..}, .., bf16[q]{..}, bf16[k]{..}, ..}`: the block
# masks (int) come first, then q and k (float[b, heads, T or S, H] under our vmap).
_SPLASH_CALL = re.compile(
    r"%splash_mha_(fwd|dq|dkv)\S* = .*?custom_call_target=\"tpu_custom_call\", "
    r"operand_layout_constraints=\{(.*?)\}, \w+="
)
_FLOAT_SHAPE = re.compile(r"(?:bf16|f16|f32)\[([\d,]+)\]")
