"""The README's main command, shortened: `llava-jax train --config configs/shapes_tiny.py`
generates the data, trains both stages, takes the held-out exam and writes eval.json; run
again, it finds every part complete. (The full run's accuracy is a benchmark, BENCHMARKS.md.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llava_jax import model_io

ROOT = Path(__file__).parents[1]
SHORT = [
    "--config.shapes.num_stage1=64",
    "--config.shapes.num_stage2=64",
    "--config.shapes.num_val=6",
    "--config.train.num_steps=4",
    "--config.train.batch_size=8",
    "--config.train.log_every=2",
]


def _train(workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """As the README runs it: `--workdir NAME` relative to the working directory, which
    is not the checkout (orbax refuses a relative path that reaches it; issue 18.1)."""
    cmd = [sys.executable, "-m", "llava_jax.cli.main", "train",
           "--config", str(ROOT / "configs" / "shapes_tiny.py"), "--workdir", workdir.name,
           *SHORT, *overrides]  # fmt: skip
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONPATH": path}  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env,
                          cwd=workdir.parent)  # fmt: skip


def test_builtin_run_end_to_end_then_resumes_as_complete(tmp_path):
    # Four steps learn nothing: the exam is below the 90% target, so the exit status is 1.
    first = _train(tmp_path)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "held-out accuracy" in first.stderr and "(target 90%)" in first.stderr
    for stage in ("stage1", "stage2"):
        assert model_io.is_model_dir(tmp_path / stage / "model"), stage
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_questions"] == 6 == len(report["results"])
    assert report["accuracy"] == sum(r["correct"] for r in report["results"]) / 6
    assert report["model"] == str(tmp_path / "stage2" / "model")
    heldout = json.loads((tmp_path / "data" / "heldout.json").read_text())
    assert [r["id"] for r in report["results"]] == [r["id"] for r in heldout]
    stage2 = json.loads((tmp_path / "stage2" / "config.json").read_text())
    assert stage2["train"]["trainable"] == ["multi_modal_projector/.*", "language_model/.*"]

    # Again, with the target lowered: nothing is trained twice, the exam is taken again.
    mtime = (tmp_path / "stage2" / "model").stat().st_mtime_ns
    again = _train(tmp_path, "--config.shapes.target_accuracy=0")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "stage2" / "model").stat().st_mtime_ns == mtime
    assert "step 1/" not in again.stderr

    # Other dataset sizes in the same workdir are refused, not silently given the old data.
    other = _train(tmp_path, "--config.shapes.num_stage2=65")
    assert other.returncode == 2, other.stderr[-3000:]
    assert "holds a shapes dataset written with other settings (num_stage2: 64 -> 65)" in (
        other.stderr
    )
    assert "Traceback" not in other.stderr
