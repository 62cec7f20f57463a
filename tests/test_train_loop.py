"""The training loop as a user runs it: `llava-jax train` processes that get preempted,
killed and restarted, against one uninterrupted run in this process.

The model is the tiny shapes one, so every run is mostly start-up and compilation.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath
from fake_gcs import fake_gcs  # noqa: F401 (a fixture)

from llava_jax import model_io, param_paths
from llava_jax.train import config_loader, loop, shapes
from llava_jax.train.shapes_run import _random_model_dir

RECIPE = str(Path(__file__).parents[1] / "configs" / "shapes_tiny.py") + ":stage1"
STEPS = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    paths = shapes.write_shapes_dataset(
        root / "data", num_stage1=48, num_stage2=8, num_val=4, seed=1
    )
    overrides = [
        f"--config.train.num_steps={STEPS}",
        "--config.train.batch_size=8",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=2",
        "--config.train.keep_last=10",
        f"--config.data.train={paths.stage1}",
        f"--config.data.image_root={paths.root}",
    ]
    config = config_loader.load_config(RECIPE, overrides)
    init = _random_model_dir(root / "init", config, paths.tokenizer)
    overrides.append(f"--config.init_from={init}")
    return overrides


def _losses(workdir: Path) -> dict[int, float]:
    """Step -> loss over every start's metrics file, a later start's value winning."""
    files = sorted(workdir.glob("metrics*.jsonl"), key=lambda p: (len(p.name), p.name))
    out = {}
    for f in files:
        for line in f.read_text().splitlines():
            row = json.loads(line)
            out[row["step"]] = row["train/loss"]
    return out


def _start(workdir: Path, overrides) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "llava_jax.cli.main", "train", "--config", RECIPE,
           "--workdir", str(workdir), *overrides]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 240):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}:\n{proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _finished_steps(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_preempted_killed_and_restarted_run_matches_uninterrupted(setup, tmp_path):
    reference = tmp_path / "reference"
    config = config_loader.load_config(RECIPE, setup)
    result = loop.train(config, reference)
    assert not result.preempted and model_io.is_model_dir(result.model_dir)
    expected = _losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert expected[STEPS] < expected[1]  # it learns

    run = tmp_path / "run"
    # 1. SIGTERM (a TPU preemption) once a few steps are logged: it saves and exits cleanly.
    proc = _start(run, setup)
    _wait_for(lambda: len(_losses(run)) >= 3, proc, "step 3")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "preempted: saved step" in out
    saved = _finished_steps(run)[-1]
    assert 3 <= saved < STEPS and not (run / "model").exists()

    # 2. Restart; SIGKILL once a later checkpoint is finished (no chance to save anything).
    proc = _start(run, setup)
    _wait_for(lambda: any(s > saved + 1 for s in _finished_steps(run)), proc, "a new checkpoint")
    proc.kill()
    proc.wait()
    # What a kill during a save leaves behind: an unfinished temporary step directory.
    partial = run / "checkpoints" / f"{STEPS}.orbax-checkpoint-tmp-1700000000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "partial.bin").write_bytes(b"\0" * 64)

    # 3. Restart again: it resumes from the newest finished step and completes.
    proc = _start(run, setup)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "resuming from step" in out
    assert model_io.is_model_dir(run / "model")
    got = _losses(run)
    assert sorted(got) == sorted(expected)
    mismatched = {
        s: (got[s], expected[s])
        for s in expected
        if not np.isclose(got[s], expected[s], rtol=1e-6, atol=0)
    }
    assert not mismatched, f"losses differ from the uninterrupted run at steps {mismatched}"


def test_changed_data_order_settings_refuse_to_resume(setup, tmp_path):
    config = config_loader.load_config(RECIPE, [*setup, "--config.train.num_steps=2"])
    loop.train(config, tmp_path)
    changed = config_loader.load_config(
        RECIPE, [*setup, "--config.train.num_steps=4", "--config.data.seed=7"]
    )
    with pytest.raises(loop.TrainingError, match=r"data\.seed: 0 -> 7"):
        loop.train(changed, tmp_path)

    # The run records the software it ran with, for hosts set up later to match.
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["versions"]["jax"] == jax.__version__ and "libtpu" in record["versions"]
    # Resuming on another number of processes (hosts) stops before Grain's restore fails.
    meta = tmp_path / "checkpoints" / "2" / "meta" / "metadata"  # orbax's JsonCheckpointHandler
    saved = json.loads(meta.read_text())
    assert saved["process_count"] == 1
    meta.write_text(json.dumps({**saved, "process_count": 2}))
    more = config_loader.load_config(RECIPE, [*setup, "--config.train.num_steps=4"])
    with pytest.raises(loop.TrainingError, match=r"written by 2 processes, this run has 1"):
        loop.train(more, tmp_path)


def test_exported_model_answers_with_its_training_template(setup, tmp_path):
    from llava_jax.inference.pipeline import Pipeline

    config = config_loader.load_config(RECIPE, [*setup, "--config.train.num_steps=1"])
    result = loop.train(config, tmp_path)
    pipe = Pipeline.load(result.model_dir, echo=lambda _: None)
    assert pipe.template.name == "plain"
    assert pipe.cfg == config_loader.model_config(config)
    n = jax.device_count()
    assert n == 8  # conftest's host devices: the mesh above was data=8
    assert os.path.isdir(tmp_path / "tensorboard")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(setup, tmp_path):
    """`llava-jax train` on 2 processes x 4 CPU devices (jax.distributed on localhost) gives
    the losses of one process with 8 devices: each host reads only its half of every batch."""
    overrides = [*setup, "--config.train.num_steps=3"]
    single = tmp_path / "single"
    loop.train(config_loader.load_config(RECIPE, overrides), single)

    multi = tmp_path / "multi"
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llava_jax.cli.main",
                "train",
                "--config",
                RECIPE,
                "--workdir",
                str(multi),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
                *overrides,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    want, got = _losses(single), _losses(multi)
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step in want:
        assert np.isclose(got[step], want[step], rtol=1e-5), (step, got[step], want[step])
    assert model_io.is_model_dir(multi / "model")


def test_a_run_on_a_bucket(setup, tmp_path, fake_gcs, monkeypatch):  # noqa: F811
    """The pod walkthrough (docs/tpu.md) against the fake GCS, with nothing local under a
    gs:// name: the data (the shapes JSON and images), the starting model and the workdir are
    in the bucket; checkpoints (orbax through TensorStore), metrics and the final model land
    there, and a restart resumes from there."""
    monkeypatch.chdir(tmp_path)
    local = config_loader.load_config(RECIPE, setup)
    uploads = {
        Path(local.data.train): "gs://bucket/data/train.json",
        Path(local.data.image_root): "gs://bucket/images",
        Path(local.init_from): "gs://bucket/models/init",
    }
    for source, target in uploads.items():
        files = [source] if source.is_file() else [p for p in source.rglob("*") if p.is_file()]
        for f in files:
            remote = epath.Path(target) / f.relative_to(source) if f != source else target
            epath.Path(remote).write_bytes(f.read_bytes())
    overrides = [
        *setup,
        "--config.data.train=gs://bucket/data/train.json",
        "--config.data.image_root=gs://bucket/images",
        "--config.init_from=gs://bucket/models/init",
    ]
    workdir = epath.Path("gs://bucket/runs/r1")
    first = config_loader.load_config(RECIPE, [*overrides, "--config.train.num_steps=2"])
    assert loop.train(first, workdir).model_dir is not None
    assert _finished_steps(workdir) == [2]
    more = config_loader.load_config(RECIPE, [*overrides, "--config.train.num_steps=3"])
    result = loop.train(more, workdir)  # resumes from the bucket's step 2
    losses = _losses(workdir)
    assert sorted(losses) == [1, 2, 3] and losses[3] < losses[1], losses
    second = (workdir / "metrics.1.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in second] == [3]  # it resumed, not restarted
    assert _finished_steps(workdir) == [2, 3]
    assert os.fspath(result.model_dir) == "gs://bucket/runs/r1/model"
    from llava_jax.inference.pipeline import Pipeline

    pipe = Pipeline.load(result.model_dir, echo=lambda _: None)  # generate / eval / serve
    assert pipe.template.name == "plain" and pipe.cfg == config_loader.model_config(more)
    record = json.loads((workdir / "config.json").read_text())
    assert record["data"]["train"] == "gs://bucket/data/train.json"
    assert not list(tmp_path.iterdir()), "a gs:// path was written to the local disk"


@pytest.mark.parametrize("enabled", [True, False])
def test_profile_traces_process_0_with_the_device_idle_at_both_ends(monkeypatch, enabled):
    """`--profile 2` on a run resumed at step 5: the trace covers steps 8 and 9 (6 compiles,
    7 runs warm), on process 0 only; the device finishes step 7 before the trace starts, and
    step 9 before it stops."""
    events = []
    monkeypatch.setattr(jax, "block_until_ready", lambda x: events.append(("block", x)))
    monkeypatch.setattr(jax.profiler, "start_trace", lambda d: events.append(("start", d)))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: events.append(("stop",)))
    trace = loop.StepTrace(epath.Path("/w/profile"), 2, 5, enabled=enabled)
    stopped = []
    for step in range(5, 10):
        trace.before_step(step, f"state {step}")
        events.append(("step", step + 1))
        stopped.append(trace.after_step(step + 1, f"state {step + 1}"))
    trace.close()
    if not enabled:  # another process
        assert [e for e in events if e[0] != "step"] == [] and not any(stopped)
        return
    assert events == [
        ("step", 6),
        ("step", 7),
        ("block", "state 7"),
        ("start", "/w/profile"),
        ("step", 8),
        ("step", 9),
        ("block", "state 9"),
        ("stop",),
        ("step", 10),
    ]
    assert stopped == [False, False, False, True, False]


def test_lora_run_exports_the_merged_model(setup, tmp_path):
    """A LoRA run's model dir is a plain model: adapters folded into the LLM's kernels,
    everything else as trained (the vision tower frozen: as initialised)."""
    overrides = [
        *setup,
        "--config.train.num_steps=2",
        "--config.train.trainable=multi_modal_projector/.*",
        "--config.optimizer.vision_lr=0",
        "--config.train.lora.rank=4",
        "--config.train.lora.alpha=8",
    ]
    config = config_loader.load_config(RECIPE, overrides)
    result = loop.train(config, tmp_path)
    cfg = config_loader.model_config(config)
    init = model_io.load_params(config.init_from, cfg)
    final = model_io.load_params(result.model_dir, cfg)
    assert set(final) == set(init)
    for path, value in final.items():
        changed = not np.array_equal(np.asarray(value), np.asarray(init[path]))
        adapted = path.startswith("language_model/layers/") and path.endswith("_proj/kernel")
        assert changed == (adapted or path.startswith("multi_modal_projector/")), path

    # `llava-jax export --merge` of the last checkpoint writes the same model.
    from llava_jax.cli.main import main

    argv = ["export", "--config", RECIPE, "--workdir", str(tmp_path), *overrides]
    assert main([*argv, "--merge", "--step", "7", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    assert main([*argv, "--merge", "--out", str(tmp_path / "exported")]) == 0
    exported = model_io.load_params(tmp_path / "exported", cfg)
    for path, value in final.items():
        assert np.array_equal(np.asarray(exported[path]), np.asarray(value)), path

    # Without --merge: the adapters alone, which `generate --adapter` applies to the base.
    assert main([*argv, "--out", str(tmp_path / "adapter")]) == 0
    spec, adapter = model_io.load_adapter_dir(tmp_path / "adapter")
    assert (spec.rank, spec.alpha) == (4, 8.0)
    labels = loop.state_lib.labels_for(cfg, config)
    assert set(adapter) == {p for p, label in labels.items() if label != "frozen"}
    answers = []
    merged = ["--model", str(tmp_path / "exported")]
    unmerged = ["--model", config.init_from, "--adapter", str(tmp_path / "adapter")]
    for model in (merged, unmerged):
        cmd = [sys.executable, "-m", "llava_jax.cli.main", "generate", *model, "--raw",
               "--prompt", "a red circle", "--max-new-tokens", "5", "--json"]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        answers.append(json.loads(out.stdout.splitlines()[-1])["token_ids"])
    assert answers[0] == answers[1]


def _stored_values(directory: Path) -> int:
    """Array values an orbax checkpoint holds, from its metadata (file bytes vary with
    orbax's metadata and chunk layout from machine to machine; the values do not)."""
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().metadata(directory).item_metadata.tree
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree) if hasattr(leaf, "shape"))


