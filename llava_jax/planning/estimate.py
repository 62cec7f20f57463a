"""Compile the real train step for a TPU topology and read XLA's memory and cost estimates.

The step is the training run's own: `TrainSetup.build` (`train/setup.py`) over the topology's
compile-only devices (`topology.compile_devices`) gives the mesh, the batch shape and the
abstract state (ShapeDtypeStructs carrying their NamedShardings), exactly as `llava-jax
train` builds them, so nothing is allocated: `make_train_step(setup).jitted.lower(...)` and
`.compile()` run on the CPU.

Two facts shape what is reported:
- Memory comes from the compile of the step as configured (scanned layers, micro-batches):
  `memory_analysis()` per chip; an out-of-memory compile raises an error whose text
  ("RESOURCE_EXHAUSTED", "Used 120.5G of 95.7G hbm") is parsed into the same fields.
- XLA's `cost_analysis()` counts the body of a `while` loop once, whatever its trip count,
  so a scanned stack of 32 layers reads as one layer. The FLOPs, bytes and XLA's
  `optimal_seconds` are therefore taken from three small compiles with the layers unrolled
  (1 and 2 LLM layers, 1 and 2 vision-tower layers) and extrapolated linearly to the real
  depth (every layer is the same program), then multiplied by the number of micro-batches
  (which counts the optimizer update `grad_accum` times: a small over-estimate).
- XLA:TPU turns large sharded matmuls into loops of its own ("windowed einsums": the
  all-gather or reduce-scatter of an FSDP axis overlapped with the matmul, one slice per
  iteration), which the cost analysis also counts once. The cost compiles therefore turn
  windowing off (`COST_COMPILER_OPTIONS`): the same matmuls, counted in full. The memory
  compile keeps XLA's defaults, the program a TPU would run.
- The attention kernel (`train.attention`, splash on TPU) is a `pallas_call` without a cost
  estimate, which `cost_analysis()` counts as zero FLOPs; its FLOPs are counted from the
  compiled program's kernel calls instead (`attention_kernels.splash_kernel_flops`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from llava_jax.config import LlavaConfig
from llava_jax.data.batching import BatchShape, empty_batch
from llava_jax.hardware import Chip, mfu
from llava_jax.nn.attention_kernels import resolve, splash_kernel_flops
from llava_jax.nn.cross_entropy import resolve_loss
from llava_jax.sharding import batch_sharding
from llava_jax.train.setup import TrainSetup
from llava_jax.train.step import make_train_step

# HBM bandwidth per chip, bytes/s, for the roofline cross-check (Cloud TPU docs, the v4 / v5e
# / v5p / v6e system-architecture pages).
HBM_BANDWIDTH = {"TPU v4": 1200e9, "TPU v5e": 819e9, "TPU v5p": 2765e9, "TPU v6e": 1638e9}
# A schedule length for the compile: it only fixes constants of the LR schedule.
_PLAN_STEPS = 1000
_OOM_MARKERS = ("resource_exhausted", "hbm", "out of memory")
_GB = r"([0-9.]+)\s*([KMGT]i?B?|[KMGT])"
# libtpu: window a sharded matmul only when its operands exceed this many MiB, i.e. never.
# With the 7B finetune on a v5p-32 (16-way FSDP), windowing left 0.89x the model FLOPs
# counted for one layer; without it, 1.32x (full remat: the forward counted twice).
COST_COMPILER_OPTIONS = {"xla_jf_spmd_threshold_for_windowed_einsum_mib": str(2**30)}


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per chip.

    Attributes:
      params, opt_state, batch: the arguments of the step, from their shardings.
      argument, output, temp, alias: XLA's `memory_analysis()` (alias: outputs that reuse
        donated arguments).
      peak: XLA's peak (0 when libtpu does not report it).
      hbm: the chip's HBM.
    """

    params: int
    opt_state: int
    batch: int
    argument: int
    output: int
    temp: int
    alias: int
    peak: int
    hbm: int

    @property
    def total(self) -> int:
        """argument + output + temp - alias (MaxText's sum; the compiler may over-estimate)."""
        return self.argument + self.output + self.temp - self.alias

    @property
    def used(self) -> int:
        return self.peak or self.total

    @property
    def fits(self) -> bool:
        return self.used <= self.hbm


