"""`llava-jax plan`: TPU slice names, compile-only devices, and the real train step compiled
for a topology with libtpu on this CPU-only machine (no mocks: libtpu is the test extra).

Expected topologies are Cloud TPU's documented slice shapes (v5p-128 is 4x4x4 chips, a
v5e-256 pod 16x16); expected memory is counted by hand from the parameter shapes.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llava_jax.cli.main import main
from llava_jax.hardware import CHIPS, chip_of
from llava_jax.planning import topology as topo_lib
from llava_jax.planning.topology import TopologyError, parse_topology

pytestmark = pytest.mark.skipif(
    not topo_lib.libtpu_available(), reason="libtpu not installed (pip install -e .[tpu])"
)

TINY = "configs/shapes_tiny.py"
# The tiny shapes model with a small batch: 8 rows of 32 tokens, one 32 px view each.
TINY_ARGS = ["--config.train.batch_size=8", "--config.data.max_len=32"]


@pytest.mark.parametrize(
    "name, shape, chips, topology_name, megacore, wrap",
    [
        ("v5p-8", (2, 2, 1), 4, "v5:2x2x1", True, (False, False, False)),
        ("v5p-32", (2, 2, 4), 16, "v5:2x2x4", True, (False, False, False)),
        ("v5p-64", (2, 4, 4), 32, "v5:2x4x4", True, (False, False, False)),
        ("v5p-128", (4, 4, 4), 64, "v5:4x4x4", True, (True, True, True)),
        ("v5p-512", (4, 8, 8), 256, "v5:4x8x8", True, (True, True, True)),
        # Whole cubes that are no power of two, shaped as xpk's system_characteristics.py.
        ("v5p-384", (4, 4, 12), 192, "v5:4x4x12", True, (True, True, True)),
        ("v5p-768", (4, 8, 12), 384, "v5:4x8x12", True, (True, True, True)),
        ("v5p-1536", (8, 8, 12), 768, "v5:8x8x12", True, (True, True, True)),
        ("v5p-9216", (12, 16, 24), 4608, "v5:12x16x24", True, (True, True, True)),
        ("v5p-12288", (16, 16, 24), 6144, "v5:16x16x24", True, (True, True, True)),
        ("v4-1536", (8, 8, 12), 768, "v4:8x8x12", True, (True, True, True)),
        ("v4-32", (2, 2, 4), 16, "v4:2x2x4", True, (False, False, False)),
        ("v5e-1", (1, 1), 1, "v5e:1x1", False, (False, False, False)),
        ("v5e-8", (2, 4), 8, "v5e:2x4", False, (False, False, False)),
        ("v5e-16", (4, 4), 16, "v5e:4x4", False, (False, False, False)),
        ("v5e-128", (8, 16), 128, "v5e:8x16", False, (False, True, False)),
        ("v5e-256", (16, 16), 256, "v5e:16x16", False, (True, True, False)),
        ("v5litepod-16", (4, 4), 16, "v5e:4x4", False, (False, False, False)),
        ("v6e-8", (2, 4), 8, "v6e:2x4", False, (False, False, False)),
        ("v6e-64", (8, 8), 64, "v6e:8x8", False, (False, False, False)),
    ],
)
def test_parse_topology(name, shape, chips, topology_name, megacore, wrap):
    t = parse_topology(name)
    assert (t.shape, t.num_chips, t.topology_name) == (shape, chips, topology_name)
    assert t.chip_config_name == ("megacore" if megacore else "default")
    assert t.wrap == wrap


@pytest.mark.parametrize(
    "name",
    "v5p-4 v5p-12 v5p-96 v5p-200 v5p-12416 v4-8320 v5e-2 v5e-512 v6e-0 v3-8 tpu-v5p-8 v5p".split()
    + [""],
)
def test_parse_topology_rejects(name):
    with pytest.raises(TopologyError, match="valid forms: v4-N or v5p-N") as e:
        parse_topology(name)
    assert "\n" not in str(e.value)


def test_num_slices_multiply_chips():
    t = parse_topology("v5p-16", num_slices=2)
    assert (t.chips_per_slice, t.num_chips) == (8, 16)
    with pytest.raises(TopologyError, match="at least 1"):
        parse_topology("v5p-16", num_slices=0)


@pytest.mark.parametrize("name", ["v4-16", "v5p-8", "v5e-8", "v6e-8", "v5p-384"])
def test_compile_devices_are_the_slice_chips(name):
    t = parse_topology(name)
    devices = topo_lib.compile_devices(t)
    assert len(devices) == t.num_chips
    assert {chip_of(d) for d in devices} == {CHIPS[t.generation]}  # one device per chip


def test_multislice_devices_are_grouped_by_slice():
    t = parse_topology("v5p-16", num_slices=2)
    devices = topo_lib.compile_devices(t)
    assert [d.slice_index for d in devices] == [0] * 8 + [1] * 8


def test_plan_mesh_puts_data_over_slices():
    from llava_jax.planning.estimate import plan_setup
    from llava_jax.train.config_loader import load_config

    devices = topo_lib.compile_devices(parse_topology("v5p-16", num_slices=2))
    config = load_config("configs/llava15_7b_finetune.py", ["--config.mesh.tensor=2"])
    mesh = plan_setup(config, devices).mesh
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 2}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()


def _run(capsys, *argv):
    code = main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_rejects_unknown_topology_in_one_line(capsys):
    code, out, err = _run(capsys, "--config", TINY, "--topology", "v5p-7")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "llava-jax: error: unsupported TPU topology 'v5p-7'" in err


def test_cli_rejects_unknown_attention_in_one_line(capsys):
    code, _, err = _run(capsys, "--config", TINY, "--topology", "v5e-8", "--memory-only",
                        "--config.train.attention=flash")  # fmt: skip
    assert code != 0 and err.count("\n") == 1
    assert "train.attention='flash': choose one of auto, xla, splash, cudnn" in err


def test_cli_without_libtpu_says_how_to_install(capsys, monkeypatch):
    monkeypatch.setattr(topo_lib, "libtpu_available", lambda: False)
    code, _, err = _run(capsys, "--config", TINY, "--topology", "v5e-8")
    assert code == 2
    assert (
        err
        == "llava-jax: error: libtpu is not installed; install it with `pip install -e .[tpu]`\n"
    )


def _param_bytes(config_spec, overrides):
    from llava_jax.models.build import abstract_model, model_params
    from llava_jax.train.config_loader import load_config, model_config

    cfg = model_config(load_config(config_spec, overrides))
    params = model_params(abstract_model(cfg))
    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in params.values())


def test_tiny_plan_json_on_v5e_8(capsys):
    """The real step compiles for 8 v5e chips; memory per chip matches the parameter count."""
    code, out, _ = _run(
        capsys, "--config", TINY, "--topology", "v5e-8", "--json", "--memory-only", *TINY_ARGS
    )
    assert code == 0
    d = json.loads(out)
    assert (d["topology"], d["num_chips"], d["chip"]) == ("v5e-8", 8, "TPU v5e")
    assert d["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}  # the recipe's data = -1
    assert d["fits"] is True and d["cost"] is None and d["rows_per_chip"] == 1
    assert d["attention"] == "splash"  # auto, for TPU chips, on this CPU host
    assert d["loss_impl"] == "blockwise"
    mem = d["memory"]
    # Data parallel: every chip holds all parameters (float32) and Adam's two moments of the
    # trained ones (here every parameter trains).
    params = _param_bytes(TINY, TINY_ARGS)
    assert mem["params"] == params
    assert 2 * params <= mem["opt_state"] <= 2 * params + 1024  # + the step counts
    assert mem["argument"] >= mem["params"] + mem["opt_state"]
    assert mem["alias"] > 0  # the donated state is updated in place
    assert mem["hbm"] == CHIPS["v5e"].hbm_bytes and mem["used"] <= mem["hbm"]


def test_real_preset_lowers_for_v5p(capsys):
    """LLaVA-1.5-7B finetune: abstract state and batch lower for a v5p-8 mesh (no compile)."""
    from llava_jax.planning import estimate
    from llava_jax.train.config_loader import load_config

    devices = topo_lib.compile_devices(parse_topology("v5p-8"))
    config = load_config("configs/llava15_7b_finetune.py", [])
    setup = estimate.plan_setup(config, devices)
    mesh = setup.mesh
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    state = setup.abstract
    batch = estimate.abstract_batch(setup.batch_shape, mesh)
    assert batch["input_ids"].shape == (128, 2048)
    assert batch["pixel_values"].shape == (128, 1, 336, 336, 3)
    # 7.06e9 float32 parameters over 4 chips.
    per_chip = estimate._bytes_per_chip(state.params)
    assert 7.0e9 * 4 / 4 < per_chip < 7.1e9 * 4 / 4 * 1.01
    step = estimate.make_train_step(setup)
    text = step.jitted.lower(state, batch).as_text()
    assert "tensor<128x2048xi32>" in text  # input_ids, global shape
    assert "mhlo.num_partitions = 4" in text  # one program per chip
    assert "sdy.sharding" in text or "mhlo.sharding" in text  # arguments carry shardings


def test_out_of_memory_is_reported_as_does_not_fit(capsys):
    """A 16 GB v5e chip cannot hold the tiny model with a 4M-token vocabulary in float32
    (4.3 GB of embeddings, x4 with Adam and the gradients)."""
    args = [
        *TINY_ARGS,
        "--config.model.overrides.text.vocab_size=4194304",
        "--config.train.trainable=language_model/.*",
        "--config.optimizer.vision_lr=0",
    ]
    code, out, err = _run(capsys, "--config", TINY, "--topology", "v5e-1", "--memory-only", *args)
    assert code == 1, err
    assert "does not fit" in out and "Traceback" not in out + err
    assert "exceeds available HBM" in out  # XLA's own numbers are shown
    assert "To fit:" in out


def test_a_cost_compile_out_of_memory_keeps_the_memory_plan(capsys, monkeypatch):
    """The unrolled cost compiles can need more HBM than the step (OneVision-0.5B stage 1
    with 8 rows per v5e chip): the plan keeps its memory figures and says, in one line, why
    there is no step time, instead of a traceback."""
    from llava_jax.planning import estimate

    compile_step = estimate._compile

    def cost_compile_refused(*args, for_cost=False, **kwargs):
        if for_cost:
            raise RuntimeError(
                "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                "HLO temporaries (15.94G) exceeds available HBM (15.75G)."
            )
        return compile_step(*args, for_cost=for_cost, **kwargs)

    monkeypatch.setattr(estimate, "_compile", cost_compile_refused)
    code, out, err = _run(capsys, "--config", TINY, "--topology", "v5e-8", "--json", *TINY_ARGS)
    assert code == 0 and "Traceback" not in err
    d = json.loads(out)
    assert d["fits"] is True and d["memory"]["argument"] > 0 and d["cost"] is None
    assert d["error"].startswith("no estimate: the cost compile does not fit (")
    assert "(15.94G) exceeds available HBM (15.75G)" in d["error"]
    code, out, _ = _run(capsys, "--config", TINY, "--topology", "v5e-8", *TINY_ARGS)
    assert code == 0
    assert "Cost per chip per step: no estimate: the cost compile does not fit" in out


def test_parse_oom_message():
    from llava_jax.planning.estimate import is_oom, parse_oom

    text = (
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
        "space hbm. Used 33.27G of 30.75G hbm. Exceeded hbm capacity by 2.52G."
    )
    assert is_oom(text)
    used, limit, line = parse_oom(text)
    assert (used, limit) == (int(33.27 * 2**30), int(30.75 * 2**30))
    assert line.startswith("RESOURCE_EXHAUSTED")
    # libtpu 0.0.42's wording
    text = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
            "temporaries (18.02G) exceeds available HBM (15.75G).")  # fmt: skip
    assert parse_oom(text)[:2] == (int(18.02 * 2**30), int(15.75 * 2**30))


@pytest.mark.slow
def test_extrapolated_cost_matches_an_unrolled_compile():
    """The scan-corrected FLOPs of a 3-layer scanned model equal those of its unrolled compile."""
    from llava_jax.planning import estimate
    from llava_jax.train.config_loader import load_config, model_config

    t = parse_topology("v5e-8")
    devices = topo_lib.compile_devices(t)
    config = load_config(TINY, [*TINY_ARGS, "--config.model.overrides.text.num_hidden_layers=3"])
    model_cfg = model_config(config)
    cost, _ = estimate.extrapolated_cost(estimate.plan_setup(config, devices), t.chip)
    unrolled = model_cfg.with_run(scan_layers=False)
    compiled, *_ = estimate._compile(estimate.plan_setup(config, devices, model_cfg=unrolled))
    flops, bytes_, _ = estimate._costs(compiled)
    assert cost.flops == pytest.approx(flops, rel=0.02)
    assert cost.bytes_accessed == pytest.approx(bytes_, rel=0.1)


@pytest.mark.slow
def test_tiny_plan_text_with_cost(capsys):
    code, out, _ = _run(capsys, "--config", TINY, "--topology", "v5e-8", *TINY_ARGS)
    assert code == 0
    for needle in ("fits", "XLA FLOPs", "step time, XLA", "MFU", "tokens/s", "Compile time"):
        assert needle in out, out


@pytest.mark.slow
def test_search_prints_a_table_of_fitting_configurations(capsys):
    """--search on the tiny model: every candidate compiles; the table is sorted, fitting first."""
    args = ["--config.train.batch_size=32", "--config.data.max_len=32"]
    code, out, err = _run(capsys, "--config", TINY, "--topology", "v5e-8", "--search",
                          "--memory-only", "--json", *args)  # fmt: skip
    assert code == 0, err
    plans = json.loads(out)
    meshes = {(p["mesh"]["data"], p["mesh"]["fsdp"], p["mesh"]["tensor"]) for p in plans}
    assert {(8, 1, 1), (1, 8, 1), (2, 4, 1), (4, 2, 1), (1, 4, 2), (1, 2, 4)} <= meshes
    assert {p["remat_policy"] for p in plans} == {"none", "dots", "full"}
    assert {p["grad_accum"] for p in plans} >= {1, 2, 4}
    # rows per chip halve with each doubling of grad_accum (32 rows over 8 chips)
    by_accum = {p["grad_accum"]: p["rows_per_chip"] for p in plans if p["mesh"]["data"] == 8}
    assert by_accum == {1: 4, 2: 2, 4: 1}
    fits = [p["fits"] for p in plans]
    assert fits == sorted(fits, reverse=True)  # fitting ones first


def test_a_cost_below_the_model_flops_is_flagged():
    """XLA counting fewer FLOPs than the model needs means a loop body counted once."""
    from llava_jax.planning.estimate import Cost, Plan

    def plan_with(xla_flops_per_chip):
        cost = Cost(xla_flops_per_chip, 1e9, 1.0, 1.0, "test")
        return Plan("v5p-8", 4, "TPU v5p", {"data": 1, "fsdp": 4, "tensor": 1}, "full", 1,
                    128, 32.0, 2048, True, None, None, cost, 4e15, 1.0)  # fmt: skip

    assert plan_with(1.3e15).cost_plausible is True  # 5.2e15 >= 4e15
    assert plan_with(0.78e15).cost_plausible is False
    assert plan_with(1.3e15).mfu(CHIPS["v5p"]) == pytest.approx(4e15 / (4 * 459e12))


@pytest.mark.slow
def test_cost_compiles_count_windowed_matmuls():
    """At 16-way FSDP, XLA:TPU turns the 7B layer's sharded matmuls into loops of its own
    (windowed einsums), whose bodies `cost_analysis()` counts once: 0.89x the model FLOPs for
    a layer whose full remat needs 1.3x. The cost compiles turn windowing off and count them
    all (about 3 minutes of compiling)."""
    from llava_jax.planning import estimate
    from llava_jax.train.config_loader import load_config, model_config

    devices = topo_lib.compile_devices(parse_topology("v5p-32"))
    config = load_config("configs/llava15_7b_finetune.py", [])
    one_layer = estimate._with_depth(model_config(config), 1, 1)
    setup = estimate.plan_setup(config, devices, model_cfg=one_layer)
    model = setup.flops_per_step
    default, *_ = estimate._compile(setup)
    counted, *_ = estimate._compile(setup, for_cost=True)
    assert "windowed_dot_general" in default.as_text()
    assert estimate._costs(default)[0] * len(devices) < model  # the under-count
    assert not estimate.has_xla_loops(counted)
    assert estimate._costs(counted)[0] * len(devices) == pytest.approx(1.32 * model, rel=0.05)


def test_13b_lora_state_fits_v5e_8_where_full_finetuning_does_not():
    """Abstract states only (no compile): on 8 v5e chips (16 GB) the full 13B finetune's
    float32 params and Adam moments alone exceed a chip; the LoRA recipe's (adapters of
    rank 128 and the connector hold moments, every adapter FSDP-sharded) take under 7 GiB,
    QLoRA's (nf4 LLM kernels, two to a byte) under 2 GiB. docs/scaling.md."""
    from llava_jax.planning import estimate
    from llava_jax.train.config_loader import load_config

    devices = topo_lib.compile_devices(parse_topology("v5e-8"))
    gib = {}
    for spec in [
        "llava15_7b_finetune.py:13b",
        "llava15_7b_lora.py:13b",
        "llava15_7b_lora.py:13b,qlora",
    ]:
        config = load_config(f"configs/{spec}", [])
        state = estimate.plan_setup(config, devices).abstract
        per_chip = estimate._bytes_per_chip(state.params) + estimate._bytes_per_chip(
            state.opt_state
        )
        gib[spec] = per_chip / 2**30
    assert gib["llava15_7b_finetune.py:13b"] > CHIPS["v5e"].hbm_bytes / 2**30
    assert gib["llava15_7b_lora.py:13b"] < 7.0
    assert gib["llava15_7b_lora.py:13b,qlora"] < 2.0