def test_lora_checkpoints_hold_the_adapters_and_resume_exactly(setup, tmp_path):
    """A LoRA checkpoint holds the trained parameters (adapters, projector) and their
    optimizer state, not the frozen base; a run resumed from it re-creates the base from
    init_from and goes on bit for bit as the uninterrupted run; another base is refused."""
    import shutil

    import orbax.checkpoint as ocp

    from llava_jax.train import resume
    from llava_jax.train.checkpoints import Checkpointer
    from llava_jax.train.setup import TrainSetup

    overrides = [
        *setup,
        "--config.train.trainable=multi_modal_projector/.*",
        "--config.optimizer.vision_lr=0",
        "--config.train.lora.rank=4",
        "--config.train.lora.alpha=8",
    ]
    config = config_loader.load_config(RECIPE, overrides)
    reference = tmp_path / "reference"
    loop.train(config, reference)
    expected = _losses(reference)

    cfg = config_loader.model_config(config)
    labels = loop.state_lib.labels_for(cfg, config)
    trained = {p for p, label in labels.items() if label != "frozen"}
    ckpts = reference / "checkpoints"
    state_dir = ckpts / "4" / "state"
    tree = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree
    assert set(param_paths.nested_to_flat(tree["params"])) == trained
    # Against the same step saved whole (what a LoRA checkpoint held before): the frozen
    # base is ~75% of the state's values here (the tiny projector is as big as the
    # adapters); at 7B with rank 128 it is ~87%.
    ckpt = Checkpointer(ckpts, save_every=1)
    state, _ = resume.restore(ckpt, 4, TrainSetup.build(config, STEPS))
    ckpt.close()
    with ocp.StandardCheckpointer() as whole:
        whole.save(tmp_path / "whole", state)
    stored, full = _stored_values(state_dir), _stored_values(tmp_path / "whole")
    assert stored < 0.3 * full, (stored, full)

    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints" / "4", run / "checkpoints" / "4")
    loop.train(config, run)  # resumes from step 4
    got = _losses(run)
    assert sorted(got) == list(range(5, STEPS + 1))
    assert {s: got[s] for s in got} == {s: expected[s] for s in got}  # bit for bit
    want = model_io.load_params(reference / "model", cfg)
    for path, value in model_io.load_params(run / "model", cfg).items():
        assert np.array_equal(np.asarray(value), np.asarray(want[path])), path

    # Another base under the same checkpoint: refused in one line, nothing written.
    init = Path(config.init_from)
    params = {k: np.asarray(v) for k, v in model_io.load_params(init, cfg).items()}
    params["language_model/norm/scale"] = params["language_model/norm/scale"] + 1
    assets = init / model_io.ASSETS_DIR
    other = model_io.save_model_dir(
        tmp_path / "other_init", cfg, params, assets, [p.name for p in assets.iterdir()]
    )
    moved = tmp_path / "moved"
    shutil.copytree(reference / "checkpoints" / "4", moved / "checkpoints" / "4")
    config = config_loader.load_config(RECIPE, [*overrides, f"--config.init_from={other}"])
    with pytest.raises(loop.TrainingError, match="frozen weights re-created from") as e:
        loop.train(config, moved)
    assert "\n" not in str(e.value) and "language_model/norm/scale" in str(e.value)
    assert _finished_steps(moved) == [4] and not (moved / "model").exists()