@dataclasses.dataclass(frozen=True)
class Cost:
    """Per chip, per optimizer step (all micro-batches), extrapolated to the full depth."""

    flops: float  # XLA's count: remat recomputation and the optimizer included
    bytes_accessed: float
    xla_seconds: float | None  # XLA's `optimal_seconds`; None when libtpu gives none
    roofline_seconds: float  # max(flops / peak, bytes / HBM bandwidth)
    method: str  # how the numbers were obtained


@dataclasses.dataclass(frozen=True)
class Plan:
    """One compiled (or refused) configuration of a recipe on a topology."""

    topology: str
    num_chips: int
    chip: str
    mesh: dict[str, int]
    remat_policy: str
    grad_accum: int
    batch_size: int  # global rows per optimizer step
    rows_per_chip: float  # rows of one micro-batch per chip
    seq_len: int
    fits: bool
    memory: Memory | None
    error: str | None  # XLA's out-of-memory text, or why the configuration is invalid
    cost: Cost | None
    model_flops: float  # `train/flops.py` convention, padded batch, whole step
    compile_seconds: float
    attention: str = "xla"  # `train.attention` as resolved for the topology's chips
    loss_impl: str = "chunked"  # `train.loss_impl` as resolved for the topology's chips

    @property
    def step_seconds(self) -> float | None:
        """XLA's estimate when there is one, else the roofline estimate."""
        if self.cost is None:
            return None
        return self.cost.xla_seconds or self.cost.roofline_seconds

    def mfu(self, chip: Chip) -> float | None:
        s = self.step_seconds
        return None if s is None else mfu(self.model_flops, s, self.num_chips, chip)

    @property
    def cost_plausible(self) -> bool | None:
        """False when XLA counts fewer FLOPs than the model needs: some loop's body was
        counted once (the cost compiles unroll layers and chunks and turn windowed matmuls
        off, so this flags a loop they missed); step time and MFU are then under- and
        over-estimates."""
        if self.cost is None or not self.model_flops:
            return None
        return self.cost.flops * self.num_chips >= self.model_flops

    @property
    def tokens_per_second(self) -> float | None:
        s = self.step_seconds
        return None if not s else self.batch_size * self.seq_len / s


Progress = Callable[[str], None] | None


def _say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


class PlanError(ValueError):
    """A configuration that cannot be compiled for reasons other than memory; one line."""


def plan_setup(config, devices: Sequence[Any], *, model_cfg: LlavaConfig | None = None):
    """The training setup of `config` over compile-only devices, built as training builds
    it (`TrainSetup.build`: on several slices, `config.mesh` describes one slice and `data`
    also spans the slices)."""
    try:
        return TrainSetup.build(config, _PLAN_STEPS, devices=list(devices), model_cfg=model_cfg)
    except ValueError as e:
        raise PlanError(str(e)) from None


def abstract_batch(shape: BatchShape, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of the BATCH_FIELDS arrays, rows split over (data, fsdp)."""
    one_row = empty_batch(dataclasses.replace(shape, batch_size=1))
    sharding = batch_sharding(mesh)
    return {
        k: jax.ShapeDtypeStruct((shape.batch_size, *v.shape[1:]), v.dtype, sharding=sharding)
        for k, v in one_row.items()
    }


def _bytes_per_chip(tree: Any) -> int:
    """The largest shard of every leaf (ShapeDtypeStruct with a NamedSharding), summed."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = (
            leaf.sharding.shard_shape(leaf.shape)
            if isinstance(leaf.sharding, NamedSharding)
            else leaf.shape
        )
        total += math.prod(shard) * _itemsize(leaf.dtype)
    return int(total)


