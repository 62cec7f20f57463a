"""The `llava-jax` command line, run as a user runs it: in a subprocess.

Covers the console script (`python -m llava_jax.cli.main` and the installed `llava-jax`
entry point), the thin scripts in convert/, the one-line errors (exit 2) for the inputs a
user gets wrong, and `selfcheck`. Hermetic: the models are tiny and built in the test.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hf_tiny
import pytest
import torch
import transformers

from llava_jax.cli import convert as convert_cli
from llava_jax.cli.main import main

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, entry: str = "module") -> subprocess.CompletedProcess:
    """Runs the CLI with `args`; entry: "module" (python -m) or "script" (installed)."""
    if entry == "module":
        command = [sys.executable, "-m", "llava_jax.cli.main"]
    else:
        command = [console_script()]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=300)


def console_script() -> str:
    path = Path(sys.executable).parent / "llava-jax"
    found = str(path) if path.is_file() else shutil.which("llava-jax")
    if found is None:
        pytest.skip("the llava-jax console script is not installed (pip install -e .)")
    return found


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("llava-jax: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def hf_model():
    return hf_tiny.llava(kv_heads=2)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "hf"
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pickle_dir(hf_model, hf_dir) -> Path:
    """config.json + pytorch_model.bin only."""
    path = hf_dir.parent / "hf-pickle"
    path.mkdir()
    shutil.copy(hf_dir / "config.json", path)
    torch.save(hf_model.state_dict(), path / "pytorch_model.bin")
    return path


def test_round_trip(hf_model, hf_dir, tmp_path):
    """hf-to-jax through `python -m`, jax-to-hf through the installed entry point."""
    jax_dir, back = tmp_path / "jax", tmp_path / "out" / "hf"
    proc = run("convert", "hf-to-jax", "--hf", hf_dir, "--out", jax_dir)
    assert proc.returncode == 0, proc.stderr
    assert "llava:" in proc.stdout and "parameters, float32" in proc.stdout
    assert str(jax_dir) in proc.stdout
    assert (jax_dir / "llava_config.json").is_file()

    proc = run(
        "convert",
        "jax-to-hf",
        "--ckpt",
        jax_dir,
        "--out",
        back,
        "--max-shard-size",
        "100KB",
        entry="script",
    )
    assert proc.returncode == 0, proc.stderr
    assert str(back) in proc.stdout
    assert (back / "model.safetensors.index.json").is_file()  # sharded as asked
    assert not [p for p in back.parent.iterdir() if p.name.startswith(".")]  # no temp left
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(back)
    want, got = hf_model.state_dict(), reloaded.state_dict()
    assert sorted(got) == sorted(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_allow_pickle_and_dtype(pickle_dir, tmp_path):
    proc = run(
        "convert",
        "hf-to-jax",
        "--hf",
        pickle_dir,
        "--out",
        tmp_path / "jax",
        "--allow-pickle",
        "--dtype",
        "bfloat16",
    )
    assert proc.returncode == 0, proc.stderr
    assert "parameters, bfloat16" in proc.stdout


def _no_config(hf_dir, tmp):
    shutil.copy(hf_dir / "model.safetensors", tmp)
    return ["--hf", tmp]


def _malformed_config(hf_dir, tmp):
    shutil.copytree(hf_dir, tmp, dirs_exist_ok=True)
    (tmp / "config.json").write_text('{"architectures": ["LlavaForConditionalGeneration"')
    return ["--hf", tmp]


def _truncated_safetensors(hf_dir, tmp):
    shutil.copytree(hf_dir, tmp, dirs_exist_ok=True)
    weights = tmp / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    return ["--hf", tmp]


def _non_empty_out(hf_dir, tmp):
    (tmp / "notes.txt").write_text("mine")
    return ["--hf", hf_dir, "--out", tmp]


HF_TO_JAX_ERRORS = {  # case: (arguments, words the one error line must contain)
    "missing-hf-dir": (lambda hf_dir, tmp: ["--hf", tmp / "nope"], ["nope", "no such directory"]),
    "no-config": (_no_config, ["no config.json"]),
    "malformed-config": (_malformed_config, ["config.json", "not valid JSON"]),
    "truncated-safetensors": (_truncated_safetensors, ["model.safetensors", "truncated"]),
    "pickle-only": (None, ["--allow-pickle"]),
    "non-empty-out": (_non_empty_out, ["--out", "not empty"]),
}


@pytest.mark.parametrize("case", list(HF_TO_JAX_ERRORS))
def test_hf_to_jax_errors(case, hf_dir, pickle_dir, tmp_path):
    make_args, needles = HF_TO_JAX_ERRORS[case]
    args = make_args(hf_dir, tmp_path) if make_args else ["--hf", pickle_dir]
    if "--out" not in args:
        args += ["--out", tmp_path / "jax"]
    proc = run("convert", "hf-to-jax", *args)
    assert_one_line_error(proc, *needles)
    assert proc.stdout == ""
    assert not (tmp_path / "jax").exists()


def test_jax_to_hf_given_an_hf_dir(hf_dir, tmp_path):
    proc = run("convert", "jax-to-hf", "--ckpt", hf_dir, "--out", tmp_path / "out")
    assert_one_line_error(proc, "Hugging Face directory", "hf-to-jax")


def test_verbose_shows_traceback(tmp_path):
    (tmp_path / "hf").mkdir()
    proc = run(
        "convert", "hf-to-jax", "--hf", tmp_path / "hf", "--out", tmp_path / "jax", "--verbose"
    )
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("llava-jax: error: ")


@pytest.mark.parametrize("script", ["hf_to_jax", "jax_to_hf"])
def test_convert_scripts_help(script):
    proc = subprocess.run(
        [sys.executable, REPO / "convert" / f"{script}.py", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--out DIR" in proc.stdout
    assert ("--hf DIR" if script == "hf_to_jax" else "--ckpt DIR") in proc.stdout


def test_selfcheck_llava():
    proc = run("selfcheck", "--family", "llava", entry="script")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header, _, row = proc.stdout.strip().splitlines()
    assert header.split()[:2] == ["family", "params"]
    assert row.split()[0] == "llava" and row.split()[-1] == "PASS"


def test_selfcheck_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # makes `import torch` fail
        "from llava_jax.cli.main import main; sys.exit(main(['selfcheck']))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "pip install -e '.[torch]'")


def test_ctrl_c_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_cli, "run_hf_to_jax", interrupted)
    assert main(["convert", "hf-to-jax", "--hf", "x", "--out", "y"]) == 130
    assert capsys.readouterr().err == "llava-jax: interrupted\n"


def test_unexpected_error_is_not_hidden(monkeypatch):
    """A bug keeps its traceback (Python's exit status 1), not a one-line message."""

    def buggy(args):
        raise RuntimeError("bug")

    monkeypatch.setattr(convert_cli, "run_hf_to_jax", buggy)
    with pytest.raises(RuntimeError, match="bug"):
        main(["convert", "hf-to-jax", "--hf", "x", "--out", "y"])


def test_usage_error_returns_2(capsys):
    assert main(["convert", "hf-to-jax", "--hf", "x"]) == 2
    assert "--out" in capsys.readouterr().err


# -- what does not concern the user stays off the console (issue 18.6) ------------------------

# A command replaced by one that starts JAX's backends and imports transformers, as the real
# commands do; it prints whether libtpu was loaded.
PROBE = """
import sys
import llava_jax.cli.selfcheck as command

def probe(args):
    import jax
    import transformers
    from jax._src.lib import _jax
    jax.devices()
    print(_jax.pjrt_plugin_loaded("tpu"))
    return 0

command.run = probe
from llava_jax.cli.main import main
sys.exit(main(["selfcheck"]))
"""


def test_no_tpu_search_and_no_torch_advice_on_a_machine_without_them():
    """libtpu, installed for `plan`, is not loaded where there is no TPU (it printed five
    `E0000 ... INVALID_ARGUMENT` lines); transformers' "PyTorch was not found" is dropped."""
    from jax._src import hardware_utils

    from llava_jax.cli.noise import on_cloud_tpu

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed: JAX never loads it")
    if on_cloud_tpu() or hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        pytest.skip("this machine has a TPU")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_FORCE_TPU_INIT")}
    code = "import sys; sys.modules['torch'] = None\n" + PROBE  # as if torch were not installed
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False", "libtpu was loaded"
    assert proc.stderr == ""
