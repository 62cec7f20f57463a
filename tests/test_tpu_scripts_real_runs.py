"""tpu_scripts/*.sh run for real: `create --wait` against a gcloud that answers (and fails),
a real run calling exactly what it prints, and the commands the workers run (launch, stop)
executed here with a stand-in for the `llava-jax` program, so their pid files, logs and
signals are tested too.
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from tpu_scripts_helpers import SETTINGS, TRAIN, dry_run, remote, run


def answering_gcloud(sandbox: Path, *answers: str) -> None:
    """A gcloud on PATH that gives the next answer per call: a state it prints, or `fail`."""
    (sandbox / "answers").write_text("".join(f"{a}\n" for a in answers))
    (sandbox / "bin" / "gcloud").write_text(
        f"""#!/bin/bash
answer=$(head -n 1 {sandbox / "answers"}); sed -i 1d {sandbox / "answers"}
echo "$*" >> {sandbox / "gcloud-calls"}
[ "$answer" = fail ] && {{ echo "ERROR: (gcloud) a network error" >&2; exit 1; }}
echo "$answer"
"""
    )


@pytest.mark.parametrize(
    "answers, timeout, status, last",
    [
        (["", "WAITING_FOR_RESOURCES", "fail", "PROVISIONING", "ACTIVE"], 60, 0, "is ACTIVE"),
        (["", "fail", "fail", "fail", "fail", "fail"], 60, 1, "failed 5 times in a row (gcl"),
        (["", "WAITING_FOR_RESOURCES", "FAILED"], 60, 1, "queued resource llava-pod is FAILED"),
        (["", *["WAITING_FOR_RESOURCES"] * 9], 1, 1,
         "not ACTIVE after 1 s (last state: WAITING_FOR_RESOURCES); it stays queued (delete"),
    ],
)  # fmt: skip
def test_create_wait_survives_a_failed_describe_and_has_a_timeout(
    sandbox, answers, timeout, status, last
):
    answering_gcloud(sandbox, *answers)  # the first answers the create
    result = run(
        sandbox, "create", *SETTINGS, "--accelerator-type=v5p-8", "--wait", f"--timeout={timeout}",
        TPU_POLL_SECONDS="1",
    )  # fmt: skip
    assert result.returncode == status, result.stderr
    assert last in result.stderr.splitlines()[-1]
    describes = (sandbox / "gcloud-calls").read_text().splitlines()[1:]
    assert len(describes) <= len(answers) - 1 and all("describe" in d for d in describes)


def test_a_real_run_executes_what_it_prints(sandbox):
    recorder = sandbox / "bin" / "gcloud"  # now answers 0, recording its arguments
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\0" gcloud "$@" > {sandbox / "argv"}\n')
    result = run(sandbox, "delete", *SETTINGS, "--num-slices", "2", "--yes")
    assert result.returncode == 0, result.stderr
    printed = shlex.split(result.stderr.removeprefix("+ "))
    called = (sandbox / "argv").read_text().split("\0")[:-1]
    assert called == printed
    assert printed[3:5] == ["queued-resources", "delete"]


# --- the commands the workers run -------------------------------------------------------

FAKE_TRAIN = """#!/bin/bash
# Stands in for llava-jax on a worker: prints its arguments, saves on SIGTERM; has a child
# (a data worker) in its process group.
trap 'echo "SIGTERM: checkpoint saved"; exit 0' TERM
sleep 300 &
echo $! > "$HOME/child.pid"
printf 'arg: %s\\n' "$@"
echo "open files: $(ulimit -n)"
echo "training started"
while true; do sleep 0.05; done
"""


def on_worker(home: Path, command: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LLAVA_JAX_WORKER_ID": "0", "LC_ALL": "C",
           # The TPU chips and libtpu's lockfile, as launch.sh clears them, in the sandbox.
           "LLAVA_JAX_TPU_DEVICES": f"{home}/dev/accel*",
           "LLAVA_JAX_LIBTPU_LOCKFILE": f"{home}/libtpu_lockfile"}  # fmt: skip
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30,
        # An ssh session's soft open-file limit is low (1024); launch.sh raises it.
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
    )  # fmt: skip


def wait_for(path: Path, text: str, count: int = 1, timeout: float = 10.0) -> str:
    """The file's content once `text` occurs `count` times in it."""
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if content.count(text) >= count:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not {count}x in {path} after {timeout} s: {content!r}")


