"""LoRA and QLoRA adapters on a LlavaModel, computed by qwix.

qwix (Google's JAX quantization library) intercepts the `dot_general` of every matched
linear layer and adds `(x @ A) @ B * alpha / rank`, dequantizing a QLoRA base weight on the
fly. Its NNX entry point creates the adapters by running the model once and setting
attributes on the live layer modules; our decoder layers are stored stacked and sliced per
layer inside `run_stacked`, so attributes set during that run would land on temporary
modules and be lost. We therefore create the adapters (and quantize the base kernels)
ourselves, stacked like their kernels ([L, in, r] and [L, r, out]), and hand qwix a model
whose adapters already exist (`skip_nnx_init=True`); qwix finds them by name
(`kernel_lora_a`, `kernel_lora_b`) on each sliced layer.

Which layers: regexes over parameter paths, every linear kernel of the LLM's layers by
default (the reference's `find_all_linear_names` takes every `Linear` outside the vision
tower and the projector, and drops `lm_head`; haotian-liu/LLaVA, llava/train/train.py).
A: He-uniform over the input width, B: zeros, so a fresh adapter leaves the model unchanged
(qwix's and peft's defaults).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from qwix._src.core import qarray  # HowToQuantize / quantize: not re-exported by qwix
from qwix._src.providers.ptq import WithAux

from llava_jax.param_paths import flat_to_nested, nested_to_flat

# Every linear layer of the decoder: q/k/v/o and gate/up/down.
LLM_LINEARS = (r"language_model/layers/(self_attn|mlp)/\w+_proj/kernel",)
QUANT_TYPES = ("int8", "int4", "nf4")
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")
# 4-bit types get one scale per block of this many input rows (QLoRA: 64, Dettmers et al.
# 2023), or one per column when the input width does not divide by it.
QUANT_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What `train.lora` asks for.

    Attributes:
      rank: r, the adapters' inner width.
      alpha: the update is scaled by alpha / rank.
      modules: regexes; a linear kernel whose path one of them matches in full gets an
        adapter.
      quantize: "" (LoRA) or the storage type of the frozen base kernels (QLoRA).
      dropout: the rate of dropout on the adapters' input, in training only (peft's
        `lora_dropout`: the base layer sees the whole input).
    """

    rank: int
    alpha: float
    modules: tuple[str, ...] = LLM_LINEARS
    quantize: str = ""
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def spec_from_config(config) -> LoraSpec | None:
    """The LoraSpec of `config.train.lora`, or None when `rank` is 0.

    Raises:
      ValueError: a bad field, named.
    """
    c = config.train.lora
    if int(c.rank) == 0:
        if c.quantize:
            raise ValueError(f"train.lora.quantize={c.quantize!r} needs train.lora.rank > 0")
        return None
    if int(c.rank) < 0:
        raise ValueError(f"train.lora.rank must be >= 0, got {c.rank}")
    if not 0.0 <= float(c.dropout) < 1.0:
        raise ValueError(f"train.lora.dropout must be in [0, 1), got {c.dropout}")
    if c.quantize not in ("", *QUANT_TYPES):
        raise ValueError(
            f"train.lora.quantize must be '' or one of {QUANT_TYPES}, got {c.quantize!r}"
        )
    if not c.modules:
        raise ValueError("train.lora.modules is empty: name the linear layers to adapt")
    for pattern in c.modules:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"train.lora.modules: bad pattern {pattern!r}: {e}") from None
    return LoraSpec(
        int(c.rank), float(c.alpha), tuple(c.modules), str(c.quantize), float(c.dropout)
    )


def is_adapter(path: str) -> bool:
    return path.endswith(ADAPTER_SUFFIXES)


def target_layers(model: nnx.Module, spec: LoraSpec) -> dict[str, nnx.Linear]:
    """{"a/b/q_proj": layer} of the linear layers whose kernel path `spec.modules` matches.

    Raises:
      ValueError: a pattern that matches no kernel, or matches something that is not the
        kernel of a linear layer.
    """
    kernels = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    layers = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model)}
    found = {}
    for pattern in spec.modules:
        hits = [k for k in kernels if re.fullmatch(pattern, k)]
        if not hits:
            raise ValueError(f"train.lora.modules: {pattern!r} matches no parameter")
        for path in hits:
            owner = layers.get(path.rpartition("/")[0])
            if not path.endswith("/kernel") or not isinstance(owner, nnx.Linear):
                raise ValueError(
                    f"train.lora.modules: {pattern!r} matches {path}, which is not the kernel "
                    "of a linear layer"
                )
            found[path.rpartition("/")[0]] = owner
    return found


