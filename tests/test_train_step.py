"""The train step: freezing, sharding invariance, gradient accumulation, skipped updates."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_helpers import (
    STAGE1,
    STAGE2,
    TINY,
    model_config,
    random_batch,
    run_losses,
    train_config,
)

from llava_jax.models.build import abstract_model
from llava_jax.models.llava import LlavaModel
from llava_jax.param_paths import nested_to_flat
from llava_jax.sharding import make_mesh, shard_batch
from llava_jax.train.flops import train_flops_per_step
from llava_jax.train.optim import decay_mask, lr_schedule, trainable_labels
from llava_jax.train.setup import TrainSetup
from llava_jax.train.state import has_optimizer_state, init_state, labels_for
from llava_jax.train.step import make_train_step, token_losses

VISION_DIMS = {24, 40, 6}  # the tiny tower's width, MLP width and head dim (the LLM has none)


@pytest.fixture(scope="module")
def one_device():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


def _flat(state):
    return {k: np.asarray(v) for k, v in nested_to_flat(state.params).items()}


# -- labels and schedules (no compilation) ----------------------------------------------------


def test_labels_stage1_stage2_onevision():
    cfg = model_config()
    paths = list(labels_for(cfg, train_config(STAGE2)))
    stage1 = trainable_labels(paths, train_config(STAGE1))
    assert {p for p, label in stage1.items() if label == "train"} == {
        p for p in paths if p.startswith("multi_modal_projector/")
    }
    assert set(stage1.values()) == {"train", "frozen"}
    ov = trainable_labels(paths, train_config((".*",), optimizer__vision_lr=2e-6))
    for path, label in ov.items():
        assert label == ("vision" if path.startswith("vision_tower/") else "train"), path


def test_label_errors_name_the_problem():
    paths = list(labels_for(model_config(), train_config()))
    with pytest.raises(ValueError, match=r"\['lm_head/.\*'\] match no parameter"):
        trainable_labels(paths, train_config(STAGE1 + ("lm_head/.*",)))
    with pytest.raises(ValueError, match="vision_lr is 0"):
        trainable_labels(paths, train_config(("vision_tower/.*",)))
    with pytest.raises(ValueError, match="matches no vision_tower"):
        trainable_labels(paths, train_config(STAGE2, optimizer__vision_lr=1e-5))


def test_schedule_matches_hf_warmup_cosine():
    # HF get_cosine_schedule_with_warmup(num_warmup_steps=ceil(0.03 * 100) = 3, 100 steps).
    lr = lr_schedule(2e-5, 100, 0.03, "cosine")
    for count in (0, 1, 2, 3, 50, 99, 100):
        want = count / 3 if count < 3 else 0.5 * (1 + math.cos(math.pi * (count - 3) / 97))
        assert float(lr(count)) == pytest.approx(2e-5 * want, rel=1e-6, abs=1e-12), count
    const = lr_schedule(1e-3, 10, 0.2, "constant")
    assert [float(const(c)) for c in (0, 1, 2, 9)] == pytest.approx([0, 5e-4, 1e-3, 1e-3])


# -- freezing ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1(one_device):
    cfg, config = model_config(), train_config(STAGE1)
    setup = TrainSetup.build(config, 10, mesh=one_device, model_cfg=cfg)
    state = init_state(setup, rng=0)
    return cfg, config, state, make_train_step(setup)


def test_stage1_trains_only_the_connector(stage1, one_device):
    cfg, config, state, step = stage1
    before = _flat(state)
    state = jax.tree.map(jnp.copy, state)  # the step donates its input
    for i in range(3):
        state, metrics = step(state, shard_batch(random_batch(i), one_device))
        assert float(metrics["nonfinite"]) == 0.0
    after = _flat(state)
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert changed == sorted(k for k in before if k.startswith("multi_modal_projector/"))
    frozen = [k for k in before if not k.startswith("multi_modal_projector/")]
    assert all(after[k].tobytes() == before[k].tobytes() for k in frozen)  # bit-identical
    for path in before:
        assert has_optimizer_state(state.opt_state, path) == (path in changed), path
    assert int(state.step) == 3


def test_frozen_tower_runs_forward_only(stage1, one_device):
    """The step's matmuls on vision-width operands are the tower's and connector's forward
    ones plus the connector's first weight gradient: no backward through the tower."""
    cfg, config, state, _ = stage1
    batch = shard_batch(random_batch(0), one_device)
    graphdef = nnx.split(abstract_model(cfg), nnx.Param)[0]

    def forward(params, pixels):
        return nnx.merge(graphdef, params).encode_views(pixels)[1]

    forward_dots = _vision_dots(jax.make_jaxpr(forward)(state.params, batch["pixel_values"]))
    for trainable, vision_lr, frozen_tower in ((STAGE2, 0.0, True), ((".*",), 1e-3, False)):
        config = train_config(trainable, optimizer__vision_lr=vision_lr)
        setup = TrainSetup.build(config, 10, mesh=one_device, model_cfg=cfg)
        step = make_train_step(setup)
        abstract = setup.abstract
        dots = _vision_dots(jax.make_jaxpr(step.jitted)(abstract, dict(batch)))
        if frozen_tower:
            assert dots == forward_dots + 1, (dots, forward_dots)
        else:
            assert dots > 2 * forward_dots, (dots, forward_dots)


