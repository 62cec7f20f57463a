"""`llava-jax train`: run (or resume) a recipe in a workdir, on every host of a slice."""

from __future__ import annotations

import argparse
import os

from llava_jax.cli.noise import on_cloud_tpu
from llava_jax.paths import absolute


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train with a recipe config (resumes from the workdir's latest checkpoint)",
        description="Train with a recipe from configs/. Run the same command on every host; "
        "restarting it resumes from the newest finished checkpoint in the workdir. Override "
        "any config field with --config.FIELD=VALUE (e.g. --config.optimizer.lr=1e-5).",
    )
    parser.add_argument(
        "--config",
        required=True,
        metavar="RECIPE[:ARG]",
        help="a recipe file, e.g. configs/llava15_7b_finetune.py or configs/x.py:13b",
    )
    parser.add_argument(
        "--workdir",
        required=True,
        type=absolute,
        help="checkpoints, logs and the model (a local path or gs://)",
    )
    parser.add_argument(
        "--init-from",
        metavar="DIR",
        help="load weights from a llava-jax model dir or an HF dir for a new run "
        "(sets config.init_from)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="trace STEPS steps on process 0 (after compilation) into WORKDIR/profile",
    )
    parser.add_argument(
        "--profile-server",
        type=int,
        metavar="PORT",
        help="start jax.profiler's server on every process, for traces captured on demand "
        "(TensorBoard's profile plugin or xprof, at HOST:PORT)",
    )
    group = parser.add_argument_group(
        "multi-process (GPU clusters, local tests; TPU pods are detected automatically)"
    )
    group.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    group.add_argument("--num-processes", type=int)
    group.add_argument("--process-id", type=int)
    parser.set_defaults(run=run, overrides=[])


def initialize_distributed(args: argparse.Namespace) -> None:
    """jax.distributed before anything touches a JAX backend (it raises "must be called
    before any JAX calls that might initialise the XLA backend")."""
    import jax

    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise ValueError("--coordinator needs --num-processes and --process-id")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif on_cloud_tpu() or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        # JAX finds its peers itself (the TPU VM metadata server); one host is fine too.
        jax.distributed.initialize()


def run(args: argparse.Namespace) -> int:
    initialize_distributed(args)
    from llava_jax.train import config_loader, loop

    overrides = list(args.overrides)
    if args.init_from:
        overrides.append(f"--config.init_from={args.init_from}")
    config = config_loader.load_config(args.config, overrides)
    runner = _builtin_runner(config)
    if runner is not None:
        return runner(args.config, overrides, args.workdir)
    if args.profile_server is not None:
        import jax

        jax.profiler.start_server(args.profile_server)
    result = loop.train(config, args.workdir, profile_steps=args.profile)
    return 0 if result.preempted or result.model_dir else 1


def _builtin_runner(config):
    """A built-in end-to-end run (`configs/shapes_tiny.py`), or None for a plain recipe."""
    name = config.get("builtin", "")
    if not name:
        return None
    if name == "shapes":
        from llava_jax.train.shapes_run import run_shapes

        return run_shapes
    raise ValueError(f"config.builtin={name!r}: unknown built-in run (known: shapes)")
