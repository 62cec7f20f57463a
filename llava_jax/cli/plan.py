"""`llava-jax plan`: compile a recipe's train step for a TPU topology; report fit and speed.

Runs on any machine with libtpu installed (`pip install -e .[tpu]`), no TPU needed: the
devices come from `jax.experimental.topologies`, the state and batch are abstract, and the
numbers are XLA's estimates (memory per chip, FLOPs, `optimal_seconds`), not measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from llava_jax.cli import CommandError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="check whether a recipe fits a TPU topology and how fast it should run",
        description="Compile the real train step of a recipe for a Cloud TPU topology on this "
        "machine (CPU only; needs libtpu: pip install -e .[tpu]) and report memory per chip "
        "against HBM, XLA's FLOPs and step-time estimate, the MFU and tokens/s it implies, and "
        "the compile time. Override any config field with --config.FIELD=VALUE (e.g. "
        "--config.mesh.tensor=2 --config.train.remat_policy=dots).",
    )
    parser.add_argument(
        "--config",
        required=True,
        metavar="RECIPE[:ARG]",
        help="a recipe file, e.g. configs/llava15_7b_finetune.py or configs/x.py:13b",
    )
    parser.add_argument(
        "--topology",
        required=True,
        metavar="NAME",
        help="a Cloud TPU accelerator type: v5p-128 (TensorCores), v5e-256, v6e-8, v4-32",
    )
    parser.add_argument(
        "--num-slices", type=int, default=1, help="slices joined over DCN (data over slices)"
    )
    parser.add_argument(
        "--search",
        action="store_true",
        help="also try other meshes, remat policies and micro-batch sizes; print a table",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="skip the small extra compiles that estimate FLOPs and step time",
    )
    parser.set_defaults(run=run, overrides=[])


def run(args: argparse.Namespace) -> int:
    from llava_jax.planning import topology as topo_lib

    topology = topo_lib.parse_topology(args.topology, args.num_slices)
    if not topo_lib.libtpu_available():
        raise CommandError(topo_lib.INSTALL_HINT)
    import jax

    # This process only compiles: keep JAX's own backend on the CPU rather than letting it
    # probe for a TPU that is not there.
    jax.config.update("jax_platforms", "cpu")
    from llava_jax.planning import estimate, report, search
    from llava_jax.train import config_loader

    config = config_loader.load_config(args.config, list(args.overrides))
    devices = topo_lib.compile_devices(topology)
    chip = topology.chip
    start = time.perf_counter()

    def progress(message: str) -> None:  # on stderr, so that --json output stays clean
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)

    kwargs = dict(
        topology_name=topology.name,
        chip=chip,
        estimate_cost=not args.memory_only,
        progress=progress,
    )
    title = f"llava-jax plan: {args.config} on {topology.describe()}"
    if args.search:

        def tried(p, changes):
            what = ", ".join(f"{k}={v}" for k, v in changes.items()) or "as configured"
            progress(f"{what}: {report.fit_text(p)}, step {report.seconds_text(p.step_seconds)}")

        results = search.search(config, devices, plan_kwargs=kwargs, on_plan=tried)
        plans = [p for p, _ in results]
        if args.json:
            ordered = sorted(results, key=lambda pc: report.sort_key(pc[0]))
            print(
                json.dumps(
                    [
                        {**estimate.plan_to_dict(p, chip), "changes": changes}
                        for p, changes in ordered
                    ],
                    indent=2,
                )
            )
        else:
            print(report.format_search(plans, chip, title))
        return 0 if any(p.fits for p in plans) else 1
    try:
        p = estimate.plan(config, devices, **kwargs)
    except estimate.PlanError as e:
        raise CommandError(str(e)) from None
    if args.json:
        print(json.dumps(estimate.plan_to_dict(p, chip), indent=2))
    else:
        print(report.format_plan(p, chip, title))
        if not p.fits:
            print(
                "To fit: a larger fsdp axis (--config.mesh.fsdp=-1), "
                "--config.train.remat_policy=full, more micro-batches "
                "(--config.optimizer.grad_accum=2), or try --search."
            )
    return 0 if p.fits else 1