@pytest.mark.slow
def test_tiny_plan_compiles_and_counts_the_splash_kernel():
    """`train.attention=auto` on a CPU host planning for TPU chips: the step holds splash's
    kernel calls, forward and backward, and the cost counts their FLOPs, which XLA's own
    `cost_analysis()` leaves out."""
    from llava_jax.nn.attention_kernels import splash_kernel_flops
    from llava_jax.planning import estimate
    from llava_jax.train.config_loader import load_config, model_config

    t = parse_topology("v5e-8")
    config = load_config(TINY, TINY_ARGS)
    model_cfg = model_config(config).with_run(scan_layers=False)
    devices = topo_lib.compile_devices(t)
    setup = estimate.plan_setup(config, devices, model_cfg=model_cfg)
    compiled, *_ = estimate._compile(setup, for_cost=True)
    text = compiled.as_text()
    for name in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
        assert f"%{name}" in text, name
    kernel = splash_kernel_flops(text)
    # LLM: 2 trained layers, 1 row of 32 tokens (padded to 128) per chip, 4 heads of 32.
    assert kernel >= 2 * (4 + 6 + 8) * 1 * 4 * 128 * 128 * 32
    flops, _, _ = estimate._costs(compiled, t.chip)
    assert flops == pytest.approx(compiled.cost_analysis()["flops"] + kernel)
    xla = load_config(TINY, [*TINY_ARGS, "--config.train.attention=xla"])
    setup_xla = estimate.plan_setup(xla, devices, model_cfg=model_cfg)
    compiled_xla, *_ = estimate._compile(setup_xla, for_cost=True)
    assert "splash_mha" not in compiled_xla.as_text()
    assert estimate._costs(compiled_xla, t.chip)[0] == compiled_xla.cost_analysis()["flops"]


