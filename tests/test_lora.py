"""LoRA and QLoRA (train.lora, models/lora.py): adapter-only training on an 8-device mesh,
the frozen base untouched bit for bit, exact resume, merge, quantized storage."""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_helpers import STAGE1, STAGE2, model_config, random_batch, train_config

from llava_jax import model_io
from llava_jax.inference.generator import Generator, Prompt, SamplingConfig
from llava_jax.models import build, lora
from llava_jax.models.build import abstract_model
from llava_jax.models.llava import LlavaModel
from llava_jax.param_paths import flat_to_nested, nested_to_flat
from llava_jax.sharding import make_mesh, shard_batch
from llava_jax.train.checkpoints import Checkpointer
from llava_jax.train.flops import train_flops_per_step
from llava_jax.train.optim import lr_schedules, trainable_labels
from llava_jax.train.setup import TrainSetup
from llava_jax.train.state import (
    has_optimizer_state,
    init_state,
    labels_for,
    train_model,
)
from llava_jax.train.step import make_train_step, token_losses

LLM_KERNELS = [f"language_model/layers/{m}/kernel" for m in (
    "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
    "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")]  # fmt: skip


def lora_config(rank=4, quantize="", trainable=STAGE1):
    c = train_config(trainable)
    c.train.lora.rank = rank
    c.train.lora.alpha = 2.0 * rank
    c.train.lora.quantize = quantize
    return c


def test_labels_adapters_train_the_adapted_layers_do_not():
    cfg = model_config()
    labels = labels_for(cfg, lora_config())
    adapters = {p for p in labels if lora.is_adapter(p)}
    assert adapters == {k + s for k in LLM_KERNELS for s in ("_lora_a", "_lora_b")}
    trained = {p for p, label in labels.items() if label == "train"}
    assert trained == adapters | {p for p in labels if p.startswith("multi_modal_projector/")}
    with pytest.raises(ValueError, match="has LoRA adapters"):
        trainable_labels(labels, lora_config(trainable=STAGE2))


def test_config_errors_are_one_line():
    cfg = model_config()
    for field, value, match in [
        ("rank", -1, "train.lora.rank"),
        ("quantize", "int3", "train.lora.quantize"),
        ("dropout", 1.0, "train.lora.dropout"),
        ("modules", ("language_model/nothing",), "matches no parameter"),
        ("modules", ("language_model/layers/input_layernorm/scale",), "not the kernel"),
        ("modules", ("language_model/(",), "bad pattern"),
    ]:
        config = lora_config()
        config.train.lora[field] = value
        with pytest.raises(ValueError, match=match) as e:
            labels_for(cfg, config)
        assert "\n" not in str(e.value)
    config = lora_config(rank=0, quantize="nf4")  # QLoRA without adapters: refused
    with pytest.raises(ValueError, match="needs train.lora.rank"):
        labels_for(cfg, config)


def test_projector_lr_is_its_own_group():
    """The reference's LoRA recipes train the connector at `mm_projector_lr` (10x lower)."""
    cfg, config = model_config(), lora_config()
    config.optimizer.projector_lr = config.optimizer.lr / 10
    labels = labels_for(cfg, config)
    projector = {p for p in labels if p.startswith("multi_modal_projector/")}
    assert {p for p, label in labels.items() if label == "projector"} == projector
    schedules = lr_schedules(config, total_steps=10)
    assert float(schedules["projector"](3)) == pytest.approx(float(schedules["train"](3)) / 10)
    config.train.trainable = ()
    with pytest.raises(ValueError, match="projector_lr"):
        labels_for(cfg, config)


def test_flops_of_a_lora_llm_are_those_of_a_frozen_one():
    """Adapters only: the LLM's backward computes input gradients, no weight gradients."""
    cfg = model_config()
    kw = dict(seq_lens=[16] * 8, num_views=8)
    lora_flops = train_flops_per_step(cfg, labels_for(cfg, lora_config()), **kw)
    stage1_flops = train_flops_per_step(cfg, labels_for(cfg, train_config(STAGE1)), **kw)
    assert lora_flops == stage1_flops


