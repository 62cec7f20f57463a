"""The GPU smoke test's pieces on the CPU; on a GPU machine `pytest -m gpu` runs it whole."""

import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import jax
import pytest

from llava_jax.checks import gpu_smoke

ON_GPU = bool(gpu_smoke._gpu_devices())


@pytest.mark.skipif(ON_GPU, reason="a GPU is present: the real run is test_gpu_smoke_on_gpu")
def test_without_gpu_it_says_so_and_passes(capsys):
    assert gpu_smoke.main([]) == 0
    assert "skipped: JAX sees no GPU" in capsys.readouterr().out


def test_throughput_probe_runs_a_real_step_on_a_shrunken_model():
    tiny = (
        "--config.model.overrides.vision.num_hidden_layers=1",
        "--config.model.overrides.vision.hidden_size=32",
        "--config.model.overrides.vision.intermediate_size=64",
        "--config.model.overrides.vision.num_attention_heads=2",
        "--config.model.overrides.vision.image_size=28",
        "--config.model.overrides.text.num_hidden_layers=1",
        "--config.model.overrides.text.hidden_size=32",
        "--config.model.overrides.text.intermediate_size=64",
        "--config.model.overrides.text.num_attention_heads=2",
        "--config.model.overrides.text.num_key_value_heads=1",
        "--config.model.overrides.text.head_dim=16",
        "--config.model.overrides.text.vocab_size=512",
        "--config.model.overrides.image_token_id=500",
        "--config.model.overrides.video_token_id=501",
        "--config.model.overrides.image_grid_pinpoints=((28, 28), (28, 56))",
    )
    out = gpu_smoke.probe_throughput(
        batch=8, seq_len=64, repeats=1, overrides=tiny, loss="blockwise"
    )
    assert math.isfinite(out["loss"]) and out["step_s"] > 0
    assert out["mfu"] is None  # no known peak for a CPU
    assert out["attention"] == "xla"  # auto, on CPU devices
    assert out["loss_impl"] == "blockwise"  # asked for; auto would be chunked on CPU
    assert out["device"] == jax.devices()[0].device_kind


def test_the_probe_settings_reach_the_probe(monkeypatch, tmp_path, capsys):
    """`--attention` and `--loss` go to the throughput probe as given (a stand-in GPU and
    probe: nothing compiles); a loss that does not exist is refused by the parser."""
    seen = {}

    def probe(batch, seq_len, **kwargs):
        seen.update(kwargs, batch=batch, seq_len=seq_len)
        return {"mfu": 0.5, **kwargs}

    monkeypatch.setattr(gpu_smoke, "_gpu_devices", lambda: [types.SimpleNamespace(device_kind="H")])
    monkeypatch.setattr(gpu_smoke, "probe_throughput", probe)
    argv = ["--skip", "parity", "training", "--attention", "xla", "--loss", "chunked",
            "--batch", "4", "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert gpu_smoke.main(argv) == 0
    assert seen == {"batch": 4, "seq_len": 2048, "remat": "dots_with_no_batch_dims",
                    "attention": "xla", "loss": "chunked"}  # fmt: skip
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["throughput"]["loss"] == "chunked" and report["device"] == "H"
    with pytest.raises(SystemExit):
        gpu_smoke.main(["--loss", "fused"])
    assert "invalid choice: 'fused'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU visible to JAX")
def test_gpu_smoke_on_gpu(tmp_path):
    assert gpu_smoke.main(["--steps", "300", "--out", str(tmp_path / "smoke.json")]) == 0


@pytest.mark.skipif(ON_GPU, reason="a GPU is present: the script would run the whole test")
def test_the_documented_script_skips_without_gpu():
    script = Path(__file__).parents[1] / "tpu_scripts" / "gpu_smoke.sh"
    result = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "gpu_smoke: skipped: JAX sees no GPU" in result.stdout


# -- benchmarks/device_check.sh ----------------------------------------------------------------

DEVICE_CHECK = Path(__file__).parents[1] / "benchmarks" / "device_check.sh"

# A stand-in Python for the script: it "sees a GPU" and answers each gpu_smoke call with the
# settings it was given (as the real probe reports them); every other call is the real Python.
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == -c && "$2" == *"devices('gpu')"* ]]; then exit 0; fi
if [[ "$1 $2" == "-m llava_jax.checks.gpu_smoke" ]]; then
  args=" $* "; attention=${args#* --attention }; loss=${args#* --loss }; out=${args#* --out }
  echo "$*" >> "$LOG"
  fields='"step_s": 0.5, "tokens_per_s": 32768, "mfu": 0.25'
  printf '{"throughput": {"attention": "%s", "loss_impl": "%s", %s}}' \\
    "${attention%% *}" "${loss%% *}" "$fields" > "${out%% *}"
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def _device_check(tmp_path, python, *args):
    env = {**os.environ, "PYTHON": python, "OUT": str(tmp_path / "out"),
           "REAL_PYTHON": sys.executable, "LOG": str(tmp_path / "calls"),
           "WHEELS": str(tmp_path / "none")}  # fmt: skip
    return subprocess.run(["bash", str(DEVICE_CHECK), *args], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip


def test_device_check_runs_the_three_settings_and_prints_the_table(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    result = _device_check(tmp_path, str(fake), "--batch", "4")
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    out = tmp_path / "out"
    assert calls == [
        f"-m llava_jax.checks.gpu_smoke --skip parity training --attention {a} --loss {loss} "
        f"--out {out}/{name}.json --batch 4"
        for name, a, loss in [
            ("xla", "xla", "chunked"),
            ("cudnn", "auto", "chunked"),
            ("fused", "auto", "auto"),
        ]  # fmt: skip
    ]
    assert "| xla | xla | chunked | 500 | 32,768 | 25.0% |" in result.stdout
    assert "| fused | auto | auto | 500 | 32,768 | 25.0% |" in result.stdout


@pytest.mark.skipif(ON_GPU, reason="a GPU is present: the script would measure")
def test_device_check_without_gpu_says_so(tmp_path):
    result = _device_check(tmp_path, sys.executable)
    assert result.returncode == 1
    assert "device_check: JAX sees no GPU" in result.stderr


def test_device_check_passes_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run([shellcheck, str(DEVICE_CHECK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
