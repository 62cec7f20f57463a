"""Two processes of 4 CPU devices each (jax.distributed on localhost) train like one of 8."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_helpers import run_losses

from llava_jax.sharding import make_mesh

HELPER = Path(__file__).with_name("train_helpers.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Slow (about 50 s): test_train_loop.py::test_two_processes_train_like_one checks the same
# property through the whole `llava-jax train` loop in the default run.
@pytest.mark.slow
def test_two_processes_match_one_process_of_8_devices(tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    logs = [open(tmp_path / f"proc{i}.log", "w+") for i in range(2)]  # noqa: SIM115
    procs = [
        subprocess.Popen(
            [sys.executable, str(HELPER), str(port), str(i)],
            stdout=logs[i],
            stderr=subprocess.STDOUT,
            env=env,
        )
        for i in range(2)
    ]
    try:
        want = run_losses(make_mesh(data=2, fsdp=2, tensor=2))  # meanwhile, in this process
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    for i, (code, out) in enumerate(zip(codes, outputs, strict=True)):
        assert code == 0, f"process {i} exited with {code}:\n{out[-3000:]}"
    for i, out in enumerate(outputs):
        lines = [line for line in out.splitlines() if line.startswith("LOSSES ")]
        assert lines, f"process {i} printed no losses:\n{out[-3000:]}"
        got = json.loads(lines[-1][len("LOSSES ") :])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=f"process {i}")
