"""The docs/scaling.md table: `llava-jax plan` for the paper recipes on several TPU topologies.

    python benchmarks/scaling_table.py                      # run what is missing, then render
    python benchmarks/scaling_table.py --only "7B finetune" --topologies v5p-8 v5p-32
    python benchmarks/scaling_table.py --render-only
    python benchmarks/scaling_table.py --memory-only --only "13B"   # fit only, no step time
    python benchmarks/scaling_table.py --recost                     # see below
    python benchmarks/scaling_table.py --with-cost --only "13B"     # redo --memory-only rows

The table in docs/scaling.md: the LLaVA-1.5-7B finetune rows and the grad_accum rows that
fit with `--only`, then everything else with `--memory-only` (a fit in a minute or two per
plan instead of five to fifteen on a 2-core machine), then `--with-cost` for some of those.

Each (stage, topology, overrides) is planned once, in a fresh process (`llava-jax plan
--json`, so a crash or an out-of-memory compile loses nothing), and appended to
benchmarks/scaling_results.jsonl; reruns skip what is there. The table between the markers
of docs/scaling.md is then rewritten from that file. Every number is a compiler estimate
(XLA's memory_analysis and cost_analysis for the target chips), not a measurement.

`--recost` re-estimates the step time of recorded plans whose FLOPs were under-counted
(`cost_plausible` false: planned before the cost compiles turned windowed matmuls off) with
the current cost compiles only, keeping the recorded memory compile (a slow one, whose program
has not changed); the record says so in `recosted`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from llava_jax.hardware import CHIPS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "scaling_results.jsonl"
DOC = ROOT / "docs" / "scaling.md"
START, END = "<!-- scaling-table:start -->", "<!-- scaling-table:end -->"


@dataclasses.dataclass(frozen=True)
class Stage:
    label: str
    recipe: str
    samples: int  # records in one epoch of the stage's data (model cards, scripts)
    topologies: tuple[str, ...]
    overrides: tuple[str, ...] = ()


# Sample counts: LLaVA 595K / 80K (the finetune recipe's default :80k); LLaVA-1.5 558K / 665K;
# OneVision stage 1 558K, SI 3.6M, OV 1.6M (LLaVA-VL/LLaVA-NeXT
# `scripts/train/README.md` and the lmms-lab model cards); LLaVA-NeXT 760K (its blog; no script
# was released). Every LLaVA recipe on at least three topologies; OneVision on its own slice.
STAGES = (
    Stage("LLaVA-7B pretrain", "configs/llava_v1_pretrain.py", 595_000,
          ("v5p-8", "v5e-16", "v6e-8")),
    Stage("LLaVA-7B finetune", "configs/llava_v1_finetune.py", 80_000,
          ("v5p-8", "v5e-16", "v6e-8")),
    Stage("LLaVA-1.5-7B pretrain", "configs/llava15_7b_pretrain.py", 558_000,
          ("v5p-8", "v5e-16", "v6e-8")),
    Stage("LLaVA-1.5-7B finetune", "configs/llava15_7b_finetune.py", 665_000,
          ("v5p-8", "v5p-32", "v5p-128", "v5e-16", "v6e-8", "v6e-64")),
    Stage("LLaVA-1.5-13B pretrain", "configs/llava15_7b_pretrain.py:13b", 558_000,
          ("v5p-8", "v5p-32", "v6e-8")),
    Stage("LLaVA-1.5-13B finetune", "configs/llava15_7b_finetune.py:13b", 665_000,
          ("v5p-32", "v5e-16", "v6e-64")),
    Stage("LLaVA-NeXT-7B finetune", "configs/llava_next_finetune.py", 760_000,
          ("v5p-8", "v5p-32", "v6e-64")),
    # OneVision on the slice each recipe is placed for (its `TOPOLOGY`), as shipped; the
    # OV stage compiles the SI shapes (tests/test_plan.py), so its plans are the SI ones.
    Stage("OneVision-0.5B stage 1", "configs/onevision_stage1.py:0.5b", 558_000, ("v5e-16",)),
    Stage("OneVision-0.5B SI", "configs/onevision_si.py:0.5b", 3_600_000, ("v5p-32",)),
    Stage("OneVision-7B stage 1", "configs/onevision_stage1.py:7b", 558_000, ("v5p-32",)),
    Stage("OneVision-7B SI", "configs/onevision_si.py:7b", 3_600_000, ("v5p-128",)),
    Stage("OneVision-72B stage 1", "configs/onevision_stage1.py:72b", 558_000, ("v5p-512",)),
    Stage("OneVision-72B SI", "configs/onevision_si.py:72b", 3_600_000, ("v5p-512",)),
    # What the plan suggests where the recipe as written does not fit (same global batch).
    Stage("LLaVA-1.5-7B finetune", "configs/llava15_7b_finetune.py", 665_000, ("v6e-8",),
          ("--config.optimizer.grad_accum=4",)),
)  # fmt: skip


def _key(label: str, topology: str, overrides) -> str:
    return json.dumps([label, topology, list(overrides)])


def load_results() -> dict[str, dict]:
    if not RESULTS.exists():
        return {}
    out = {}
    for line in RESULTS.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out[_key(r["label"], r["topology"], r["overrides"])] = r
    return out


def run_one(stage: Stage, topology: str, overrides, timeout: float, memory_only=False) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "llava_jax.cli.main",
        "plan",
        "--config",
        stage.recipe,
        "--topology",
        topology,
        "--json",
        *(["--memory-only"] if memory_only else []),
        *overrides,
    ]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    record = {
        "label": stage.label,
        "recipe": stage.recipe,
        "topology": topology,
        "overrides": list(overrides),
        "samples": stage.samples,
        "command": "llava-jax " + " ".join(cmd[3:]),
        "wall_seconds": time.time() - start,
        "memory_only": memory_only,
    }
    if proc.stdout.strip().startswith("{"):
        record["plan"] = json.loads(proc.stdout)
    else:
        record["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    return record


def cost_of(recipe: str, topology: str, overrides) -> dict:
    """The plan's cost estimate alone (its small unrolled compiles), as a dict."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    from llava_jax.planning import estimate
    from llava_jax.planning import topology as topo_lib
    from llava_jax.train import config_loader

    topo = topo_lib.parse_topology(topology)
    devices = topo_lib.compile_devices(topo)
    config = config_loader.load_config(recipe, list(overrides))
    cost, seconds = estimate.extrapolated_cost(estimate.plan_setup(config, devices), topo.chip)
    return {"cost": dataclasses.asdict(cost), "compile_seconds": seconds}


