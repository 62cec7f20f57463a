"""`llava-jax export`: a training checkpoint's weights as a plain llava-jax model dir.

A finished run already writes `<workdir>/model` (LoRA: merged); this takes any saved step,
e.g. to try a checkpoint mid-run. A LoRA run's adapters are folded into their kernels with
`--merge`; without it the trained parameters alone go to an adapter dir (megabytes, not the
whole model), which `generate` / `serve --model BASE --adapter DIR` apply unmerged.
"""

from __future__ import annotations

import argparse

from llava_jax.paths import absolute


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a training checkpoint as a model dir (or a LoRA run's adapters)",
        description="Restore the train state of a workdir's checkpoint (the newest, or "
        "--step) and write its weights as a llava-jax model dir; with LoRA (train.lora) the "
        "adapters are merged into their kernels (--merge), or written alone as an adapter dir "
        "for `generate --adapter` (without --merge). Pass the run's --config and "
        "overrides; `llava-jax convert jax-to-hf` turns the result into an HF directory.",
    )
    parser.add_argument("--config", required=True, metavar="RECIPE[:ARG]", help="the run's recipe")
    parser.add_argument("--workdir", required=True, type=absolute, help="the run's workdir")
    parser.add_argument("--out", required=True, type=absolute, help="the model dir to create")
    parser.add_argument(
        "--init-from",
        type=absolute,
        metavar="DIR",
        help="the run's --init-from (its tokenizer and processor; a LoRA run's frozen base)",
    )
    parser.add_argument("--step", type=int, help="the checkpoint step (default: the newest)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="merge LoRA adapters into the base weights (without it: an adapter dir)",
    )
    parser.set_defaults(run=run, overrides=[])


def run(args: argparse.Namespace) -> int:
    from etils import epath

    from llava_jax import model_io, param_paths
    from llava_jax.cli import CommandError
    from llava_jax.models import lora
    from llava_jax.train import config_loader, loop, resume
    from llava_jax.train import state as state_lib
    from llava_jax.train.checkpoints import Checkpointer
    from llava_jax.train.setup import TrainSetup

    overrides = list(args.overrides)
    if args.init_from:
        overrides.append(f"--config.init_from={args.init_from}")
    config = config_loader.load_config(args.config, overrides)
    spec = lora.spec_from_config(config)
    workdir = epath.Path(args.workdir)
    if not (workdir / "checkpoints").is_dir():
        raise CommandError(f"{workdir / 'checkpoints'}: no such directory (not a workdir?)")
    model_cfg = config_loader.model_config(config)
    # The state's shapes do not depend on the schedule's length.
    setup = TrainSetup.build(config, total_steps=1, model_cfg=model_cfg)
    ckpt = Checkpointer(workdir / "checkpoints", save_every=1)
    try:
        steps = ckpt.all_steps()
        step = args.step if args.step is not None else max(steps, default=None)
        if step is None or step not in steps:
            saved = f"saved: {sorted(steps)}" if steps else "no finished checkpoint"
            raise CommandError(f"{workdir / 'checkpoints'}: no step {step}; {saved}")
        # A LoRA checkpoint's frozen base is re-created from init_from.
        state, _ = resume.restore(ckpt, step, setup)
    except (resume.BaseMismatchError, resume.OldCheckpointError) as e:
        raise CommandError(str(e)) from None
    finally:
        ckpt.close()
    out = epath.Path(args.out)
    if spec is not None and not args.merge:
        params = resume.to_save(setup, state).params
        model_io.save_adapter_dir(out, spec, param_paths.nested_to_flat(params))
        print(f"step {step} of {workdir} -> {out} (LoRA adapters, unmerged)")
        return 0
    params = state_lib.merged_params(setup, state.params)
    assets = loop.model_assets(config.init_from)
    loop.export_model_dir(out, model_cfg, params, assets, config.data.template)
    print(f"step {step} of {workdir} -> {out}")
    return 0
