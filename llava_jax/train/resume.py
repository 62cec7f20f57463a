"""What a training checkpoint holds, and a run's state rebuilt from it.

Without LoRA a checkpoint holds the whole TrainState. With LoRA (`train.lora`) the frozen
base (the LLM's weights, QLoRA's quantized kernels, the vision tower) is nearly all of the
bytes and never changes, so a checkpoint holds only the trained parameters (the adapters,
the projector) and their optimizer state, plus a fingerprint of the frozen parameters in its
meta. Resuming (or exporting) re-creates the frozen parameters from `init_from` (and
`projector_from`) exactly as the run's start did, checks their fingerprint, and puts the
saved ones back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llava_jax.conversion import source
from llava_jax.models import lora
from llava_jax.param_paths import nested_to_flat
from llava_jax.train import state as state_lib
from llava_jax.train.checkpoints import Checkpointer
from llava_jax.train.setup import TrainSetup
from llava_jax.train.state import TrainState

# The meta key of a checkpoint without its frozen parameters: {path: fingerprint}.
FROZEN_KEY = "frozen_fingerprint"
# The meta key of the checkpoint layout's version. 1 (no key): the optimizer state covered
# every parameter (`multi_transform` with a "frozen" group); 2: the trained parameters only.
FORMAT_KEY = "format"
FORMAT = 2


class BaseMismatchError(RuntimeError):
    """The frozen parameters re-created on resume are not the ones the run trained on."""


class OldCheckpointError(RuntimeError):
    """A checkpoint whose layout this version cannot restore; the message says what to do."""


def saves_frozen(config) -> bool:
    """Whether the run's checkpoints hold its frozen parameters (every run but LoRA)."""
    return lora.spec_from_config(config) is None


def to_save(setup: TrainSetup, state: TrainState) -> TrainState:
    """The part of `state` a LoRA checkpoint holds: step, trained params, optimizer state
    (frozen parameters have none)."""
    return TrainState(
        step=state.step, params=setup.split(state.params)[0], opt_state=state.opt_state
    )


def fingerprint(params: Mapping[str, jax.Array], mesh: Mesh) -> dict[str, str]:
    """{path: 8 hex digits} of flat `params`: each value's bits, mixed with its position by
    murmur3's finalizer, summed modulo 2^32. Integer arithmetic, so the same bits give the
    same value on any mesh and in any reduction order; any changed, moved or retyped value
    changes it (but for a 2^-32 chance)."""

    def one(x):
        if jnp.issubdtype(x.dtype, jnp.floating):  # the bits, not the value (-0.0, NaN)
            x = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
        index = jnp.zeros(x.shape, jnp.uint32)
        for axis, size in enumerate(x.shape):
            index = index * np.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
        h = x.astype(jnp.uint32) ^ (index * np.uint32(0x9E3779B9))
        h = (h ^ (h >> 16)) * np.uint32(0x85EBCA6B)
        h = (h ^ (h >> 13)) * np.uint32(0xC2B2AE35)
        return jnp.sum(h ^ (h >> 16), dtype=jnp.uint32)

    replicated = NamedSharding(mesh, PartitionSpec())
    sums = jax.jit(lambda t: {k: one(v) for k, v in t.items()}, out_shardings=replicated)(
        dict(params)
    )
    return {k: f"{int(np.asarray(v.addressable_data(0))):08x}" for k, v in sorted(sums.items())}


def frozen_fingerprint(setup: TrainSetup, state: TrainState) -> dict[str, str]:
    return fingerprint(nested_to_flat(setup.split(state.params)[1]), setup.mesh)


def base_params(setup: TrainSetup) -> dict[str, jax.Array]:
    """Flat params of the plain model from `init_from` (a model dir, or an HF dir converted
    on the fly) with `projector_from`'s connector, in their training shardings."""
    config, model_cfg = setup.config, setup.model_cfg
    shardings = setup.plain_param_shardings
    params = source.load_params(
        config.init_from,
        model_cfg,
        shardings=shardings,
        dtype=model_cfg.run.param_dtype,
        expected=setup.plain_params,
    )
    if config.projector_from:
        from llava_jax.conversion.init_model import load_projector

        params = load_projector(config.projector_from, params, model_cfg)
        params = {k: jax.device_put(v, shardings[k]) for k, v in params.items()}
    return params


def restore(
    ckpt: Checkpointer, step: int, setup: TrainSetup, data_iterator=None
) -> tuple[TrainState, dict[str, Any]]:
    """The whole TrainState of checkpoint `step`, and its meta.

    A checkpoint without frozen parameters (LoRA) gets them from `base_params`; the data
    iterator (when given) is restored in place.

    Raises:
      BaseMismatchError: the re-created frozen parameters differ from the run's.
      OldCheckpointError: the checkpoint's optimizer state has the layout of a version
        before the trained/frozen split.
    """
    meta = ckpt.read_meta(step)
    if meta.get(FORMAT_KEY, 1) < FORMAT:
        raise OldCheckpointError(
            f"checkpoint {step} in {ckpt.directory} was written by a llava-jax before "
            f"checkpoint format {FORMAT} (its optimizer state held frozen parameters' groups); "
            "finish the run with that version, or start a new --workdir from its weights "
            "(`llava-jax export` with that version, then init_from=<the export>)"
        )
    abstract = setup.abstract
    frozen_meta = meta.get(FROZEN_KEY)
    if frozen_meta is not None:
        abstract = to_save(setup, abstract)
    if data_iterator is None:
        saved = ckpt.restore_state(step, abstract)
    else:
        saved, meta = ckpt.restore(step, abstract, data_iterator)
    if frozen_meta is None:  # the whole state (a run without LoRA, or saved before)
        return saved, meta
    fresh = state_lib.init_state(setup, params=base_params(setup))
    found = frozen_fingerprint(setup, fresh)
    differ = sorted(
        k for k in frozen_meta.keys() | found.keys() if frozen_meta.get(k) != found.get(k)
    )
    config = setup.config
    if differ:
        raise BaseMismatchError(
            f"checkpoint {step}: the frozen weights re-created from init_from={config.init_from} "
            f"(projector_from={config.projector_from or None}) are not the run's ({len(differ)} "
            f"differ, e.g. {differ[0]}); resume with the run's init_from, or use a new --workdir"
        )
    params = setup.merge(saved.params, setup.split(fresh.params)[1])
    return TrainState(step=saved.step, params=params, opt_state=saved.opt_state), meta