@dataclasses.dataclass
class Run:
    """Three LoRA steps on an 8-device mesh from one random init, compiled once."""

    cfg: Any
    config: Any
    mesh: Any
    step: Any
    params: list[dict[str, np.ndarray]]  # before the first step and after each
    losses: list[float]
    has_opt_state: dict[str, bool]  # per parameter, at init
    opt_moments: int  # optimizer-state elements with a parameter's shape
    specs: dict[str, Any]  # PartitionSpec per parameter
    checkpoints: Any  # a checkpoint dir holding step 2
    final: Any  # the TrainState after step 3


def _copy(state) -> dict[str, np.ndarray]:  # copies: the step donates its input
    return {k: np.array(v) for k, v in nested_to_flat(state.params).items()}


def _run(quantize: str, tmp_path_factory) -> Run:
    cfg, config = model_config(), lora_config(quantize=quantize)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    setup = TrainSetup.build(config, 10, mesh=mesh, model_cfg=cfg)
    state = init_state(setup, rng=0)
    flat = nested_to_flat(state.params)
    has = {p: has_optimizer_state(state.opt_state, p) for p in flat}
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    specs = {p: v.sharding.spec for p, v in flat.items()}
    step = make_train_step(setup)
    ckpt_dir = tmp_path_factory.mktemp(f"lora{quantize}")
    params, losses = [_copy(state)], []
    for i in range(3):
        if i == 2:
            ckpt = Checkpointer(ckpt_dir, save_every=1, keep_last=1, async_save=False)
            ckpt.save(2, state, _iterator(), {"step": 2})
            ckpt.wait()
        state, metrics = step(state, shard_batch(random_batch(100 + i), mesh))
        params.append(_copy(state))
        losses.append(float(metrics["loss"]))
    return Run(cfg, config, mesh, step, params, losses, has, moments, specs, ckpt_dir, state)


def _iterator():
    return iter(grain.MapDataset.range(4).to_iter_dataset())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return _run("", tmp_path_factory)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    return _run("int8", tmp_path_factory)


# The QLoRA run compiles a second train step (~1.5 min on 2 loaded cores): slow.
@pytest.fixture(params=["lora", pytest.param("qlora", marks=pytest.mark.slow)])
def run(request):
    return request.getfixturevalue(f"{request.param}_run")


def test_step_on_8_devices_trains_only_adapters(run):
    before, after = run.params[0], run.params[-1]
    trained = [p for p, label in labels_for(run.cfg, run.config).items() if label == "train"]
    assert any(lora.is_adapter(p) for p in trained)
    # Only adapters and the projector hold optimizer state (two AdamW moments each).
    for path in before:
        assert run.has_opt_state[path] == (path in trained), path
    assert run.opt_moments == 2 * sum(before[p].size for p in trained)
    # Adapters are sharded like their kernels: A on the input axis, B on the output axis.
    for kernel in LLM_KERNELS:
        k_spec = run.specs.get(kernel) or run.specs[kernel + "/array/qvalue"]
        a_spec, b_spec = run.specs[kernel + "_lora_a"], run.specs[kernel + "_lora_b"]
        assert (a_spec[1], b_spec[2]) == (k_spec[1], k_spec[2]), kernel
        # The rank axis takes `fsdp` where the adapter has no `embed` axis to put it on.
        assert "fsdp" in (*a_spec, None) and "fsdp" in (*b_spec, None), kernel
    for path, value in before.items():
        changed = not np.array_equal(value, after[path])
        assert changed == (path in trained), path  # frozen (quantized or not): bit for bit
    assert run.losses[-1] < run.losses[0]


def test_exact_resume(run):
    """Restored at step 2 into a fresh abstract state, one more step gives step 3 exactly."""
    setup = TrainSetup.build(run.config, 10, mesh=run.mesh, model_cfg=run.cfg)
    abstract = setup.abstract
    restored, meta = Checkpointer(run.checkpoints, save_every=1).restore(2, abstract, _iterator())
    assert meta == {"step": 2}
    resumed, _ = run.step(restored, shard_batch(random_batch(102), run.mesh))
    want, got = run.params[3], _copy(resumed)
    for path in want:
        assert np.array_equal(want[path], got[path]), path


