"""The training run: data, state, the jitted step, checkpoints, metrics, preemption.

`train(config, workdir)` is what `llava-jax train` calls on every host. Restarting the same
command resumes from the newest finished checkpoint in `workdir/checkpoints` (params,
optimizer state, step and the data iterator's position), so a killed run loses at most the
steps since its last save, and a resumed run sees exactly the batches the uninterrupted one
would have. SIGTERM (a TPU preemption) saves at a step every host agrees on, then returns.

Layout of a workdir:
  checkpoints/<step>/   resumable state (see checkpoints.py)
  model/                the final weights as a llava-jax model dir (generate, next stage)
  tensorboard/          scalars; metrics.jsonl the same as JSON lines
  config.json           the config of the latest start
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import platform
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from etils import epath

from llava_jax import hardware, model_io, paths
from llava_jax.config import LlavaConfig
from llava_jax.conversion import source
from llava_jax.data import loader, sources, templates
from llava_jax.data.prompt import load_tokenizer
from llava_jax.data.schema import BATCH_FIELDS
from llava_jax.media.processor_config import ImageProcessorConfig
from llava_jax.sharding import shard_batch
from llava_jax.train import config_loader, resume
from llava_jax.train import state as state_lib
from llava_jax.train import step as step_lib
from llava_jax.train.checkpoints import Checkpointer
from llava_jax.train.monitor import Monitor
from llava_jax.train.setup import TrainSetup

log = logging.getLogger("llava_jax.train")

# Files of an HF checkpoint that a model dir keeps in assets/ (tokenizer, processor).
HF_ASSET_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)
# Fields that must not change between a checkpoint and a resumed run: the data order and
# the meaning of a step depend on them (MaxText's Grain guide,
# `docs/guides/data_input_pipeline/data_input_grain.md`: a changed batch size skips or
# duplicates data).
RESUME_KEYS = (
    "data.train",
    "data.seed",
    "data.packing",
    "data.group_by_length",
    "data.max_len",
    "data.num_workers",
    "train.batch_size",
)


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite steps, a changed config on resume)."""


@dataclasses.dataclass
class RunResult:
    step: int  # the last step finished
    total_steps: int
    preempted: bool
    model_dir: epath.Path | None  # the exported model (None when preempted)
    last_metrics: dict[str, float]


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


