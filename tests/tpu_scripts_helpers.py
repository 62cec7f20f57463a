"""The tpu_scripts tests' settings and runners: each script runs as a user runs it (bash, in a
subprocess, with a clean environment) in the `sandbox` fixture's folder (tests/conftest.py),
where a `gcloud` on PATH records its arguments and fails: a dry run must never call it.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tpu_scripts"
NAMES = ("create", "setup", "launch", "logs", "stop", "delete")

PROJECT, ZONE, TPU = "my-proj", "us-east5-a", "llava-pod"
WHERE = [f"--project={PROJECT}", f"--zone={ZONE}"]
SETTINGS = ["--project", PROJECT, "--zone", ZONE, "--name", TPU]
TRAIN = ["--config", "configs/exp.py", "--workdir", "gs://bucket/runs/ft1"]


def run(sandbox: Path, name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Runs tpu_scripts/NAME.sh with only PATH and HOME set (plus `env`)."""
    environ = {
        "PATH": f"{sandbox / 'bin'}:/usr/bin:/bin",
        "HOME": str(sandbox / "home"),
        "LC_ALL": "C",
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPTS / f"{name}.sh"), *args],
        cwd=sandbox / "work",
        env=environ,
        capture_output=True,
        text=True,
        timeout=30,
    )


def dry_run(sandbox: Path, name: str, *args: str, **env: str) -> list[list[str]]:
    """The commands a dry run prints, each split as a POSIX shell splits it."""
    result = run(sandbox, name, "--dry-run", *args, **env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert not (sandbox / "gcloud-calls").exists(), "a dry run called gcloud"
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def remote(command: list[str]) -> str:
    """The shell command an ssh step runs on the workers."""
    [value] = [a.removeprefix("--command=") for a in command if a.startswith("--command=")]
    return value
