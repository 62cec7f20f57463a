"""Our hand-encoded event files, read back by TensorBoard's own reader."""

import math

import pytest

from llava_jax.train.tensorboard import SummaryWriter, crc32c

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator",
    reason="the tensorboard package is in the test extra",
)


def test_crc32c_known_vectors():
    # RFC 3720 B.4 test vectors and the classic "123456789" check value.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(bytes([0xFF] * 32)) == 0x62A8AB43


def test_tensorboard_reads_our_scalars(tmp_path):
    with SummaryWriter(tmp_path) as w:
        w.scalars(1, {"train/loss": 2.5, "train/lr": 1e-3})
        w.scalars(2, {"train/loss": 1.25, "skipped/corrupt_image": 3})
        w.scalars(10_000_000_000, {"train/loss": -0.5})  # int64 steps, negative values
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["skipped/corrupt_image", "train/loss", "train/lr"]
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss == [(1, 2.5), (2, 1.25), (10_000_000_000, -0.5)]
    (lr,) = acc.Scalars("train/lr")
    assert math.isclose(lr.value, 1e-3, rel_tol=1e-7) and lr.step == 1
    assert [e.value for e in acc.Scalars("skipped/corrupt_image")] == [3.0]