def _itemsize(dtype) -> float:
    """Bytes per element; 4-bit types (QLoRA's int4 / nf4 storage) pack two to a byte."""
    dt = np.dtype(dtype)
    return dt.itemsize / 2 if dt.name in ("int4", "uint4", "float4_e2m1fn") else dt.itemsize


def is_oom(error: BaseException | str) -> bool:
    text = str(error).lower()
    return any(m in text for m in _OOM_MARKERS)


def _to_bytes(number: str, unit: str) -> int:
    scale = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[unit[0].upper()]
    return int(float(number) * scale)


def parse_oom(text: str) -> tuple[int | None, int | None, str]:
    """(used bytes, limit bytes, the message's key line) of XLA's out-of-memory error."""
    used = limit = None
    match = re.search(rf"Used\s+{_GB}\s+of\s+{_GB}", text) or re.search(
        rf"\(\s*{_GB}\s*\)\s+exceeds available \w+\s+\(\s*{_GB}\s*\)", text
    )
    if match:
        used, limit = _to_bytes(match[1], match[2]), _to_bytes(match[3], match[4])
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    key = next(
        (ln for ln in lines if "Used" in ln or "RESOURCE_EXHAUSTED" in ln),
        lines[0] if lines else "out of memory",
    )
    return used, limit, key[:300]


def _compile(setup: TrainSetup, *, for_cost: bool = False):
    """(compiled, abstract state, abstract batch, seconds) of the real train step.

    `for_cost`: compile with `COST_COMPILER_OPTIONS`, so that `cost_analysis()` counts every
    matmul (not for the memory figures: the TPU runs XLA's default program).
    """
    state = setup.abstract
    batch = abstract_batch(setup.batch_shape, setup.mesh)
    step = make_train_step(setup)
    start = time.perf_counter()
    options = COST_COMPILER_OPTIONS if for_cost else None
    compiled = step.jitted.lower(state, batch).compile(compiler_options=options)
    return compiled, state, batch, time.perf_counter() - start


def has_xla_loops(compiled) -> bool:
    """Whether the compiled program has `while` loops (scans, chunks, windowed matmuls),
    whose bodies `cost_analysis()` counts once."""
    return re.search(r"\swhile\(", compiled.as_text()) is not None