def _losses(graphdef, params, batch):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    return np.asarray(jax.jit(lambda p: token_losses(graphdef, p, batch)[0])(params))


def test_merged_equals_unmerged(run):
    spec = lora.spec_from_config(run.config)
    lora_graphdef = nnx.graphdef(train_model(run.cfg, run.config))
    trained = flat_to_nested(run.params[-1])
    merged = lora.merged_params(nnx.merge(lora_graphdef, trained), spec)
    plain = abstract_model(run.cfg)
    assert set(merged) == set(nested_to_flat(nnx.to_pure_dict(nnx.state(plain, nnx.Param))))
    batch = random_batch(7)
    unmerged = _losses(lora_graphdef, trained, batch)
    merged_ce = _losses(nnx.graphdef(plain), flat_to_nested(merged), batch)
    assert not np.allclose(unmerged, _losses(lora_graphdef, flat_to_nested(run.params[0]), batch))
    # Per-token cross-entropy, float32 throughout: the merge only reassociates W x + A B x
    # (and for QLoRA dequantizes W once instead of in every matmul).
    np.testing.assert_allclose(merged_ce, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize", ["", "nf4"])
def test_a_bf16_model_with_float32_adapters_keeps_bf16_activations(quantize):
    """The LoRA recipes compute in bfloat16 with float32 master weights: an adapted layer
    returns bfloat16 as the base layer does (qwix alone returns float32, which the scan over
    stacked layers refuses: the 13B LoRA plan failed so)."""
    cfg = model_config(dtype="bfloat16", scan_layers=True)
    model = lora.lora_model(LlavaModel(cfg, rngs=nnx.Rngs(0)),
                            lora.LoraSpec(rank=4, alpha=8.0, quantize=quantize),
                            jax.random.key(1))  # fmt: skip
    ids = np.random.RandomState(4).randint(3, 60, size=(2, 9)).astype(np.int32)
    hidden = jax.jit(lambda m: m.hidden_states(ids).hidden)(model)
    assert hidden.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(hidden)))


@pytest.mark.parametrize("qtype,bits", [("int8", 8), ("int4", 4), ("nf4", 4)])
def test_qlora_base_is_stored_quantized(qtype, bits):
    """The train state's base kernels (what init_state creates and checkpoints hold) are
    `bits`-wide integers plus float32 scales: bytes counted against the float32 kernel."""
    cfg = model_config()
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    setup = TrainSetup.build(lora_config(quantize=qtype), 10, mesh=mesh, model_cfg=cfg)
    state = setup.abstract
    flat = nested_to_flat(state.params)
    plain = nested_to_flat(nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param)))
    for kernel in LLM_KERNELS:
        assert kernel not in flat
        qvalue, scale = flat[kernel + "/array/qvalue"], flat[kernel + "/array/scale"]
        assert qvalue.shape == plain[kernel].shape
        assert jnp.iinfo(qvalue.dtype).bits == bits, qvalue.dtype
        stored = qvalue.size * bits // 8 + scale.size * jnp.dtype(scale.dtype).itemsize
        full = plain[kernel].size * 4
        # One float32 scale per output column (int8) or per column and 64-row block (4-bit
        # when the width divides by 64; the tiny widths do not, so per column).
        assert scale.size == qvalue.shape[0] * qvalue.shape[-1], scale.shape
        assert stored < full * (bits / 32 + 0.1), (kernel, stored, full)


@pytest.mark.slow
def test_qlora_int8_arrays_hold_one_byte_per_weight(qlora_run):
    for kernel in LLM_KERNELS:
        qvalue = nested_to_flat(qlora_run.final.params)[kernel + "/array/qvalue"]
        assert qvalue.dtype == jnp.int8 and qvalue.nbytes == qvalue.size, kernel


