"""The train step: one pure function, jitted once, that takes a global batch to one update.

Loss: the mean cross-entropy over the supervised tokens of the whole global batch,
`sum(CE(logits, targets) * loss_mask) / sum(loss_mask)` with float32 logits, projected onto
the vocabulary `train.loss_chunk` positions at a time, or (`train.loss_impl`, blockwise on
TPU and GPU) vocabulary blocks at a time (`token_losses`, `nn/cross_entropy.py`). With
`optimizer.grad_accum = A` the batch is split into A micro-batches (row r goes to micro-batch
r % A, so each stays spread over every device), their gradients are summed in a `scan`, and
one optimizer update follows; each micro-batch's loss is divided by the token count of the
whole batch, so A micro-batches give the same update as one.

Only the trained parameters are differentiated and updated: `TrainSetup.split` takes the
nested params apart into trained and frozen trees (no flat paths, no zero gradients), and
frozen ones enter the forward pass as constants under `stop_gradient`, so a frozen vision
tower (which sits before every trained parameter) runs forward only, and a frozen LLM
(stage 1) computes input gradients but no weight gradients. A non-finite loss or gradient
norm leaves params and optimizer state unchanged (`nonfinite = 1` in the metrics); the step
counter still advances so the data does not repeat.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llava_jax.data.schema import BATCH_FIELDS
from llava_jax.models import lora
from llava_jax.nn.attention_kernels import FusedAttention, attention_kernel
from llava_jax.nn.chunks import over_positions
from llava_jax.nn.cross_entropy import LossImpl, blockwise_cross_entropy, resolve_loss
from llava_jax.sharding import BATCH_AXES, batch_sharding
from llava_jax.train.state import TrainState

if TYPE_CHECKING:
    from llava_jax.train.setup import TrainSetup


METRICS = (
    "loss",  # mean CE over supervised tokens
    "accuracy",  # argmax == target, over supervised tokens
    "num_tokens",  # supervised tokens in the global batch
    "grad_norm",  # global norm of the trained gradients, before clipping
    "param_norm",  # global norm of the trained parameters, after the update
    "lr",  # learning rate of this update (the "train" group)
    "vision_lr",  # the vision tower's learning rate (only when it trains)
    "nonfinite",  # 1 when the update was skipped
)


def step_rng(seed: int, step: jax.Array) -> jax.Array:
    """The per-step key: `fold_in(key(seed), step)` (LoRA dropout's masks come from it)."""
    return jax.random.fold_in(jax.random.key(seed), step)


def token_losses(
    graphdef: nnx.GraphDef,
    params: Mapping,
    batch: Mapping[str, jax.Array],
    chunk: int = 0,
    attention: FusedAttention | None = None,
    loss_impl: LossImpl = LossImpl.CHUNKED,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(CE float32[B, T], correct bool[B, T]) of the model with `params` on `batch`.

    `loss_impl` CHUNKED: with `chunk` (> 0, < T) the vocabulary projection and the loss run
    `chunk` positions of every row at a time and are recomputed in the backward pass, so
    the float32 logits
    [B, T, V] (and their gradient) never exist whole: [B, chunk, V] at a time, for the same
    FLOPs plus one more projection. At T = 8192 and a 152k vocabulary that is the
    difference between 5 GB and 80 GB per row of 16. `attention`: the fused kernel of
    `train.attention` (None = the XLA path). BLOCKWISE: every position at once, vocabulary
    blocks at a time, never the whole logits either (`nn/cross_entropy.py`; `chunk` unused).
    `dropout_key`: the key of this forward's LoRA dropout masks (needed when
    `train.lora.dropout` > 0).
    """
    model = nnx.merge(graphdef, params)
    if dropout_key is not None:
        lora.set_dropout_keys(model, dropout_key)
    hidden = model.hidden_states(
        batch["input_ids"],
        pixel_values=batch["pixel_values"],
        taps=batch["taps"],
        tap_weights=batch["tap_weights"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        attention=attention,
    ).hidden
    targets = batch["targets"]
    unroll = not model.cfg.run.scan_layers  # plan's unrolled compile counts every block
    if loss_impl == LossImpl.BLOCKWISE:
        weight, vocab_axis = model.language_model.vocab_projection(hidden.dtype)
        return blockwise_cross_entropy(
            hidden, weight, targets, vocab_axis=vocab_axis, unroll=unroll
        )

    def losses(h, y):  # float[b, t, D], int32[b, t] -> (float32[b, t], bool[b, t])
        logits = model.language_model.logits(h)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return ce, jnp.argmax(logits, axis=-1) == y

    if chunk <= 0 or hidden.shape[1] <= chunk:
        return losses(hidden, targets)
    return over_positions(losses, (hidden, targets), chunk, unroll=unroll)


def make_train_step(
    setup: TrainSetup,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, batch) -> (state, metrics)`, jitted once with the state donated.

    Args:
      setup: the run's `TrainSetup`: the model (`model_cfg.run`: compute dtype, master
        weights, remat), the trained/frozen split, the optimizer, the mesh and the state's
        shardings. Its config's `train.seed`, `train.loss_chunk`, `optimizer.grad_accum`,
        `train.attention` and `train.loss_impl` (resolved for the mesh's devices, see
        `nn/attention_kernels.py` and `nn/cross_entropy.py`) shape the step.

    The batch is a dict with the BATCH_FIELDS arrays (global shapes; other keys are
    ignored), rows split over (data, fsdp); its row count must divide by grad_accum and
    the micro-batch rows by data * fsdp. Metrics are float32 scalars (see METRICS).
    The returned function has `.jitted` (the `jax.jit` object, e.g. for `.lower`).
    """
    config, mesh, model_cfg = setup.config, setup.mesh, setup.model_cfg
    tx, schedules, graphdef = setup.tx, setup.schedules, setup.graphdef
    accum = int(config.optimizer.grad_accum)
    loss_chunk = int(config.train.loss_chunk)
    attention = attention_kernel(config.train.attention, mesh, model_cfg.run.dtype)
    dropout = setup.lora is not None and setup.lora.dropout > 0
    seed = int(config.train.seed)
    loss_impl = resolve_loss(config.train.loss_impl, mesh)
    if accum < 1:
        raise ValueError(f"optimizer.grad_accum must be >= 1, got {accum}")
    state_sh = setup.shardings
    rows = batch_sharding(mesh)
    micro_rows = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))
    replicated = NamedSharding(mesh, PartitionSpec())
    split_rows = mesh.shape["data"] * mesh.shape["fsdp"]

    def micro_loss(train, frozen, micro, denom, key):
        params = setup.merge(train, jax.lax.stop_gradient(frozen))
        ce, correct = token_losses(
            graphdef, params, micro, loss_chunk, attention, loss_impl, dropout_key=key
        )
        mask = micro["loss_mask"].astype(jnp.float32)
        return jnp.sum(ce * mask) / denom, jnp.sum(correct * mask)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: Mapping[str, jax.Array]):
        batch = {k: jax.lax.with_sharding_constraint(batch[k], rows) for k in BATCH_FIELDS}
        num_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        denom = jnp.maximum(num_tokens, 1.0)
        train, frozen = setup.split(state.params)
        key = step_rng(seed, state.step) if dropout else None
        if accum == 1:
            (loss, correct), grads = grad_fn(train, frozen, batch, denom, key)
        else:

            def to_micro(x):
                b = x.shape[0]
                if b % accum or (b // accum) % split_rows:
                    raise ValueError(
                        f"batch rows {b} must divide by grad_accum ({accum}) times the "
                        f"data * fsdp mesh size ({split_rows})"
                    )
                x = x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(x, micro_rows)

            micros = {k: to_micro(v) for k, v in batch.items()}

            def body(carry, micro_and_index):
                g_sum, l_sum, c_sum = carry
                micro, i = micro_and_index
                micro_key = None if key is None else jax.random.fold_in(key, i)
                (loss, correct), g = grad_fn(train, frozen, micro, denom, micro_key)
                g_sum = jax.tree.map(lambda a, b: a + b.astype(a.dtype), g_sum, g)
                return (g_sum, l_sum + loss, c_sum + correct), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), train)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grads, loss, correct), _ = jax.lax.scan(body, init, (micros, jnp.arange(accum)))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, train)

        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, train)
        new_train = optax.apply_updates(train, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_train = jax.tree.map(keep, new_train, train)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        # Frozen parameters are passed through untouched (not even + 0).
        params = setup.merge(new_train, frozen)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {
            "loss": loss,
            "accuracy": correct / denom,
            "num_tokens": num_tokens,
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(new_train),
            "lr": schedules["train"](state.step),
            "nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        if "vision" in schedules:
            metrics["vision_lr"] = schedules["vision"](state.step)
        metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
        return new_state, metrics

    metric_sh = {k: replicated for k in METRICS if k != "vision_lr" or "vision" in schedules}
    batch_sh = {k: rows for k in BATCH_FIELDS}

    def step_on_mesh(state: TrainState, batch: Mapping[str, jax.Array]):
        # Traced under the mesh, so the models' activation constraints (`sharding.constrain`)
        # apply.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step(state, batch)

    jitted = jax.jit(
        step_on_mesh,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, metric_sh),
        donate_argnums=0,
    )

    def train_step(state: TrainState, batch: Mapping[str, Any]):
        return jitted(state, {k: batch[k] for k in BATCH_FIELDS})

    train_step.jitted = jitted
    return train_step