def _vision_dots(closed) -> int:
    count = 0
    for eqn in _eqns(closed.jaxpr):
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            dims = {d for v in eqn.invars for d in getattr(v.aval, "shape", ())}
            count += bool(dims & VISION_DIMS)
    return count


def _eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


def test_onevision_vision_lr_is_separate(one_device):
    cfg = model_config()
    config = train_config((".*",), optimizer__vision_lr=1e-3, optimizer__lr=1e-2)
    setup = TrainSetup.build(config, 10, mesh=one_device, model_cfg=cfg)
    state = init_state(setup, rng=0)
    before = _flat(state)
    step = make_train_step(setup)
    state, metrics = step(state, shard_batch(random_batch(0), one_device))
    assert float(metrics["lr"]) == pytest.approx(1e-2)
    assert float(metrics["vision_lr"]) == pytest.approx(1e-3)
    after = _flat(state)
    # Adam's first update moves each element by about lr: the two groups move 10x apart.
    moved = {k: np.abs(after[k] - before[k]).max() for k in before}
    tower = moved["vision_tower/encoder/layers/mlp/fc1/kernel"]
    llm = moved["language_model/layers/mlp/up_proj/kernel"]
    assert tower == pytest.approx(1e-3, rel=0.05) and llm == pytest.approx(1e-2, rel=0.05)


# -- skipped updates, compile once ------------------------------------------------------------


def test_nonfinite_batch_skips_the_update(stage1, one_device):
    cfg, config, state, step = stage1
    state = jax.tree.map(jnp.copy, state)
    state, _ = step(state, shard_batch(random_batch(0), one_device))
    before, opt_before = _flat(state), jax.tree.map(np.asarray, state.opt_state)
    bad = random_batch(1)
    bad["pixel_values"][2, 0, 3, 4, 1] = np.inf
    state, metrics = step(state, shard_batch(bad, one_device))
    assert float(metrics["nonfinite"]) == 1.0
    assert not np.isfinite(float(metrics["loss"]))
    after = _flat(state)
    assert all(after[k].tobytes() == before[k].tobytes() for k in before)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.opt_state),
                 opt_before)  # fmt: skip
    assert int(state.step) == 2  # the step advances so the data does not repeat
    state, metrics = step(state, shard_batch(random_batch(2), one_device))
    assert float(metrics["nonfinite"]) == 0.0
    assert step.jitted._cache_size() == 1  # compiled once for every step so far


# -- sharding and accumulation invariance -----------------------------------------------------


@pytest.fixture(scope="module")
def single_device_losses(one_device):
    return run_losses(one_device, steps=3)


def test_8_device_mesh_matches_1_device(single_device_losses):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    losses = run_losses(mesh, steps=3)
    np.testing.assert_allclose(losses, single_device_losses, rtol=0, atol=1e-5)
    assert losses[0] != losses[2]  # the model really trains


def test_grad_accum_matches_one_big_batch(single_device_losses, one_device):
    losses = run_losses(one_device, steps=3, accum=2)
    np.testing.assert_allclose(losses, single_device_losses, rtol=0, atol=1e-5)


