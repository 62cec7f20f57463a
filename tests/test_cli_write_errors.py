"""A write that fails on the way (a full disk) is one line, not orbax's tracebacks.

The disk fills by a file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, Python
ignores SIGXFSZ), which takes the same path through orbax and tensorstore as ENOSPC without
needing a small filesystem; where user namespaces allow it, a 300 KB tmpfs fills for real.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import hf_tiny
import pytest

from llava_jax.checks.tiny_tokenizer import build_tiny_tokenizer

LIMIT = 16 * 1024  # bytes per file: the tokenizer fits, the tiny model's parameters do not


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    hf = tmp_path_factory.mktemp("hf")
    hf_tiny.llava().save_pretrained(hf)
    build_tiny_tokenizer().save_pretrained(hf)
    jax_dir = tmp_path_factory.mktemp("jax") / "model"
    assert cli("convert", "hf-to-jax", "--hf", hf, "--out", jax_dir).returncode == 0
    return hf, jax_dir


def cli(*args, limit=None):
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "llava_jax.cli.main", *map(str, args)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        preexec_fn=limit_file_size if limit else None,
    )  # fmt: skip


@pytest.mark.parametrize("direction", ["hf-to-jax", "jax-to-hf"])
def test_a_failed_write_is_one_line(dirs, tmp_path, direction):
    hf, jax_dir = dirs
    source = ["--hf", hf] if direction == "hf-to-jax" else ["--ckpt", jax_dir]
    out = tmp_path / "out"
    proc = cli("convert", direction, *source, "--out", out, limit=LIMIT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"llava-jax: error: {out}: File too large"], (
        proc.stderr[-3000:]
    )
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half-written directory


def _can_mount_tmpfs() -> bool:
    probe = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
             "mount -t tmpfs -o size=64k tmpfs /mnt"]  # fmt: skip
    try:
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user namespaces")
def test_a_full_disk_is_one_line(dirs, tmp_path):
    """A real ENOSPC on a 300 KB tmpfs: the writes still in flight when orbax gives up each
    print tensorstore's 'Event loop is closed' too, unless hidden."""
    hf, _ = dirs
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (
        f"mount -t tmpfs -o size=300k tmpfs {disk} && "
        f"{sys.executable} -m llava_jax.cli.main convert hf-to-jax --hf {hf} --out {disk}/out; "
        f"status=$?; ls -A {disk}; exit $status"
    )
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    expected = f"llava-jax: error: {disk}/out: No space left on device"
    assert proc.stderr.strip().splitlines() == [expected], proc.stderr[-3000:]
    assert proc.stdout.strip() == ""  # nothing left on the disk