# Every OneVision recipe and size, with the slice its recipe names (`TOPOLOGY`).
ONEVISION = [
    f"{stage}:{size}"
    for stage in ("onevision_stage1.py", "onevision_si.py", "onevision_ov.py")
    for size in ("0.5b", "7b", "72b")
] + ["onevision_72b_ov.py"]
# (stage, size) -> the most rows per chip per micro-batch that a plan on the recipe's slice
# found to fit (docs/scaling.md; the OV stage compiles the SI shapes). The 0.5B stage 1 with
# 16 rows of 8192 tokens per v5e chip needs 16.6 GB of 16, the 7B SI with 4 rows of 32768
# per v5p chip was refused before the splash kernel (1,011 GB).
ROWS_PER_CHIP_THAT_FIT = {
    ("stage1", "0.5b"): 4, ("stage1", "7b"): 8, ("stage1", "72b"): 1,
    ("si", "0.5b"): 4, ("si", "7b"): 2, ("si", "72b"): 1,
}  # fmt: skip


@pytest.mark.parametrize("spec", ONEVISION)
def test_onevision_recipes_as_shipped_divide_their_slice_at_the_official_batch(spec):
    """No compile: the shipped mesh covers the recipe's target slice, the global batch is the
    scripts' 256 rows at their learning rates, every micro-batch splits evenly over the
    chips, and parameters plus optimizer state take a small share of a chip (the plans that
    fit are in docs/scaling.md; `llava-jax plan --config configs/SPEC --topology T`)."""
    from llava_jax.planning import estimate
    from llava_jax.train.config_loader import load_config, load_module

    recipe, _, size = spec.partition(":")
    source = "onevision_si.py" if recipe != "onevision_stage1.py" else recipe
    topology = load_module(f"configs/{source}").TOPOLOGY[size or "72b"]
    config = load_config(f"configs/{spec}", [])
    t = parse_topology(topology)
    setup = estimate.plan_setup(config, topo_lib.compile_devices(t))
    assert dict(setup.mesh.shape) == {"data": 1, "fsdp": t.num_chips, "tensor": 1}
    lrs = (config.optimizer.lr, config.optimizer.vision_lr)
    assert lrs == ((1e-3, 0.0) if recipe == "onevision_stage1.py" else (1e-5, 2e-6))
    assert config.train.batch_size == 256
    micro_batch, rest = divmod(256, config.optimizer.grad_accum)
    assert rest == 0 and micro_batch % t.num_chips == 0, (micro_batch, t.num_chips)
    stage = "stage1" if recipe == "onevision_stage1.py" else "si"
    assert micro_batch // t.num_chips <= ROWS_PER_CHIP_THAT_FIT[stage, size or "72b"]
    assert config.train.remat_policy == config.train.vision_remat_policy == "full"
    state = setup.abstract
    per_chip = estimate._bytes_per_chip(state.params) + estimate._bytes_per_chip(state.opt_state)
    assert per_chip < 0.1 * t.chip.hbm_bytes, f"{per_chip / 1e9:.1f} GB of state per chip"


def test_onevision_ov_compiles_the_si_shapes():
    """The OV recipes take the SI plans: the same batch shapes and settings, other data."""
    from llava_jax.train.config_loader import load_config, model_config
    from llava_jax.train.setup import global_batch_shape

    for size in ("0.5b", "7b", "72b"):
        si, ov = (load_config(f"configs/onevision_{s}.py:{size}", []) for s in ("si", "ov"))
        shapes = [global_batch_shape(model_config(c), c) for c in (si, ov)]
        assert shapes[0] == shapes[1]
        assert si.to_dict() == ov.to_dict()