@pytest.mark.slow  # one more compilation; the 7B lowering test covers bfloat16 compute
def test_bfloat16_compute_and_params(one_device):
    cfg = model_config(dtype="bfloat16", param_dtype="bfloat16")
    config = train_config(STAGE2)
    setup = TrainSetup.build(config, 10, mesh=one_device, model_cfg=cfg)
    state = init_state(setup, rng=0)
    assert {v.dtype for v in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    step = make_train_step(setup)
    state, metrics = step(state, shard_batch(random_batch(0), one_device))
    assert float(metrics["nonfinite"]) == 0.0 and 3.0 < float(metrics["loss"]) < 6.0


@pytest.mark.parametrize(
    "tied, scan_layers",
    [(False, True), (True, True), pytest.param(False, False, marks=pytest.mark.slow)],
)  # unrolled: slow (17 s); the unrolled loss is also compared in test_cross_entropy.py
def test_chunked_loss_equals_the_whole_logits(tied, scan_layers):
    """Chunks of 5 over 16 positions (the last one padded): same CE, argmax and gradients,
    in a loop or unrolled."""
    cfg = model_config(
        text=dataclasses.replace(TINY.text, tie_word_embeddings=tied), scan_layers=scan_layers
    )
    graphdef, params = nnx.split(LlavaModel(cfg, rngs=nnx.Rngs(params=0)), nnx.Param)
    params = nnx.to_pure_dict(params)
    batch = {k: jnp.asarray(v) for k, v in random_batch(1, rows=2, length=16).items()}

    def total(p, chunk):
        ce, correct = token_losses(graphdef, p, batch, chunk)
        return jnp.sum(ce * batch["loss_mask"]), (ce, correct)

    grad = jax.grad(total, has_aux=True)
    (g_whole, (ce_whole, ok_whole)), (g_chunk, (ce_chunk, ok_chunk)) = (
        grad(params, 0), grad(params, 5)
    )  # fmt: skip
    np.testing.assert_allclose(ce_chunk, ce_whole, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ok_chunk, ok_whole)
    flat_w, flat_c = nested_to_flat(g_whole), nested_to_flat(g_chunk)
    for path, want in flat_w.items():
        np.testing.assert_allclose(flat_c[path], want, rtol=1e-5, atol=1e-6, err_msg=path)


# -- FLOPs ------------------------------------------------------------------------------------


def test_flops_hand_count():
    cfg = model_config()
    labels = labels_for(cfg, train_config(STAGE2))
    t, b, views = 16, 8, 8
    # Vision, per view: P = 5 positions; feature layer -2 of 3 = 2 layers run.
    d_v, f_v, p = 24, 40, 5
    layer_params = 2 * (4 * d_v * d_v + 2 * d_v * f_v)
    patch_conv = 2 * (14 * 14 * 3 * d_v) * 4  # on the 4 patches, not the CLS token
    vision = views * (2 * layer_params * p + patch_conv + 4 * 2 * p * p * d_v)
    # Connector on the 4 selected tokens of each view, trained (3x).
    connector = 3 * 2 * (d_v * 32 + 32 * 32) * views * 4
    # LLM, trained: q 32x32, k and v 32x16, o 32x32, MLP 3 x 32x48; causal attention halved.
    llm_params = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 48)
    llm = 3 * (2 * llm_params * t * b + 0.5 * 4 * 2 * t * t * 32 * b) + 3 * 2 * t * b * 32 * 64
    got = train_flops_per_step(cfg, labels, seq_lens=[t] * b, num_views=views)
    assert got == pytest.approx(vision + connector + llm, rel=1e-12)
    stage1 = labels_for(cfg, train_config(STAGE1))
    got1 = train_flops_per_step(cfg, stage1, seq_lens=[t] * b, num_views=views)
    assert got1 == pytest.approx(vision + connector + 2 * llm / 3, rel=1e-12)


# -- loaded parameters, weight decay mask, lowering a real preset -----------------------------


def test_init_from_loaded_params_and_decay_mask(one_device):
    cfg, config = model_config(), train_config(STAGE2)
    setup = TrainSetup.build(config, 10, mesh=one_device, model_cfg=cfg)
    fresh = init_state(setup, rng=3)
    flat = {k: np.asarray(v) for k, v in nested_to_flat(fresh.params).items()}
    loaded = init_state(setup, params=flat)
    assert all(np.array_equal(v, flat[k]) for k, v in _flat(loaded).items())
    with pytest.raises(ValueError, match="missing"):
        init_state(setup, params=dict(list(flat.items())[1:]))
    mask = nested_to_flat(decay_mask(fresh.params))
    no_decay = sorted(k for k, v in mask.items() if not v)
    assert no_decay == sorted(k for k in flat if k.rsplit("/", 1)[1] in ("bias", "scale"))
    assert (
        mask["language_model/embed_tokens/embedding"]
        and mask["vision_tower/pre_layrnorm/scale"] is False
    )


def test_step_lowers_for_a_7b_preset_without_allocating():
    from llava_jax.config import LlavaConfig

    cfg = LlavaConfig.preset("llava-1.5-7b").with_run(
        dtype="bfloat16", remat_policy="full", vision_remat_policy="full"
    )
    config = train_config(STAGE2, optimizer__grad_accum=2)
    mesh = make_mesh(data=2, fsdp=4, tensor=1)
    setup = TrainSetup.build(config, 100, mesh=mesh, model_cfg=cfg)
    state = setup.abstract
    kernel = state.params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    mu = state.opt_state[1].inner_states["train"].inner_state[0].mu
    assert mu["language_model"]["layers"]["mlp"]["up_proj"]["kernel"].sharding == kernel.sharding
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in random_batch(0).items()}
    batch["input_ids"] = jax.ShapeDtypeStruct((16, 2048), np.int32)
    for k in ("targets", "segment_ids", "positions"):
        batch[k] = jax.ShapeDtypeStruct((16, 2048), np.int32)
    batch["loss_mask"] = jax.ShapeDtypeStruct((16, 2048), np.float32)
    batch["pixel_values"] = jax.ShapeDtypeStruct((16, 1, 336, 336, 3), np.float32)
    batch["view_mask"] = jax.ShapeDtypeStruct((16, 1), bool)
    batch["taps"] = jax.ShapeDtypeStruct((16, 576, 1), np.int32)
    batch["tap_weights"] = jax.ShapeDtypeStruct((16, 576, 1), np.float32)
    step = make_train_step(setup)
    lowered = step.jitted.lower(state, batch)
    new_state, metrics = lowered.out_info
    same = jax.tree.map(lambda o, s: (o.shape, o.dtype) == (s.shape, s.dtype), new_state, state)
    assert all(jax.tree.leaves(same))
    assert set(metrics) == {"loss", "accuracy", "num_tokens", "grad_norm", "param_norm", "lr",
                            "nonfinite"}  # fmt: skip


