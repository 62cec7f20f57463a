"""LoRA and QLoRA (train.lora, models/lora.py): adapter-only training on an 8-device mesh,
the frozen base untouched bit for bit, exact resume, merge, quantized storage."""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_helpers import STAGE1, STAGE2, model_config, random_batch, train_config

from llava_jax.checkpoint import abstract_model, flat_to_nested, nested_to_flat
from llava_jax.models import lora
from llava_jax.sharding import make_mesh
from llava_jax.train.checkpoints import Checkpointer
from llava_jax.train.optim import trainable_labels
from llava_jax.train.state import (
    abstract_state,
    has_optimizer_state,
    init_state,
    labels_for,
    train_model,
)
from llava_jax.train.step import make_train_step, shard_batch, token_losses

LLM_KERNELS = [f"language_model/layers/{m}/kernel" for m in (
    "self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
    "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")]  # fmt: skip


def lora_config(rank=4, quantize="", trainable=STAGE1):
    c = train_config(trainable)
    c.train.lora.rank = rank
    c.train.lora.alpha = 2.0 * rank
    c.train.lora.quantize = quantize
    return c


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh(data=2, fsdp=2, tensor=2)


def _flat(params):
    return {k: np.asarray(v) for k, v in nested_to_flat(params).items()}


def _train(cfg, config, mesh, steps, state=None):
    state = state or init_state(cfg, config, mesh, total_steps=10, rng=0)
    step = make_train_step(cfg, config, mesh, total_steps=10)
    losses = []
    for i in range(steps):
        state, metrics = step(state, shard_batch(random_batch(100 + i), mesh))
        losses.append(float(metrics["loss"]))
    return state, losses


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
        ("quantize", "int3", "train.lora.quantize"),
        ("dropout", 0.05, "train.lora.dropout"),
        ("modules", ("language_model/nothing",), "matches no parameter"),
        ("modules", ("language_model/layers/input_layernorm/scale",), "not the kernel"),
    ]:
        config = lora_config()
        config.train.lora[field] = value
        with pytest.raises(ValueError, match=match) as e:
            labels_for(cfg, config)
        assert "\n" not in str(e.value)


def test_lora_step_on_8_devices_trains_only_adapters(mesh8):
    cfg, config = model_config(), lora_config()
    state = init_state(cfg, config, mesh8, total_steps=10, rng=0)
    before = _flat(state.params)
    # Only adapters and the projector hold optimizer state (two AdamW moments each).
    trained = [p for p, label in labels_for(cfg, config).items() if label == "train"]
    for path in before:
        assert has_optimizer_state(state.opt_state, path) == (path in trained), path
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * sum(before[p].size for p in trained)
    # Adapters are sharded like their kernels: A on the input axis, B on the output axis.
    for kernel in LLM_KERNELS:
        k_spec = nested_to_flat(state.params)[kernel].sharding.spec
        a_spec = nested_to_flat(state.params)[kernel + "_lora_a"].sharding.spec
        b_spec = nested_to_flat(state.params)[kernel + "_lora_b"].sharding.spec
        assert (a_spec[1], b_spec[2]) == (k_spec[1], k_spec[2]), kernel
    state, losses = _train(cfg, config, mesh8, steps=3, state=state)
    after = _flat(state.params)
    for path, value in before.items():
        changed = not np.array_equal(value, after[path])
        assert changed == (path in trained), path  # frozen: bit for bit
    assert losses[-1] < losses[0]


def test_fresh_adapters_change_nothing_trained_ones_do(mesh8):
    """B starts at zero, so the first loss equals the plain model's with the same base."""
    cfg = model_config()
    _, plain = _train(cfg, train_config(STAGE1), mesh8, steps=1)
    _, adapted = _train(cfg, lora_config(), mesh8, steps=1)
    assert adapted[0] == pytest.approx(plain[0], rel=1e-6)


def _logits(graphdef, params, batch):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    ce, _ = token_losses(graphdef, params, batch)
    return np.asarray(ce)


@pytest.mark.parametrize("quantize", ["", "int8"])
def test_merged_equals_unmerged(mesh8, quantize):
    cfg, config = model_config(), lora_config(quantize=quantize)
    state, _ = _train(cfg, config, mesh8, steps=3)
    spec = lora.spec_from_config(config)
    lora_graphdef = nnx.graphdef(train_model(cfg, config))
    model = nnx.merge(lora_graphdef, jax.device_get(state.params))
    merged = lora.merged_params(model, spec)
    plain = abstract_model(cfg)
    assert set(merged) == set(nested_to_flat(nnx.to_pure_dict(nnx.state(plain, nnx.Param))))
    batch = random_batch(7)
    unmerged = _logits(lora_graphdef, jax.device_get(state.params), batch)
    merged_ce = _logits(nnx.graphdef(plain), flat_to_nested(merged), batch)
    # Per-token cross-entropy (float32 throughout): the merge only reassociates W x + B A x.
    np.testing.assert_allclose(merged_ce, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype,bits", [("int8", 8), ("int4", 4), ("nf4", 4)])
def test_qlora_base_is_stored_quantized(mesh8, qtype, bits):
    cfg, config = model_config(), lora_config(quantize=qtype)
    state = init_state(cfg, config, mesh8, total_steps=10, rng=0)
    flat = nested_to_flat(state.params)
    plain = nested_to_flat(nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param)))
    for kernel in LLM_KERNELS:
        assert kernel not in flat
        qvalue, scale = flat[kernel + "/array/qvalue"], flat[kernel + "/array/scale"]
        assert qvalue.shape == plain[kernel].shape and jnp.dtype(qvalue.dtype).itemsize * 8 >= bits
        assert jnp.iinfo(qvalue.dtype).bits == bits
        # Stored bytes: 1/4 (int8) or 1/8 (4-bit) of the float32 kernel, plus the scales.
        stored = qvalue.size * bits // 8 + scale.size * scale.dtype.itemsize
        assert stored < plain[kernel].size * 4 * (bits / 32 + 0.2)
    before = _flat(state.params)
    state, _ = _train(cfg, config, mesh8, steps=2, state=state)
    after = _flat(state.params)
    for path in before:
        if "/array/" in path:
            assert np.array_equal(before[path], after[path]), path


def test_exact_resume(mesh8, tmp_path):
    """Two steps, save, restore into a fresh process's abstract state, one more step:
    the same parameters as three steps in a row."""
    cfg, config = model_config(), lora_config(quantize="int8")
    straight, _ = _train(cfg, config, mesh8, steps=3)
    state, _ = _train(cfg, config, mesh8, steps=2)
    it = iter(grain.MapDataset.range(4).to_iter_dataset())
    ckpt = Checkpointer(tmp_path, save_every=1, keep_last=1, async_save=False)
    ckpt.save(2, state, it, {"step": 2})
    ckpt.wait()
    abstract = abstract_state(cfg, config, mesh8, total_steps=10)
    restored, _ = Checkpointer(tmp_path, save_every=1).restore(2, abstract, it)
    step = make_train_step(cfg, config, mesh8, total_steps=10)
    resumed, _ = step(restored, shard_batch(random_batch(102), mesh8))
    want, got = _flat(straight.params), _flat(resumed.params)
    for path in want:
        assert np.array_equal(want[path], got[path]), path
