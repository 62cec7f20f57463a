"""Orbax checkpoints of the train state and the Grain iterator, on disk."""

import grain
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.train.checkpoints import Checkpointer


def _iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset())


def _state(x: float):
    return {"step": jnp.int32(x), "params": {"w": jnp.full((4, 3), x, jnp.float32)}}


def test_save_restore_state_and_iterator(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=2, keep_last=2)
    it = _iterator()
    for step in range(1, 7):
        next(it)
        ckpt.save(step, _state(step), it, {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6]  # every 2nd step, last two kept
    expected = [next(it) for _ in range(3)]

    fresh = _iterator()
    abstract = jax.eval_shape(lambda: _state(0))
    state, meta = Checkpointer(tmp_path, save_every=2).restore(6, abstract, fresh)
    assert meta == {"step": 6}
    np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 6.0))
    for want in expected:  # the restored iterator continues exactly where it stopped
        np.testing.assert_array_equal(next(fresh), want)


def test_keep_every(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=1, keep_last=1, keep_every=3, async_save=False)
    it = _iterator()
    for step in range(1, 8):
        ckpt.save(step, _state(step), it, {})
    assert ckpt.all_steps() == [3, 6, 7]


def test_half_written_step_is_ignored_and_removed(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=1, async_save=False)
    it = _iterator()
    ckpt.save(1, _state(1), it, {})
    ckpt.close()
    # What a kill during the write of step 2 leaves: a temporary directory with a part.
    partial = tmp_path / "2.orbax-checkpoint-tmp-1234567890"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half.bin").write_bytes(b"\0" * 10)
    reopened = Checkpointer(tmp_path, save_every=1, async_save=False)
    assert reopened.latest_step() == 1
    state, _ = reopened.restore(1, jax.eval_shape(lambda: _state(0)), _iterator())
    assert int(state["step"]) == 1
    # Orbax removes it on a background thread that every save waits for, so by the time
    # the step is written again the leftover is gone and the new step is whole.
    assert reopened.save(2, _state(2), it, {})
    assert not partial.exists()
    assert reopened.all_steps() == [1, 2]
    state, _ = reopened.restore(2, jax.eval_shape(lambda: _state(0)), _iterator())
    assert int(state["step"]) == 2


def test_existing_step_is_not_rewritten(tmp_path):
    ckpt = Checkpointer(tmp_path, save_every=1, async_save=False)
    it = _iterator()
    assert ckpt.save(1, _state(1), it, {})
    assert not ckpt.save(1, _state(99), it, {})
    state, _ = ckpt.restore(1, jax.eval_shape(lambda: _state(0)), _iterator())
    assert int(state["step"]) == 1