def _how(spec: LoraSpec, kernel_shape: tuple[int, ...]) -> qarray.HowToQuantize:
    """Per output column scales (the kernel is [L, in, out]); 4-bit types also per block of
    QUANT_BLOCK input rows."""
    tiled = {}
    if spec.quantize != "int8" and kernel_shape[1] % QUANT_BLOCK == 0:
        tiled = {1: QUANT_BLOCK}
    return qarray.HowToQuantize(qtype=spec.quantize, channelwise_axes=(0, 2), tiled_axes=tiled)


def _rank_axis(other: str | None) -> str | None:
    """The rank axis's logical name: FSDP-sharded (`lora_rank`, sharding.py) unless the
    adapter's other axis is `embed`, which FSDP already shards (B of q/k/v/gate/up and A of
    down have no `embed` axis and would otherwise sit whole on every chip)."""
    return None if other == "embed" else "lora_rank"


def add_adapters(model: nnx.Module, spec: LoraSpec, key: jax.Array) -> nnx.Module:
    """Adds `kernel_lora_a` / `kernel_lora_b` to every target layer, in place, and with
    `spec.quantize` replaces its kernel by the quantized one. Returns the model.

    A is sharded on the kernel's input axis, B on its output axis, as qwix does.
    """
    for i, (_, layer) in enumerate(sorted(target_layers(model, spec).items())):
        kernel = layer.kernel
        names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
        layers, d_in, d_out = kernel.shape
        init_a = jax.nn.initializers.he_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
        a = init_a(jax.random.fold_in(key, i), (layers, d_in, spec.rank), kernel.dtype)
        layer.kernel_lora_a = nnx.LoRAParam(
            a, out_sharding=(names[0], names[1], _rank_axis(names[1])), eager_sharding=False
        )
        b = jnp.zeros((layers, spec.rank, d_out), kernel.dtype)
        layer.kernel_lora_b = nnx.LoRAParam(
            b, out_sharding=(names[0], _rank_axis(names[2]), names[2]), eager_sharding=False
        )
        if spec.quantize:
            how = _how(spec, kernel.shape)
            q = qarray.quantize(kernel[...], how)
            layer.kernel = WithAux(
                dataclasses.replace(
                    q,
                    qvalue=nnx.Param(q.qvalue, out_sharding=names, eager_sharding=False),
                    scale=nnx.Param(q.scale, out_sharding=names, eager_sharding=False),
                ),
                how,
            )
    return model


def adapted_layers(model: nnx.Module) -> dict[str, nnx.Linear]:
    """{"a/b/q_proj": layer} of the layers that carry adapters."""
    return {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model)
            if hasattr(m, "kernel_lora_a")}  # fmt: skip


class _LoraProvider(qwix.LoraProvider):
    """qwix's LoRA, with an adapted layer's output in the dtype its base product has.

    qwix adds the adapters' delta, computed with the adapters as stored (float32 master
    weights), to the base product in the compute dtype (bfloat16), so every adapted layer
    of a bf16 model would return float32, and the scan over the stacked layers refuses a
    carry that changes dtype. nnx.Linear has already cast the input to its compute dtype.
    """

    def dot_general(self, lhs, rhs, dimension_numbers, precision=None,
                    preferred_element_type=None, out_sharding=None):  # fmt: skip
        out = super().dot_general(lhs, rhs, dimension_numbers, precision,
                                  preferred_element_type, out_sharding=out_sharding)  # fmt: skip
        return out.astype(preferred_element_type or lhs.dtype)


