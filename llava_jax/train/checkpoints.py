"""Training checkpoints: the whole resumable state in one orbax step directory.

Each step directory holds three items, written together and committed atomically by orbax
(a temporary directory renamed into place, or `commit_success.txt` on GCS; orbax
`_src/path/atomicity.py`):

  state/  the TrainState pytree (params, optimizer state, step), sharded as in training;
          with LoRA only the trained params and their optimizer state (resume.py)
  data/   the Grain iterator state, one `process_{i}-of-{n}.json` per process
  meta/   JSON: the config, skip counts so far, wall-clock

A run killed mid-save leaves only a temporary directory, which is never mistaken for a
step; the next run's manager removes it in the background, before its first save. Saves are
asynchronous: the device-to-host copy blocks, the write happens on a background thread.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

ITEMS = ("state", "data", "meta")


class Checkpointer:
    """Saves on a fixed interval and on preemption; keeps the last N plus every Kth."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep_last: int = 2,
        keep_every: int = 0,
        async_save: bool = True,
    ):
        preserve = [policies.preservation_policy.LatestN(keep_last)]
        if keep_every:
            preserve.append(policies.preservation_policy.EveryNSteps(keep_every))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(save_every),
                    # A custom policy must name preemption itself (orbax
                    # `_src/checkpoint_managers/save_decision_policy.py`).
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
            preservation_policy=policies.AnyPreservationPolicy(preserve),
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            os.fspath(directory),
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    @property
    def directory(self):
        return self._manager.directory

    def latest_step(self) -> int | None:
        """The newest finished step, or None. Unfinished (temporary) steps never count."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator, meta: dict, *, force: bool = False):
        """Saves if the policy says so (or `force`); returns whether a save started.

        A step that already exists is never written again (a restart that replays the step
        it resumed from would otherwise collide with it).
        """
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state: Any, data_iterator) -> tuple[Any, dict]:
        """Restores `step` into shardings of `abstract_state`; the iterator in place.

        Args:
          abstract_state: the TrainState as ShapeDtypeStructs with shardings: arrays are
            read straight into their shards, never whole on one host.

        Returns:
          (state, meta).
        """
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["meta"]

    def read_meta(self, step: int) -> dict:
        """The `meta` item of `step` alone: what a resume checks before restoring the rest."""
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Only the train state of `step` (no data iterator), e.g. to export its weights."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored["state"]

    def reached_preemption(self, step: int) -> bool:
        """True on every host at the same step once any host got SIGTERM (multi-host)."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
