"""tpu_scripts/*.sh: the gcloud command sequences their dry runs print (create, setup, launch,
logs, stop, delete), and the shell commands their ssh steps send to the workers.

A dry run must never call gcloud: the `sandbox` fixture's guard `gcloud` records any call and
fails (tests/tpu_scripts_helpers.py runs the scripts).
"""

from __future__ import annotations

import pytest
from tpu_scripts_helpers import PROJECT, SETTINGS, TPU, TRAIN, WHERE, ZONE, dry_run, remote

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