def _trained_lora(cfg, spec, base: dict) -> tuple[Any, dict]:
    """(the adapted model, its trained params: adapters with a random B, a moved projector)
    as a run of `spec` from `base` would leave them."""
    model = lora.add_adapters(build.model_from_params(cfg, base), spec, jax.random.key(1))
    state = nnx.state(model, nnx.Param)
    flat = nested_to_flat(nnx.to_pure_dict(state))
    rng = np.random.RandomState(3)
    trained = {k: v for k, v in flat.items() if lora.is_adapter(k) or "projector" in k}
    trained = {
        k: v + jnp.asarray(0.1 * rng.randn(*v.shape), v.dtype) if not k.endswith("_lora_a") else v
        for k, v in trained.items()
    }
    nnx.replace_by_pure_dict(state, flat_to_nested({**flat, **trained}))
    nnx.update(model, state)
    return model, trained


def _logits_and_tokens(model, prompt_ids):
    ids = jnp.asarray(prompt_ids)[None]
    logits = model.language_model.logits(model.hidden_states(ids).hidden)
    generation = Generator(model).generate([Prompt(prompt_ids)], SamplingConfig(max_new_tokens=6))
    return np.asarray(logits), generation[0].token_ids


@pytest.mark.parametrize("quantize", ["", "nf4"])
def test_adapter_dir_generates_like_the_merged_model(quantize, tmp_path):
    """`export` without --merge writes an adapter dir; the base model plus it (unmerged,
    QLoRA's base quantized again on load) gives the merged model's logits and tokens."""
    cfg = model_config()
    spec = lora.LoraSpec(rank=4, alpha=8.0, quantize=quantize)
    base = build.model_params(LlavaModel(cfg, rngs=nnx.Rngs(0)))
    trained_model, trained = _trained_lora(cfg, spec, base)
    merged = build.model_from_params(cfg, lora.merged_params(trained_model, spec))

    model_io.save_adapter_dir(tmp_path / "adapter", spec, trained)
    loaded_spec, params = model_io.load_adapter_dir(tmp_path / "adapter")
    assert loaded_spec == spec and set(params) == set(trained)
    unmerged = lora.with_adapter(build.model_from_params(cfg, base), spec, params)

    prompt_ids = np.random.RandomState(4).randint(3, 60, size=9).astype(np.int32)
    logits, tokens = _logits_and_tokens(unmerged, prompt_ids)
    merged_logits, merged_tokens = _logits_and_tokens(merged, prompt_ids)
    plain_logits, _ = _logits_and_tokens(build.model_from_params(cfg, base), prompt_ids)
    assert not np.allclose(logits, plain_logits, atol=1e-3)  # the adapters matter
    # float32: the merge only reassociates W x + A B x (QLoRA: dequantizes W once).
    np.testing.assert_allclose(logits, merged_logits, rtol=1e-5, atol=1e-5)
    assert tokens == merged_tokens


def test_adapter_that_does_not_fit_is_refused(tmp_path):
    cfg = model_config()
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    base = build.model_params(LlavaModel(cfg, rngs=nnx.Rngs(0)))
    _, trained = _trained_lora(cfg, spec, base)
    k_a = "language_model/layers/self_attn/k_proj/kernel_lora_a"
    for params, match in [
        ({k: v for k, v in trained.items() if k != k_a}, "missing"),
        ({**trained, "language_model/extra": jnp.zeros(2)}, "not in the model"),
        ({**trained, k_a: jnp.zeros((1, 2, 3))}, "has shape"),
    ]:
        with pytest.raises(ValueError, match=match) as e:
            lora.with_adapter(build.model_from_params(cfg, base), spec, params)
        assert "\n" not in str(e.value)
    with pytest.raises(model_io.CheckpointError, match="not an adapter dir"):
        model_io.load_adapter_dir(tmp_path)


