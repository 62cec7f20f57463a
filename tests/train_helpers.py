"""A tiny LLaVA config, training configs and random batches for the train-step tests.

Also run as a script by `test_train_multiprocess.py`: each process builds its half of the
same batches and prints the losses as JSON.
"""

from __future__ import annotations

import numpy as np

from llava_jax.config import LlavaConfig, TextConfig, VisionConfig
from llava_jax.media.feature_plan import Media, build_feature_plan
from llava_jax.train.defaults import base_config

IMAGE_TOKEN = 63
# Distinct widths (vision 24, text 32) so a test can tell the tower's matmuls apart.
TINY = LlavaConfig(
    vision=VisionConfig(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
    ),
    text=TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    ),
    image_token_id=IMAGE_TOKEN,
)
STAGE1 = ("multi_modal_projector/.*",)
STAGE2 = ("multi_modal_projector/.*", "language_model/.*")


def train_config(trainable=STAGE2, **changes):
    """base_config() with float32 compute and the given `section.field` changes."""
    c = base_config()
    c.train.trainable = tuple(trainable)
    c.optimizer.lr = 1e-2
    c.optimizer.warmup_ratio = 0.0
    c.optimizer.weight_decay = 0.01
    for key, value in changes.items():
        section, field = key.split("__")
        c[section][field] = value
    return c


def model_config(**overrides) -> LlavaConfig:
    """TINY with architecture fields or run settings changed."""
    return TINY.with_fields(**overrides)


def train_setup(config, mesh, total_steps: int = 10, **model_overrides):
    """The `TrainSetup` of `config` on the tiny model (`model_config(**model_overrides)`)."""
    from llava_jax.train.setup import TrainSetup

    cfg = model_config(**model_overrides)
    return TrainSetup.build(config, total_steps, mesh=mesh, model_cfg=cfg)


def random_batch(seed: int, rows: int = 8, length: int = 16) -> dict[str, np.ndarray]:
    """BATCH_FIELDS arrays: each row = BOS, 4 image tokens, text, then padding."""
    rng = np.random.RandomState(seed)
    cfg = TINY
    plan = build_feature_plan(cfg, [[Media.image(28, 28)]] * rows, max_views=1)
    n_img = plan.num_image_tokens[0]
    input_ids = np.zeros((rows, length), np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    loss_mask = np.zeros((rows, length), np.float32)
    for r in range(rows):
        used = rng.randint(n_img + 4, length + 1)
        input_ids[r, :used] = rng.randint(2, 60, size=used)
        input_ids[r, 1 : 1 + n_img] = IMAGE_TOKEN
        segment_ids[r, :used] = 1
        loss_mask[r, 1 + n_img : used - 1] = 1.0  # predict the text after the image
    targets = np.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()
    return {
        "input_ids": input_ids,
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": segment_ids,
        "positions": positions,
        "pixel_values": rng.randn(rows, 1, 28, 28, 3).astype(np.float32),
        "view_mask": np.ones((rows, 1), bool),
        "taps": plan.taps,
        "tap_weights": plan.weights,
    }


def run_losses(mesh, steps: int = 3, accum: int = 1, trainable=STAGE2, local_rows=None):
    """Losses of `steps` updates from the same random init on `mesh`.

    `local_rows(batch) -> this process's rows` for multi-process runs (default: all rows).
    """
    from llava_jax.sharding import shard_batch
    from llava_jax.train.state import init_state
    from llava_jax.train.step import make_train_step

    config = train_config(trainable, optimizer__grad_accum=accum)
    setup = train_setup(config, mesh)
    state = init_state(setup, rng=0)
    step = make_train_step(setup)
    losses = []
    for i in range(steps):
        batch = random_batch(100 + i)
        if local_rows is not None:
            batch = local_rows(batch)
        state, metrics = step(state, shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return losses


if __name__ == "__main__":  # one process of the multi-process test
    import json
    import sys

    import jax

    port, pid = int(sys.argv[1]), int(sys.argv[2])
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from llava_jax.sharding import make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)

    def half(batch):
        n = len(batch["input_ids"]) // 2
        return {k: v[pid * n : (pid + 1) * n] for k, v in batch.items()}

    print("LOSSES " + json.dumps(run_losses(mesh, local_rows=half)), flush=True)
    jax.distributed.shutdown()