def _costs(compiled, chip: Chip | None = None) -> tuple[float, float, float | None]:
    """(FLOPs, bytes, XLA's optimal seconds) of a compiled step, the Pallas kernels' FLOPs
    included: XLA counts a `pallas_call` as zero (`attention_kernels.splash_kernel_flops`),
    so they are added here, and their time at the chip's peak (`chip`) to XLA's seconds."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax: one dict per program
        ca = ca[0] if ca else {}
    ca = ca or {}
    kernel_flops = splash_kernel_flops(compiled.as_text())
    seconds = ca.get("optimal_seconds")
    seconds = float(seconds) if seconds is not None and seconds > 0 else None
    if seconds is not None and chip is not None:
        seconds += kernel_flops / chip.peak_bf16_flops
    flops_ = float(ca.get("flops", 0.0)) + kernel_flops
    return flops_, float(ca.get("bytes accessed", 0.0)), seconds


def _with_depth(cfg: LlavaConfig, vision: int, text: int) -> LlavaConfig:
    """`cfg` unrolled, with `vision` tower layers computed and `text` LLM layers."""
    for total in range(1, cfg.vision.num_hidden_layers + 2):
        try:
            candidate = cfg.replace(vision=dataclasses.replace(cfg.vision, num_hidden_layers=total))
        except ValueError:  # a feature layer outside so shallow a tower
            continue
        if candidate.vision_layers_run == vision:
            text_cfg = dataclasses.replace(cfg.text, num_hidden_layers=text)
            return candidate.replace(text=text_cfg).with_run(scan_layers=False)
    raise PlanError(
        f"cannot build a {vision}-layer vision tower for feature layers {cfg.feature_layers}"
    )


def extrapolated_cost(
    setup: TrainSetup, chip: Chip, progress: Progress = None
) -> tuple[Cost, float]:
    """Per-chip cost of the full step from unrolled 1- and 2-layer compiles; and their time."""
    model_cfg, config = setup.model_cfg, setup.config
    accum = int(config.optimizer.grad_accum)
    micro = config.copy_and_resolve_references()  # one micro-batch, one update
    with micro.unlocked():
        micro.optimizer.grad_accum = 1
        micro.train.batch_size = int(config.train.batch_size) // accum
    v_real, t_real = model_cfg.vision_layers_run, model_cfg.text.num_hidden_layers
    v0 = 1 if v_real >= 1 else 0
    points = {}
    seconds = 0.0
    for dv, dt in ((0, 0), (1, 0), (0, 1)):
        if dv and v_real == 0:
            points[(dv, dt)] = points[(0, 0)]
            continue
        cfg = _with_depth(model_cfg, v0 + dv, 1 + dt)
        _say(progress, f"compiling the step unrolled with {v0 + dv} vision + {1 + dt} LLM layers")
        depth = TrainSetup.build(micro, _PLAN_STEPS, mesh=setup.mesh, model_cfg=cfg)
        compiled, _, _, s = _compile(depth, for_cost=True)
        points[(dv, dt)] = _costs(compiled, chip)
        seconds += s
    base, plus_v, plus_t = (
        np.array([np.nan if x is None else x for x in points[k]], float)
        for k in ((0, 0), (1, 0), (0, 1))
    )
    per_v, per_t = plus_v - base, plus_t - base
    full = accum * (base + (v_real - v0) * per_v + (t_real - 1) * per_t)
    flops_, bytes_, xla = (float(x) for x in full)
    roofline = max(flops_ / chip.peak_bf16_flops, bytes_ / HBM_BANDWIDTH.get(chip.name, math.inf))
    method = (
        f"unrolled 1-2 layer compiles extrapolated to {v_real} vision + {t_real} LLM "
        f"layers" + (f", x{accum} micro-batches" if accum > 1 else "")
    )
    cost = Cost(flops_, bytes_, None if math.isnan(xla) else xla, roofline, method)
    return cost, seconds


def _direct_cost(compiled, chip: Chip) -> Cost:
    flops_, bytes_, xla = _costs(compiled, chip)
    roofline = max(flops_ / chip.peak_bf16_flops, bytes_ / HBM_BANDWIDTH.get(chip.name, math.inf))
    return Cost(flops_, bytes_, xla, roofline, "the compiled step (layers unrolled)")


def _step_cost(setup: TrainSetup, compiled, chip: Chip, progress: Progress):
    """(Cost, seconds of extra compiles) of the step `compiled` for the memory plan."""
    if setup.model_cfg.run.scan_layers or int(setup.config.optimizer.grad_accum) > 1:
        return extrapolated_cost(setup, chip, progress)
    if not has_xla_loops(compiled):
        return _direct_cost(compiled, chip), 0.0
    # windowed matmuls: count them in a second compile
    _say(progress, "compiling the step again with windowed matmuls off, for the cost")
    counted, _, _, seconds = _compile(setup, for_cost=True)
    return _direct_cost(counted, chip), seconds


def plan(
    config,
    devices: Sequence[Any],
    *,
    topology_name: str,
    chip: Chip,
    estimate_cost: bool = True,
    progress: Progress = None,
) -> Plan:
    """Compiles `config`'s train step for `devices` and reads XLA's estimates.

    Args:
      config: a loaded recipe (`config_loader.load_config`), overrides applied.
      devices: the topology's compile-only devices (`topology.compile_devices`); on several
        slices `config.mesh` describes one slice and `data` also spans the slices.
      topology_name: for the report, e.g. "v5p-128".
      chip: the chip's peaks (`Topology.chip`).
      estimate_cost: also run the small unrolled compiles for FLOPs and step time.
      progress: called with a line before each compile.

    Returns:
      The Plan; `fits` False with XLA's numbers in `error` when the step does not fit in HBM.

    Raises:
      PlanError: the mesh or the batch does not divide over the chips.
    """
    setup = plan_setup(config, devices)
    model_cfg, mesh, shape = setup.model_cfg, setup.mesh, setup.batch_shape
    accum = int(config.optimizer.grad_accum)
    batch = int(config.train.batch_size)
    rows_split = mesh.shape["data"] * mesh.shape["fsdp"]
    if accum < 1 or batch % accum or (batch // accum) % rows_split:
        raise PlanError(
            f"batch_size {batch} / grad_accum {accum} does not divide over data x fsdp = "
            f"{rows_split} chips"
        )
    common = dict(
        topology=topology_name,
        num_chips=len(devices),
        chip=chip.name,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        remat_policy=str(model_cfg.run.remat_policy),
        grad_accum=accum,
        batch_size=batch,
        rows_per_chip=batch / accum / rows_split,
        seq_len=shape.max_len,
        model_flops=setup.flops_per_step,
        attention=resolve(config.train.attention, mesh, model_cfg.run.dtype).value,
        loss_impl=resolve_loss(config.train.loss_impl, mesh).value,
    )
    _say(progress, f"compiling the step for {len(devices)} chips, mesh {common['mesh']}")
    start = time.perf_counter()
    try:
        compiled, state, abstract, seconds = _compile(setup)
    except Exception as e:  # noqa: BLE001 (XlaRuntimeError; only OOM is expected)
        if not is_oom(e):
            raise
        used, _, line = parse_oom(str(e))
        memory = None
        if used is not None:
            memory = Memory(0, 0, 0, 0, 0, used, 0, used, chip.hbm_bytes)  # limit: in `line`
        elapsed = time.perf_counter() - start
        return Plan(
            **common, fits=False, memory=memory, error=line, cost=None, compile_seconds=elapsed
        )
    ma = compiled.memory_analysis()
    memory = Memory(
        params=_bytes_per_chip(state.params),
        opt_state=_bytes_per_chip(state.opt_state),
        batch=_bytes_per_chip(abstract),
        argument=int(ma.argument_size_in_bytes),
        output=int(ma.output_size_in_bytes),
        temp=int(ma.temp_size_in_bytes),
        alias=int(ma.alias_size_in_bytes),
        peak=int(getattr(ma, "peak_memory_in_bytes", 0) or 0),
        hbm=chip.hbm_bytes,
    )
    cost = error = None
    if estimate_cost:
        try:
            cost, extra = _step_cost(setup, compiled, chip, progress)
            seconds += extra
        except Exception as e:  # noqa: BLE001 (XlaRuntimeError; only OOM is expected)
            # The unrolled cost programs schedule differently from the scanned step and can
            # need more HBM than it (OneVision-0.5B stage 1, 8 rows per v5e chip): keep the
            # memory plan and say why there is no step time.
            if not is_oom(e):
                raise
            error = (
                f"no estimate: the cost compile does not fit ({parse_oom(str(e))[2]}); "
                "more micro-batches (--config.optimizer.grad_accum) leave it room"
            )
    return Plan(
        **common, fits=memory.fits, memory=memory, error=error, cost=cost, compile_seconds=seconds
    )


def plan_to_dict(p: Plan, chip: Chip) -> dict[str, Any]:
    """A JSON-ready dict of a Plan, with the derived step time, MFU and tokens/s."""
    d = dataclasses.asdict(p)
    if p.memory is not None:
        d["memory"].update(total=p.memory.total, used=p.memory.used)
    d.update(step_seconds=p.step_seconds, mfu=p.mfu(chip), tokens_per_second=p.tokens_per_second,
             cost_plausible=p.cost_plausible)  # fmt: skip
    return d


def apply(config, changes: Mapping[str, Any]):
    """A copy of `config` with `{"a.b": value}` set (the search's variations)."""
    out = config.copy_and_resolve_references()
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node[p]
        with node.unlocked():
            node[leaf] = value
    return out
