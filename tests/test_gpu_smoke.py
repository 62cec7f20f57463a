"""The GPU smoke test's pieces on the CPU; on a GPU machine `pytest -m gpu` runs it whole."""

import json
import math
import types

import jax
import pytest

from llava_jax import gpu_smoke

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
    import os
    import subprocess
    import sys
    from pathlib import Path

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