def test_merged_model_exported_to_hf_gives_the_adapted_logits(tmp_path):
    """A merged LoRA model through `convert jax-to-hf` loads in transformers with the
    unmerged model's logits: max |difference| <= 1e-4 (float32, as tests/test_parity.py)."""
    import hf_tiny
    import torch
    import transformers

    from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
    from llava_jax.conversion.jax_to_hf import convert_jax_to_hf

    hf_tiny.llava().save_pretrained(tmp_path / "hf")
    cfg = convert_hf_to_jax(tmp_path / "hf", tmp_path / "base")
    base = {k: np.asarray(v) for k, v in model_io.load_params(tmp_path / "base").items()}
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    adapted, _ = _trained_lora(cfg, spec, base)
    merged = {k: np.asarray(v) for k, v in lora.merged_params(adapted, spec).items()}
    model_io.save_model_dir(tmp_path / "merged", cfg, merged)
    convert_jax_to_hf(tmp_path / "merged", tmp_path / "merged_hf")

    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged_hf")
    ids = np.random.RandomState(0).randint(2, 140, size=(1, 12)).astype(np.int32)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids)).logits.numpy()
    unmerged = lora.intercept(adapted, spec)
    got = np.asarray(unmerged.language_model.logits(unmerged.hidden_states(ids).hidden))
    plain = build.model_from_params(cfg, base)
    plain_logits = np.asarray(plain.language_model.logits(plain.hidden_states(ids).hidden))
    assert np.abs(plain_logits - want).max() > 1e-3  # the adapters matter
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_dropout_changes_training_gradients_only():
    """`train.lora.dropout`: the adapters' input dropped in training (a new mask per key),
    never in the merge or in generation; 0 is the dropout-free model."""
    cfg = model_config()
    base = build.model_params(LlavaModel(cfg, rngs=nnx.Rngs(0)))
    spec = lora.LoraSpec(rank=4, alpha=8.0)
    trained_model, trained = _trained_lora(cfg, spec, base)
    params = nnx.to_pure_dict(nnx.state(trained_model, nnx.Param))
    batch = {k: jnp.asarray(v) for k, v in random_batch(5).items()}

    def grad_fn(dropout, keyed):  # compiled once per setting
        config = lora_config()
        config.train.lora.dropout = dropout
        graphdef = nnx.graphdef(train_model(cfg, config))

        def loss(p, key):
            return jnp.sum(token_losses(graphdef, p, batch, dropout_key=key if keyed else None)[0])

        grad = jax.jit(jax.grad(loss))
        return lambda key: nested_to_flat(grad(params, key))

    k1, k2 = jax.random.key(1), jax.random.key(2)
    off = grad_fn(0.0, False)(k1)  # dropout 0: no key, today's model
    on = grad_fn(0.3, True)
    on1, on1_again, on2 = on(k1), on(k1), on(k2)
    b = "language_model/layers/mlp/up_proj/kernel_lora_b"
    assert all(np.array_equal(on1[k], on1_again[k]) for k in on1)  # the key decides
    assert not np.allclose(on1[b], off[b]) and not np.allclose(on1[b], on2[b])
    # The merge and an adapter dir's model take no dropout: as with dropout 0.
    dropped = dataclasses.replace(spec, dropout=0.3)
    merged, want = (
        lora.merged_params(trained_model, dropped),
        lora.merged_params(trained_model, spec),
    )
    assert all(np.array_equal(v, want[k]) for k, v in merged.items())
    ids = np.random.RandomState(4).randint(3, 60, size=(1, 9)).astype(np.int32)
    logits = []
    for s in (spec, dropped):
        m = lora.with_adapter(build.model_from_params(cfg, base), s, trained)
        logits.append(np.asarray(m.language_model.logits(m.hidden_states(ids).hidden)))
    assert np.array_equal(logits[0], logits[1])


@pytest.mark.slow  # compiles a third train step (~1.5 min on 2 loaded cores)
def test_train_step_with_dropout_draws_masks_from_the_seed():
    """Two runs differing only in train.seed: the same step, other dropout masks."""
    cfg, mesh = model_config(), make_mesh(data=2, fsdp=2, tensor=2)
    updated = []
    for seed in (0, 1):
        config = lora_config()
        config.train.lora.dropout = 0.3
        config.train.seed = seed
        setup = TrainSetup.build(config, 10, mesh=mesh, model_cfg=cfg)
        state = init_state(setup, rng=0)  # the same init
        step = make_train_step(setup)
        state, metrics = step(state, shard_batch(random_batch(100), mesh))
        assert np.isfinite(float(metrics["loss"]))
        updated.append(_copy(state))
    b = "language_model/layers/mlp/up_proj/kernel_lora_b"
    assert not np.array_equal(updated[0][b], updated[1][b])
