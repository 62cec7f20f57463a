"""GPU smoke test: parity with transformers, a short tiny training, a 0.5B throughput probe.

    python -m llava_jax.checks.gpu_smoke [--steps 300] [--out smoke.json]

(also `tpu_scripts/gpu_smoke.sh`). On a machine where JAX sees no GPU it prints why and
exits 0 without running anything. Three checks, each printed as it finishes:

1. parity: the selfcheck's tiny random transformers models (torch on the CPU) against their
   conversions run by JAX on the GPU, for all three families: max |logit diff| <= 1e-4.
2. training: the shapes stage-1 recipe for `--steps` steps on the GPU: the loss must fall.
3. throughput: one OneVision-0.5B-sized train step (SigLIP so400m + Qwen2-0.5B, every part
   training, bf16 compute, float32 master weights and AdamW state) on a random batch:
   step time, tokens/s and MFU against the chip's peak (hardware.py), with the fused paths
   `auto` picks on a GPU (`--attention`: cuDNN flash attention; `--loss`: the blockwise
   vocabulary projection + cross-entropy) or the XLA ones (`--attention xla --loss chunked`).
   `benchmarks/device_check.sh` runs both side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _gpu_devices():
    import jax

    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


def check_parity(workdir: Path) -> dict:
    from llava_jax.checks.selfcheck import FAMILIES, check_family

    out = {}
    for family in FAMILIES:
        r = check_family(family, workdir / family)
        out[family] = {"max_logit_diff": r.max_logit_diff, "passed": r.passed}
        print(f"parity {family}: max |logit diff| {r.max_logit_diff:.2e} "
              f"{'PASS' if r.passed else 'FAIL'}", flush=True)  # fmt: skip
    return out


def check_training(workdir: Path, steps: int) -> dict:
    from llava_jax.train import config_loader, loop, shapes
    from llava_jax.train.shapes_run import _random_model_dir

    recipe = str(Path(__file__).parents[1] / "configs" / "shapes_tiny.py") + ":stage1"
    paths = shapes.write_shapes_dataset(
        workdir / "data", num_stage1=2000, num_stage2=8, num_val=8, seed=0
    )
    overrides = [
        f"--config.train.num_steps={steps}",
        "--config.train.log_every=50",
        f"--config.train.checkpoint_every={steps}",
        f"--config.data.train={paths.stage1}",
        f"--config.data.image_root={paths.root}",
    ]
    config = config_loader.load_config(recipe, overrides)
    init = _random_model_dir(workdir / "init", config, paths.tokenizer)
    config = config_loader.load_config(recipe, [*overrides, f"--config.init_from={init}"])
    start = time.perf_counter()
    result = loop.train(config, workdir / "run")
    seconds = time.perf_counter() - start
    metrics = (workdir / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in metrics]
    first, last = rows[0]["train/loss"], rows[-1]["train/loss"]
    passed = bool(last < 0.5 * first) and not result.preempted
    print(f"training: {steps} steps in {seconds:.1f}s (compile included), loss {first:.3f} -> "
          f"{last:.3f} {'PASS' if passed else 'FAIL'}", flush=True)  # fmt: skip
    return {"steps": steps, "seconds": seconds, "first_loss": first, "last_loss": last,
            "passed": passed}  # fmt: skip


def _random_batch(cfg, batch: int, seq_len: int, rng: np.random.Generator) -> dict:
    from llava_jax.data import batching
    from llava_jax.data.schema import Example
    from llava_jax.media.feature_plan import Media, num_tokens, num_views

    media = (Media.image(cfg.vision.image_size, cfg.vision.image_size),)  # one square image
    n_img, n_views = num_tokens(cfg, media[0]), num_views(cfg, media[0])
    examples = []
    for i in range(batch):
        ids = rng.integers(0, min(cfg.image_token_id, cfg.text.vocab_size), seq_len).astype(
            np.int32
        )
        ids[1 : 1 + n_img] = cfg.image_token_id
        trained = np.zeros(seq_len, bool)
        trained[1 + n_img :] = True
        views = rng.standard_normal((n_views, cfg.vision.image_size, cfg.vision.image_size, 3))
        examples.append(Example.build(cfg, f"r{i}", ids, trained, views.astype(np.float32), media))
    shape = batching.BatchShape.for_model(cfg, batch, seq_len, n_views, n_img)
    return batching.pad_batch(examples, shape, cfg)


def probe_throughput(
    batch: int,
    seq_len: int,
    repeats: int = 5,
    overrides: tuple[str, ...] = (),
    remat: str = "dots_with_no_batch_dims",
    attention: str = "auto",
    loss: str = "auto",
) -> dict:
    """Times the train step of OneVision-0.5B (`overrides` shrink it for CPU tests), with
    the `train.attention` kernel (auto: cuDNN flash attention on a GPU) and the
    `train.loss_impl` loss (auto: blockwise on a GPU); both as resolved are in the result."""
    import jax

    from llava_jax import hardware
    from llava_jax.data.schema import BATCH_FIELDS
    from llava_jax.nn.attention_kernels import resolve
    from llava_jax.nn.cross_entropy import resolve_loss
    from llava_jax.sharding import shard_batch
    from llava_jax.train import config_loader, flops, state, step
    from llava_jax.train.defaults import base_config
    from llava_jax.train.setup import TrainSetup

    config = base_config()
    config.model.preset = "llava-onevision-qwen2-0.5b"
    config.train.remat_policy = config.train.vision_remat_policy = remat
    config.train.trainable = (".*",)
    config.optimizer.vision_lr = 2e-6
    config.train.batch_size = batch
    config.data.max_len = seq_len
    config.train.attention = attention
    config.train.loss_impl = loss
    config.mesh.data, config.mesh.fsdp = 1, -1
    for override in overrides:
        config_loader.apply_override(config, override)
    setup = TrainSetup.build(config, total_steps=100)
    cfg, mesh = setup.model_cfg, setup.mesh
    attention = resolve(config.train.attention, mesh, cfg.run.dtype).value
    loss = resolve_loss(config.train.loss_impl, mesh).value
    train_state = state.init_state(setup)
    train_step = step.make_train_step(setup)
    host = _random_batch(cfg, batch, seq_len, np.random.default_rng(0))
    batch_arrays = shard_batch(host, mesh, BATCH_FIELDS)
    start = time.perf_counter()
    train_state, metrics = train_step(train_state, batch_arrays)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        train_state, metrics = train_step(train_state, batch_arrays)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / repeats
    views = host["pixel_values"].shape[1] * batch  # the probe's views, not data.max_views
    model_flops = flops.train_flops_per_step(cfg, setup.labels, seq_lens=[seq_len] * batch,
                                             num_views=views)  # fmt: skip
    chip = hardware.chip_of(jax.devices()[0])
    mfu = hardware.mfu(model_flops, step_s, jax.device_count(), chip)
    out = {"device": jax.devices()[0].device_kind, "batch": batch, "seq_len": seq_len,
           "remat": remat, "attention": attention, "loss_impl": loss,
           "compile_and_first_step_s": compile_s, "step_s": step_s,
           "tokens_per_s": batch * seq_len / step_s, "model_tflops_per_step": model_flops / 1e12,
           "mfu": mfu, "loss": float(metrics["loss"])}  # fmt: skip
    shown = "n/a (unknown chip)" if mfu is None else f"{100 * mfu:.1f}%"
    print(f"throughput (OneVision-0.5B, bf16, B={batch}, T={seq_len}, remat {remat}, "
          f"attention {attention}, loss {loss}): "
          f"{step_s * 1e3:.0f} "
          f"ms/step, {out['tokens_per_s']:,.0f} tok/s, MFU {shown}", flush=True)  # fmt: skip
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava_jax.checks.gpu_smoke",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=300, help="tiny training steps")
    parser.add_argument("--batch", type=int, default=8, help="throughput probe batch")
    parser.add_argument("--seq-len", type=int, default=2048, help="throughput probe tokens/row")
    parser.add_argument("--remat", default="dots_with_no_batch_dims",
                        help="throughput probe remat policy (none, dots, full, ...)")  # fmt: skip
    parser.add_argument("--attention", default="auto", choices=("auto", "xla", "cudnn"),
                        help="throughput probe attention kernel (auto: cudnn)")  # fmt: skip
    parser.add_argument("--loss", default="auto", choices=("auto", "chunked", "blockwise"),
                        help="throughput probe loss (auto: blockwise)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--skip", nargs="*", default=(), choices=("parity", "training", "throughput")
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    gpus = _gpu_devices()
    if not gpus:
        print("gpu_smoke: skipped: JAX sees no GPU (install jax[cuda12] or jax[cuda13] on a "
              "machine with an NVIDIA GPU)")  # fmt: skip
        return 0
    print(f"gpu_smoke on {gpus[0].device_kind} (x{len(gpus)})", flush=True)
    results: dict = {"device": gpus[0].device_kind}
    with tempfile.TemporaryDirectory(prefix="llava-jax-smoke-") as tmp:
        if "parity" not in args.skip:
            results["parity"] = check_parity(Path(tmp) / "parity")
        if "training" not in args.skip:
            results["training"] = check_training(Path(tmp) / "train", args.steps)
        if "throughput" not in args.skip:
            results["throughput"] = probe_throughput(
                args.batch, args.seq_len, remat=args.remat, attention=args.attention,
                loss=args.loss,
            )  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    failed = [k for k in ("parity", "training") if k in results and not _passed(results[k])]
    print("gpu_smoke: " + (f"FAILED: {', '.join(failed)}" if failed else "PASS"))
    return 1 if failed else 0


def _passed(result: dict) -> bool:
    if "passed" in result:
        return bool(result["passed"])
    return all(v["passed"] for v in result.values())


if __name__ == "__main__":
    sys.exit(main())