def test_launch_and_stop_on_a_worker(sandbox):
    """Runs the launch and stop commands as a worker's shell runs them."""
    home = sandbox / "home"
    program = home / "llava-jax-venv" / "bin" / "llava-jax"
    program.parent.mkdir(parents=True)
    program.write_text(FAKE_TRAIN)
    program.chmod(0o755)
    odd = "--config.data.train=gs://b/it's a path"  # quoting survives two shells
    train = [*TRAIN, odd]
    log = home / "llava-jax-logs" / "ft1" / "worker-0.log"
    pidfile = log.with_suffix(".pid")

    def launch():
        mkdir, scp, start = dry_run(sandbox, "launch", *SETTINGS, "--env", "A=1 2", "--", *train)
        assert on_worker(home, remote(mkdir)).returncode == 0
        source, destination = scp[5], scp[6].split(":", 1)[1]  # what gcloud scp would copy
        shutil.copy(sandbox / "work" / source, home / destination)
        return on_worker(home, remote(start))

    # A stray process holding a TPU chip, and the lockfile a killed run left behind.
    (home / "dev").mkdir()
    (home / "dev" / "accel0").write_bytes(b"")
    (home / "libtpu_lockfile").write_bytes(b"")
    stray = subprocess.Popen(["bash", "-c", f"exec 3<{home}/dev/accel0; exec sleep 300"])
    time.sleep(0.2)
    try:
        started = launch()
        assert started.returncode == 0, started.stderr
        assert "worker 0: pid" in started.stdout
        assert f"killing pid {stray.pid}, a stray user of the TPU: sleep 300" in started.stdout
        assert stray.wait(timeout=10) == -signal.SIGKILL
        assert not (home / "libtpu_lockfile").exists()
        content = wait_for(log, "training started")
        assert f"arg: {odd}\n" in content
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        assert f"open files: {'unlimited' if hard == resource.RLIM_INFINITY else hard}\n" in content
        assert content.startswith("=== ") and "worker 0" in content.splitlines()[0]
        assert (home / "llava-jax-logs" / "latest").resolve() == log.parent
        assert (home / "llava-jax" / "configs" / "exp.py").is_file()

        again = launch()  # the TPU is busy: refuse, leave the running one alone
        assert again.returncode == 1
        assert "busy with the training" in again.stderr
        os.kill(int(pidfile.read_text()), 0)

        [stop] = dry_run(sandbox, "stop", *SETTINGS, "--run", "ft1", "--wait", "10")
        stopped = on_worker(home, remote(stop))
        assert stopped.returncode == 0, stopped.stderr
        assert "sent SIGTERM" in stopped.stdout and "stopped" in stopped.stdout
        assert "SIGTERM: checkpoint saved" in log.read_text()

        # A second launch (the resume) appends to the same log.
        assert launch().returncode == 0
        content = wait_for(log, "training started", count=2)
        assert content.count("SIGTERM: checkpoint saved") == 1
        assert sum(line.startswith("=== ") for line in content.splitlines()) == 2
        child = int(wait_for(home / "child.pid", "\n").strip())
        [kill] = dry_run(sandbox, "stop", *SETTINGS, "--kill", "--wait", "10")
        assert "sent SIGKILL" in on_worker(home, remote(kill)).stdout
        assert not running(child), "--kill left the training's child running"
        nothing = on_worker(home, remote(kill))
        assert "no training of run latest running" in nothing.stdout
    finally:
        stray.kill()
        for leftover in (pidfile, home / "child.pid"):
            if leftover.exists():
                try:
                    os.kill(int(leftover.read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def running(pid: int, timeout: float = 5.0) -> bool:
    """Whether `pid` is still running after `timeout` s (a zombie counts as ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z":
                return False
        except FileNotFoundError:
            return False
        time.sleep(0.05)
    return True