def intercept(model: nnx.Module, spec: LoraSpec) -> nnx.Module:
    """A copy of `model` (adapters already added) whose `hidden_states` runs the adapters
    through qwix. qwix intercepts one method per model; `__call__` and generation go
    through `hidden_states`, and `lm_head` (outside it) has no adapter. With
    `spec.dropout`, every call needs `set_dropout_keys` first (training only: generation
    and evaluation take the spec without dropout)."""
    paths = sorted(adapted_layers(model))
    rule = qwix.LoraRule(
        module_path="|".join(re.escape(p) for p in paths),
        rank=spec.rank,
        alpha=spec.alpha,
        dropout=spec.dropout,
        weight_qtype=spec.quantize or None,
    )
    return qwix.apply_lora_to_model(
        model, _LoraProvider([rule]), methods=("hidden_states",), rngs=None, skip_nnx_init=True
    )


def set_dropout_keys(model: nnx.Module, key: jax.Array) -> None:
    """Gives every adapted layer the keys of its dropout masks, one per stacked layer.

    qwix draws the mask of a layer from `qwix_rngs` on the layer it intercepts
    (`flax_util.make_rng`); the stacked layers are sliced per layer by `run_stacked`, so
    the keys are stacked like their kernels and every layer gets its own.
    """
    for i, (_, layer) in enumerate(sorted(adapted_layers(model).items())):
        keys = jax.random.split(jax.random.fold_in(key, i), layer.kernel_lora_a[...].shape[0])
        layer.qwix_rngs = nnx.data(nnx.Rngs(dropout=keys))  # qwix declared it static (None)


def lora_model(model: nnx.Module, spec: LoraSpec, key: jax.Array) -> nnx.Module:
    """`model` with fresh adapters (and quantized base kernels), run through qwix."""
    return intercept(add_adapters(model, spec, key), spec)


def merged_params(model: nnx.Module, spec: LoraSpec) -> dict[str, jax.Array]:
    """Flat {"a/b/c": array} of the plain model: every adapted kernel becomes
    `W + A @ B * alpha / rank` computed in float32 (W dequantized first for QLoRA), stored in
    the adapter's dtype (the base dtype for LoRA; QLoRA's base is integer).

    Args:
      model: a model from `lora_model` (or one with its adapters added).
      spec: the spec it was built with.
    """
    merged = {}
    for path, layer in adapted_layers(model).items():
        a, b = layer.kernel_lora_a[...], layer.kernel_lora_b[...]
        kernel = layer.kernel
        base = qarray.dequantize(kernel.array) if isinstance(kernel, WithAux) else kernel[...]
        delta = jnp.einsum("LIR,LRO->LIO", a.astype(jnp.float32), b.astype(jnp.float32))
        merged[path + "/kernel"] = (base.astype(jnp.float32) + delta * spec.scale).astype(a.dtype)
    flat = nested_to_flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    # A QLoRA kernel is stored as kernel/array/{qvalue,scale}.
    replaced = tuple(k + "/" for k in merged)
    rest = {k: v for k, v in flat.items() if not is_adapter(k) and not k.startswith(replaced)}
    return {**rest, **merged}


def with_adapter(model: nnx.Module, spec: LoraSpec, params: dict[str, jax.Array]) -> nnx.Module:
    """A plain model with trained adapters, unmerged: `spec`'s adapters added (and its base
    kernels quantized for QLoRA, as in training), then `params` (flat: every adapter, plus
    any fully trained parameter such as the projector) put in, run through qwix.

    Raises:
      ValueError: `params` misses an adapter, names a parameter the model does not have,
        or has another shape.
    """
    add_adapters(model, spec, jax.random.key(0))  # every adapter is replaced below
    state = nnx.state(model, nnx.Param)
    flat = nested_to_flat(nnx.to_pure_dict(state))
    missing = sorted(k for k in flat if is_adapter(k) and k not in params)
    unknown = sorted(set(params) - set(flat))
    if missing or unknown:
        raise ValueError(f"adapter: missing {missing[:3]}, not in the model {unknown[:3]}")
    for path, value in params.items():
        if tuple(value.shape) != tuple(flat[path].shape):
            raise ValueError(
                f"adapter: {path} has shape {value.shape}, the model {flat[path].shape}"
            )
    placed = {k: jnp.asarray(params.get(k, v), flat[k].dtype) for k, v in flat.items()}
    nnx.replace_by_pure_dict(state, flat_to_nested(placed))
    nnx.update(model, state)
    return intercept(model, dataclasses.replace(spec, dropout=0.0))  # dropout: training only