class _Preemption:
    """SIGTERM on a single process sets a flag; on several, JAX's sync point decides.

    With jax.distributed initialised, JAX's preemption notifier owns SIGTERM and
    `reached_preemption_sync_point` makes every host stop at the same step; a Python handler
    there would replace JAX's.
    """

    def __init__(self, ckpt: Checkpointer):
        self._ckpt = ckpt
        self._flag = False
        self._previous = None
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self._flag = True

    def reached(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._flag
        return self._ckpt.reached_preemption(step)

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def model_assets(init_from: str) -> Path:
    """The tokenizer and processor files of `init_from`, as a local directory."""
    return source.assets(init_from)


# The software a run's numbers depend on, recorded in <workdir>/config.json: hosts set up at
# different times must run the compiler (jaxlib, libtpu) the run was planned with.
VERSIONED = ("llava-jax", "jax", "jaxlib", "libtpu", "flax", "optax", "orbax-checkpoint", "grain")


def software_versions() -> dict[str, str | None]:
    """package -> installed version (None: not installed, e.g. libtpu off TPU)."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _check_resume(meta: dict, config) -> None:
    # Grain saves its iterator state per process (`process_{i}-of-{n}.json`): another process
    # count cannot restore it, and would read other records.
    saved_processes = meta.get("process_count", jax.process_count())
    if saved_processes != jax.process_count():
        raise TrainingError(
            f"the checkpoint was written by {saved_processes} processes, this run has "
            f"{jax.process_count()}: the data iterator state is per process; resume with "
            f"{saved_processes} processes, or use a new --workdir"
        )
    saved = meta.get("resume_keys", {})
    changed = [
        f"{k}: {saved[k]!r} -> {_get(config, k)!r}"
        for k in RESUME_KEYS
        if k in saved and saved[k] != _get(config, k)
    ]
    if changed:
        raise TrainingError(
            "the config changed since the checkpoint in a way that changes the data order "
            f"({'; '.join(changed)}); use a new --workdir, or restore these values"
        )


def export_model_dir(
    out: epath.Path, cfg: LlavaConfig, params: dict, assets_from: Path, template: str
) -> epath.Path:
    """Writes the final weights as a llava-jax model dir (all processes call it).

    Orbax writes `params/` atomically and collectively; process 0 then copies the assets and
    writes `llava_config.json` last, so a directory without it is never mistaken for a model.
    """
    import orbax.checkpoint as ocp

    if out.exists() and model_io.is_model_dir(out):
        raise model_io.CheckpointError(f"{out}: a model is already exported here")
    with ocp.StandardCheckpointer() as ckptr:
        params_dir = out / model_io.PARAMS_DIR
        ckptr.save(epath.Path(paths.absolute(params_dir)), params, force=True)
    if jax.process_index() == 0:
        assets = out / model_io.ASSETS_DIR
        assets.mkdir(parents=True, exist_ok=True)
        for name in HF_ASSET_FILES:
            if (assets_from / name).is_file():
                (assets / name).write_bytes((assets_from / name).read_bytes())
        (assets / templates.TRAINED_TEMPLATE_FILE).write_text(
            json.dumps({"template": template}) + "\n"
        )
        (out / model_io.CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return out


def _mean_metrics(steps: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Averages per-step metrics; loss and accuracy weighted by supervised tokens."""
    tokens = np.array([float(m["num_tokens"]) for m in steps])
    weights = tokens / tokens.sum() if tokens.sum() > 0 else np.full(len(steps), 1 / len(steps))
    out = {}
    for key in steps[-1]:
        values = np.array([float(m[key]) for m in steps])
        if key in ("loss", "accuracy"):
            finite = np.isfinite(values)
            out[key] = float((values * weights)[finite].sum() / max(weights[finite].sum(), 1e-12))
        elif key in ("num_tokens", "nonfinite"):
            out[key] = float(values.sum())
        else:
            out[key] = float(values[-1])
    return out


class StepTrace:
    """`--profile STEPS`: a jax.profiler trace of STEPS steps after compilation, on process 0.

    One host's trace shows the step: every host runs the same program. The device finishes
    the steps before the window before the trace starts, and the window's steps before it
    stops (dispatch is asynchronous), so the trace holds those steps and no others.
    """

    def __init__(self, logdir: epath.Path, steps: int, first_step: int, *, enabled: bool):
        self._logdir = logdir
        self._start = first_step + 2 if steps and enabled else None  # step 1 compiles
        self._stop = None if self._start is None else self._start + steps
        self.active = False

    def before_step(self, step: int, state) -> None:
        if step == self._start:
            jax.block_until_ready(state)
            jax.profiler.start_trace(str(self._logdir))
            self.active = True

    def after_step(self, done: int, state) -> bool:
        """Stops the trace once its last step is done; True when it did."""
        if not self.active or done < self._stop:
            return False
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.active = False
        return True

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def train(config, workdir: str | Path, *, profile_steps: int = 0, stream=None) -> RunResult:
    """Runs (or resumes) the training run of `config` in `workdir` (local or gs://)."""
    workdir = epath.Path(workdir)
    is_main = jax.process_index() == 0
    if not config.init_from:
        raise config_loader.ConfigLoadError(
            "config.init_from is empty: training starts from a model dir (`llava-jax init`, "
            "a previous stage's <workdir>/model) or an HF checkpoint"
        )
    if not config.data.train:
        raise config_loader.ConfigLoadError("config.data.train is empty: no training data")
    workdir.mkdir(parents=True, exist_ok=True)
    model_cfg = config_loader.model_config(config)
    assets = model_assets(config.init_from)
    tokenizer = load_tokenizer(assets)
    image_cfg = ImageProcessorConfig.from_pretrained(assets, model_cfg)
    if config.data.image_aspect_ratio:
        if image_cfg.aspect_ratio not in ("crop", "pad"):
            raise config_loader.ConfigLoadError(
                f"config.data.image_aspect_ratio={config.data.image_aspect_ratio!r} applies to "
                f"single-view models; this model's images are {image_cfg.aspect_ratio!r}"
            )
        image_cfg = dataclasses.replace(image_cfg, aspect_ratio=config.data.image_aspect_ratio)
    template = templates.get_template(config.data.template)

    source = sources.open_source(
        config.data.train,
        config.data.image_root or None,
        tfds_fields=dict(config.data.tfds_fields) or None,
        seed=config.data.seed,
    )
    total = config_loader.total_steps(config, len(source))
    setup = TrainSetup.build(config, total, model_cfg=model_cfg)
    mesh = setup.mesh
    shape = setup.process_batch_shape(jax.process_count())
    from llava_jax.data.transforms import SampleTransform

    transform = SampleTransform(
        model_cfg,
        image_cfg,
        tokenizer,
        template,
        max_len=config.data.max_len,
        max_views=config.data.max_views,
        masking=config.data.masking,
        video_frames=config.data.video_frames,
    )
    batches = loader.make_loader(
        source,
        transform,
        shape,
        model_cfg,
        seed=config.data.seed,
        num_epochs=None,  # the step count ends the run; epochs set it (total_steps)
        packing=config.data.packing,
        group_by_length=config.data.group_by_length,
        num_workers=config.data.num_workers,
    )
    budget = loader.SkipBudget(config.data.max_skip_fraction)

    ckpt = Checkpointer(
        workdir / "checkpoints",
        save_every=config.train.checkpoint_every,
        keep_last=config.train.keep_last,
        keep_every=config.train.keep_every,
    )
    latest = ckpt.latest_step()
    if is_main:
        record = {**json.loads(config.to_json_best_effort()), "versions": software_versions()}
        (workdir / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    if latest is not None:
        _check_resume(ckpt.read_meta(latest), config)
        try:
            state, saved = resume.restore(ckpt, latest, setup, batches)
        except (resume.BaseMismatchError, resume.OldCheckpointError) as e:
            raise TrainingError(str(e)) from None
        budget.skipped.update(saved.get("skipped", {}))
        budget.samples = int(saved.get("samples", 0))
        log.info("resuming from step %d (%s)", latest, ckpt.directory / str(latest))
        resumed_from = latest
    else:
        resumed_from = None
        params = resume.base_params(setup)
        state = state_lib.init_state(setup, params=params)
        del params
    # LoRA: checkpoints leave the frozen base out and record its fingerprint instead.
    frozen = None
    if not resume.saves_frozen(config):
        frozen = resume.frozen_fingerprint(setup, state)

    def saved_part(state):
        return state if frozen is None else resume.to_save(setup, state)

    start = int(jax.device_get(state.step))
    train_step = step_lib.make_train_step(setup)
    chip = hardware.chip_of(jax.devices()[0])
    monitor = Monitor(
        workdir,
        total,
        enabled=is_main,
        stream=stream,
        flops_per_step=setup.flops_per_step,  # the padded count, as MaxText reports it
        peak_flops=chip.peak_bf16_flops * jax.device_count() if chip else None,
    )

    def meta() -> dict[str, Any]:
        return {
            "resume_keys": {k: _get(config, k) for k in RESUME_KEYS},
            "process_count": jax.process_count(),
            "skipped": dict(budget.skipped),
            "samples": budget.samples,
            "time": time.time(),
            resume.FORMAT_KEY: resume.FORMAT,
            **({resume.FROZEN_KEY: frozen} if frozen is not None else {}),
        }

    preemption = _Preemption(ckpt)
    pending: list[dict] = []
    tokens = samples = 0.0
    nonfinite_run = 0
    last: dict[str, float] = {}
    preempted = False
    trace = StepTrace(workdir / "profile", profile_steps, start, enabled=is_main)
    if resumed_from is not None:
        monitor.message(f"resuming from step {resumed_from} of {total}")
    began = time.perf_counter()
    step = start
    try:
        for step in range(start, total):
            trace.before_step(step, state)
            host = next(batches)
            budget.update(host["skipped"], host["num_samples"])
            tokens += float(np.count_nonzero(host["segment_ids"])) * jax.process_count()
            samples += host["num_samples"] * jax.process_count()
            state, metrics = train_step(state, shard_batch(host, mesh, BATCH_FIELDS))
            pending.append(metrics)
            done = step + 1
            if trace.after_step(done, state):
                monitor.message(f"profile of {profile_steps} steps in {workdir / 'profile'}")
            if done % config.train.log_every == 0 or done == total or done == start + 1:
                fetched = jax.device_get(pending)
                pending.clear()
                for m in fetched:
                    nonfinite_run = nonfinite_run + 1 if m["nonfinite"] else 0
                    if nonfinite_run >= config.train.max_nonfinite:
                        raise TrainingError(
                            f"{nonfinite_run} steps in a row had a non-finite loss or gradient "
                            f"(last at step {done}); lower the learning rate or check the data"
                        )
                report = {f"train/{k}": v for k, v in _mean_metrics(fetched).items()}
                report.update({f"skipped/{k}": v for k, v in budget.skipped.items()})
                if done == start + 1:  # compilation + one step: no rates from it
                    report["compile_s"] = time.perf_counter() - began
                    last = monitor.report(done, report, 0, 0)
                    monitor.start(done)
                else:
                    last = monitor.report(done, report, tokens, samples)
                tokens = samples = 0.0
            ckpt.save(done, saved_part(state), batches, meta())
            if preemption.reached(done):
                ckpt.save(done, saved_part(state), batches, meta(), force=True)
                ckpt.wait()
                preempted = True
                monitor.message(f"preempted: saved step {done}; run the same command to resume")
                break
        else:
            ckpt.save(total, saved_part(state), batches, meta(), force=True)
            ckpt.wait()
    finally:
        trace.close()
        preemption.close()
        ckpt.close()
        monitor.close()
        with contextlib.suppress(Exception):
            batches.close()
    model_dir = None
    if not preempted:
        model_dir = workdir / "model"
        if not model_io.is_model_dir(model_dir):
            params = state_lib.merged_params(setup, state.params)
            export_model_dir(model_dir, model_cfg, params, assets, config.data.template)
        monitor.message(f"done: {total} steps; model in {model_dir}")
    return RunResult(
        step=total if not preempted else step + 1,
        total_steps=total,
        preempted=preempted,
        model_dir=model_dir,
        last_metrics=last,
    )