def test_model_overrides():
    from llava_jax.config import RematPolicy, RunSettings
    from llava_jax.train.config_loader import ConfigLoadError, apply_model_overrides, run_settings

    config = train_config()  # defaults: bfloat16 compute, float32 params, full remat, scan
    assert run_settings(config) == RunSettings(
        dtype="bfloat16",
        param_dtype="float32",
        scan_layers=True,
        remat_policy=RematPolicy.FULL,
        vision_remat_policy=RematPolicy.FULL,
    )
    cfg = apply_model_overrides(model_config(), config.model.overrides)
    assert cfg == model_config()  # the defaults override no architecture field
    config = train_config()
    config.model.overrides.unlock()
    config.model.overrides.dropout = 0.1
    with pytest.raises(ConfigLoadError, match=r"\['dropout'\] are not LlavaConfig fields"):
        apply_model_overrides(model_config(), config.model.overrides)


# -- the step keeps parameters nested -----------------------------------------------------------


def count_conversions(monkeypatch) -> list[str]:
    """Every `flat_to_nested` / `nested_to_flat` call from now on, by name, wherever a
    llava_jax module bound them."""
    import sys

    from llava_jax import param_paths

    calls = []
    for name in ("flat_to_nested", "nested_to_flat"):
        original = getattr(param_paths, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("llava_jax") and getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("accum", [1, 2])
def test_the_step_never_converts_params_between_flat_and_nested(one_device, monkeypatch, accum):
    """The jitted step splits the nested params into trained and frozen trees and merges them
    back without flat paths (it used to go flat <-> nested six times), and the optimizer
    state holds the trained parameters alone."""
    from llava_jax.train import resume

    config = train_config(STAGE1, optimizer__grad_accum=accum)
    setup = TrainSetup.build(config, 10, mesh=one_device, model_cfg=model_config())
    step = make_train_step(setup)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in random_batch(0).items()}
    calls = count_conversions(monkeypatch)
    jax.make_jaxpr(step.jitted)(setup.abstract, batch)
    assert calls == []
    resume.frozen_fingerprint(setup, init_state(setup, rng=0))
    assert "nested_to_flat" in calls  # the counter counts
    mu = setup.abstract.opt_state[1].inner_states["train"].inner_state[0].mu
    assert set(nested_to_flat(mu)) == {p for p in setup.labels if p in setup.trained}
    assert setup.trained == {p for p in setup.labels if p.startswith("multi_modal_projector/")}


def test_optimizer_state_takes_its_parameters_shardings_by_structure():
    """Two label groups (masked moments) on a 2x2x2 mesh: every moment leaf has its own
    parameter's sharding, found by the tree's structure (the parameters here share leaf
    names and shapes); another group's MaskedNodes stay; the counts are replicated."""
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from llava_jax.train.setup import opt_state_shardings

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    params = {"a": {"w": jnp.zeros((4, 4))}, "b": {"w": jnp.zeros((4, 4))}}
    params_sh = {
        "a": {"w": NamedSharding(mesh, P("fsdp"))},
        "b": {"w": NamedSharding(mesh, P(None, "tensor"))},
    }
    labels = {"a": {"w": "train"}, "b": {"w": "projector"}}
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.multi_transform({"train": optax.adamw(1e-3), "projector": optax.adamw(1e-4)}, labels),
    )
    replicated = NamedSharding(mesh, P())
    shardings = opt_state_shardings(jax.eval_shape(tx.init, params), params_sh, replicated)
    for group, name in (("train", "a"), ("projector", "b")):
        adam = shardings[1].inner_states[group].inner_state[0]
        assert adam.mu[name]["w"] == adam.nu[name]["w"] == params_sh[name]["w"], (group, name)
        other = "b" if name == "a" else "a"
        assert isinstance(adam.mu[other]["w"], optax.MaskedNode)
        assert adam.count == replicated