def recost(record: dict, timeout: float) -> dict:
    """`record` with its cost re-estimated in a fresh process and the derived fields redone."""
    cmd = [sys.executable, __file__, "--cost-of", record["recipe"], record["topology"],
           *record["overrides"]]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if not proc.stdout.strip().startswith("{"):
        raise RuntimeError((proc.stderr.strip().splitlines() or ["?"])[-1])
    new = json.loads(proc.stdout)
    p = dict(record["plan"])
    cost = new["cost"]
    chip = next(c for c in CHIPS.values() if c.name == p["chip"])
    step = cost["xla_seconds"] or cost["roofline_seconds"]
    p.update(
        cost=cost,
        step_seconds=step,
        mfu=p["model_flops"] / (step * p["num_chips"] * chip.peak_bf16_flops),
        tokens_per_second=p["batch_size"] * p["seq_len"] / step,
        cost_plausible=cost["flops"] * p["num_chips"] >= p["model_flops"],
        compile_seconds=p["compile_seconds"] + new["compile_seconds"],
    )
    return {**record, "plan": p, "recosted": "cost compiles rerun (windowed matmuls off); "
            "memory from the recorded compile"}  # fmt: skip


def _fmt_seconds(s):
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 120:
        return f"{s:.2f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def render(results: dict[str, dict]) -> str:
    header = (
        "| Stage | Topology | Mesh (data, fsdp, tensor) / remat / accum | Fits | GB per chip "
        "(used / HBM) | Step (XLA est.) | MFU (est.) | Tokens/s per chip | Stage wall-clock "
        "(est.) | Compile |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    order = {}
    for i, stage in enumerate(STAGES):
        order.setdefault(stage.label, i)  # a stage's rows stay together
    # The rows STAGES asks for; a recorded plan no stage names (an earlier placement of a
    # recipe) stays in the results file, out of the table.
    wanted = {_key(s.label, t, s.overrides) for s in STAGES for t in s.topologies}
    for r in sorted(
        (r for k, r in results.items() if k in wanted),
        key=lambda r: (order.get(r["label"], 99), r["topology"], len(r["overrides"])),
    ):
        p = r.get("plan")
        short = [
            o.removeprefix("--config.").removeprefix("model.overrides.") for o in r["overrides"]
        ]
        what = r["label"] + (f" ({', '.join(short)})" if short else "")
        if p is None:
            rows.append(
                f"| {what} | {r['topology']} | | error: {r.get('error', '?')} | | | | | | |"
            )
            continue
        m = p["memory"] or {}
        mesh = p["mesh"]
        setup = (
            f"{mesh['data']}, {mesh['fsdp']}, {mesh['tensor']} / {p['remat_policy']} / "
            f"{p['grad_accum']}"
        )
        hbm = {c.name: c.hbm_bytes for c in CHIPS.values()}[p["chip"]]
        used = f"{m['used'] / 1e9:,.1f} / {hbm / 1e9:.0f}" if m else "-"
        step = p["step_seconds"]
        steps = math.ceil(r["samples"] / p["batch_size"])
        stage_s = steps * step if step and p["fits"] else None
        mfu = f"{100 * p['mfu']:.0f}%" if p["mfu"] is not None and p["fits"] else "-"
        # XLA counted fewer FLOPs than the model needs (see the note under the table)
        cost = p["cost"] or {}
        suspect = p["fits"] and cost.get("flops", 1e30) * p["num_chips"] < p["model_flops"]
        tps = p["tokens_per_second"]
        tps = f"{tps / p['num_chips']:,.0f}" if tps and p["fits"] else "-"
        fits = "yes" if p["fits"] else "**no**"
        mark = "¹" if suspect else ""
        if p["fits"] and cost and cost.get("xla_seconds") is None:
            mark += "²"  # no optimal_seconds from libtpu: the roofline estimate
        if p["fits"] and not cost:
            mark += "³"  # planned with --memory-only: fit only
        if p["fits"] and p.get("attention", "xla") == "xla":
            mark += "⁴"  # planned before the splash kernel: XLA's chunked attention
        rows.append(
            f"| {what} | {r['topology']} ({p['num_chips']} chips) | {setup} | {fits} | "
            f"{used} | {_fmt_seconds(step) if p['fits'] else '-'}{mark} | {mfu}{mark} | "
            f"{tps}{mark} | "
            f"{_fmt_seconds(stage_s)}{mark} ({steps:,} steps) | {p['compile_seconds']:.0f} s |"
        )
    return header + "\n" + "\n".join(rows)


def write_doc(table: str) -> None:
    text = DOC.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="stages whose label contains this text")
    parser.add_argument("--topologies", nargs="*", help="only these topologies")
    parser.add_argument(
        "--override",
        dest="overrides",
        action="append",
        default=[],
        metavar="--config.X=Y",
        help="a config override for the runs (repeatable; write --override=--config.X=Y)",
    )
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="fit only: no cost compiles")
    parser.add_argument(
        "--with-cost", action="store_true", help="plan again, fully, what fitted with --memory-only"
    )
    parser.add_argument(
        "--recost", action="store_true", help="re-estimate under-counted recorded plans"
    )
    parser.add_argument("--cost-of", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cost_of:  # the child process of --recost: RECIPE TOPOLOGY [OVERRIDES...]
        recipe, topology, *overrides = args.cost_of
        print(json.dumps(cost_of(recipe, topology, overrides)))
        return 0
    results = load_results()
    if args.recost:
        for key, record in list(results.items()):
            p = record.get("plan") or {}
            if not p.get("fits") or p.get("cost_plausible") is not False:
                continue
            print(f"re-estimating {record['label']} on {record['topology']}", flush=True)
            results[key] = recost(record, args.timeout)
            with RESULTS.open("a") as f:
                f.write(json.dumps(results[key]) + "\n")
            q = results[key]["plan"]
            print(f"  step={q['step_seconds']:.2f} s mfu={q['mfu']:.3f} "
                  f"plausible={q['cost_plausible']}", flush=True)  # fmt: skip
    elif not args.render_only:
        for stage in STAGES:
            if args.only and args.only not in stage.label:
                continue
            for topology in stage.topologies:
                if args.topologies and topology not in args.topologies:
                    continue
                overrides = (*stage.overrides, *args.overrides)
                key = _key(stage.label, topology, overrides)
                done = results.get(key)
                fits = (done or {}).get("plan", {}).get("fits")
                if done and not (args.with_cost and done.get("memory_only") and fits):
                    continue
                print(f"planning {stage.label} on {topology} {' '.join(overrides)}", flush=True)
                record = run_one(stage, topology, overrides, args.timeout, args.memory_only)
                results[key] = record
                with RESULTS.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                p = record.get("plan") or {}
                print(
                    f"  fits={p.get('fits')} step={p.get('step_seconds')} mfu={p.get('mfu')} "
                    f"({record['wall_seconds']:.0f} s) {record.get('error', '')}",
                    flush=True,
                )
    if DOC.exists() and START in DOC.read_text():
        write_doc(render(results))
    else:
        print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