LORA = ["--config.train.trainable=multi_modal_projector/.*", "--config.optimizer.vision_lr=0",
        "--config.train.lora.rank=4", "--config.train.lora.alpha=8"]  # fmt: skip


@pytest.mark.parametrize(
    "extra, want",
    [([], ["abstract"]), pytest.param(LORA, ["abstract", "abstract"], marks=pytest.mark.slow)],
    ids=["full", "lora"],
)
def test_a_start_builds_the_model_once(setup, tmp_path, monkeypatch, extra, want):
    """A fresh start (setup, loading init_from, the state, the step, the export) builds the
    model abstractly once, in `TrainSetup.build`, and never for real: the weights come from
    init_from. It used to build it abstractly about 9 times. With LoRA, twice: the model with
    adapters (what trains) and the plain one (what init_from holds and the export writes)."""
    import traceback

    from llava_jax.models.llava import LlavaModel

    builds = []
    init = LlavaModel.__init__

    def counted(self, *args, **kwargs):
        abstract = any(f.name == "eval_shape" for f in traceback.extract_stack())
        builds.append("abstract" if abstract else "real")
        init(self, *args, **kwargs)

    monkeypatch.setattr(LlavaModel, "__init__", counted)
    config = config_loader.load_config(RECIPE, [*setup, "--config.train.num_steps=2", *extra])
    loop.train(config, tmp_path)
    assert builds == want


def test_a_checkpoint_from_before_the_trained_only_optimizer_is_refused(setup, tmp_path):
    """A checkpoint written before the optimizer covered only the trained parameters (its
    state an `optax.multi_transform` over every parameter with a `set_to_zero` "frozen"
    group, its meta without a format) stops the resume in one line that says what to do,
    and nothing is written."""
    import optax
    import orbax.checkpoint as ocp

    from llava_jax.train import resume
    from llava_jax.train.checkpoints import Checkpointer
    from llava_jax.train.optim import decay_mask
    from llava_jax.train.setup import TrainSetup

    config = config_loader.load_config(RECIPE, [*setup, "--config.train.num_steps=2"])
    loop.train(config, tmp_path)
    train_setup = TrainSetup.build(config, 2)
    ckpt = Checkpointer(tmp_path / "checkpoints", save_every=1)
    state, _ = resume.restore(ckpt, 2, train_setup)
    ckpt.close()
    # The state as the code before it wrote it.
    labels = param_paths.flat_to_nested(train_setup.labels)
    trains = jax.tree.map(lambda label: label != "frozen", labels)
    groups = {label: optax.adamw(1e-3, mask=decay_mask) for label in jax.tree.leaves(labels)}
    groups["frozen"] = optax.set_to_zero()
    old_tx = optax.chain(
        optax.masked(optax.clip_by_global_norm(1.0), trains),
        optax.multi_transform(groups, labels),
    )
    old = state.replace(opt_state=old_tx.init(state.params))
    step_dir = tmp_path / "checkpoints" / "2"
    with ocp.StandardCheckpointer() as writer:
        writer.save(step_dir / "state", old, force=True)
    meta_file = step_dir / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta[resume.FORMAT_KEY]
    meta_file.write_text(json.dumps(meta))

    later = config_loader.load_config(RECIPE, [*setup, "--config.train.num_steps=4"])
    with pytest.raises(loop.TrainingError, match="checkpoint format 2") as e:
        loop.train(later, tmp_path)
    assert "\n" not in str(e.value) and "init_from=" in str(e.value)
    assert _finished_steps(tmp_path) == [2]
