"""Training-step throughput of llava-jax against PyTorch transformers + AdamW, same run.

A LLaVA-1.5-shaped model, random weights, float32 compute and weights on both sides (the
like-for-like setting; this Xeon does have AMX-BF16, but bfloat16 is not measured here): a
CLIP-style tower (d=384, 4 layers, 224 px, patch 14: 256 image tokens), the mlp2x_gelu
connector, and a LLaMA decoder (d=512, 8 layers, 32k vocabulary; 66M parameters in all, 58M
trained). The transformers model is built first and its weights converted, so both sides
train the same weights on the same batch (B rows of T tokens, one image per row, the text
after the image supervised). Stage-2 style: the vision tower frozen (torch: requires_grad
False and its forward under `torch.no_grad`), connector + LLM trained with AdamW (same lr,
betas, eps, no weight decay, constant schedule) and global-norm clipping 1.0; torch's AdamW
is the fused CPU kernel.

For each llava-jax variant (remat x scan_layers) it compiles the step (reported separately),
then alternates one torch step and one llava-jax step for `--steps` steps, so both see the
same machine load; step times are medians. The first steps' losses of both are printed as a
sanity check (same weights, same batch, same optimizer: they agree to ~1e-4).

    python benchmarks/train_step.py [--batch 2] [--seq-len 512] [--steps 6] [--width 512]
        [--variants none:scan full:scan none:unroll full:unroll]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CPU is what is measured

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from llava_jax.conversion.hf_to_jax import convert_hf_to_jax  # noqa: E402
from llava_jax.data import batching  # noqa: E402
from llava_jax.data.schema import BATCH_FIELDS, Example  # noqa: E402
from llava_jax.media.feature_plan import Media, num_tokens  # noqa: E402
from llava_jax.model_io import load_config, load_params  # noqa: E402
from llava_jax.sharding import make_mesh, shard_batch  # noqa: E402
from llava_jax.train.defaults import base_config  # noqa: E402
from llava_jax.train.setup import TrainSetup  # noqa: E402
from llava_jax.train.state import init_state  # noqa: E402
from llava_jax.train.step import make_train_step  # noqa: E402

IMAGE_TOKEN = 32000
LR, BETAS, EPS, CLIP = 2e-5, (0.9, 0.999), 1e-8, 1.0


def build_hf(width: int, layers: int) -> transformers.LlavaForConditionalGeneration:
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
        image_size=224, patch_size=14, projection_dim=384,
    )  # fmt: skip
    text = transformers.LlamaConfig(
        vocab_size=32064, hidden_size=width, intermediate_size=width * 8 // 3 // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=width // 64, num_key_value_heads=width // 64,
        max_position_embeddings=4096, rms_norm_eps=1e-5,
    )  # fmt: skip
    cfg = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
        projector_hidden_act="gelu", vision_feature_layer=-2,
        vision_feature_select_strategy="default", image_seq_length=256,
    )  # fmt: skip
    return transformers.LlavaForConditionalGeneration(cfg)


def make_batch(cfg, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """One 224 px image at token 1 of each row; the text after the image is supervised."""
    rng = np.random.default_rng(0)
    media = (Media.image(224, 224),)
    n_img = num_tokens(cfg, media[0])
    examples = []
    for i in range(batch):
        ids = rng.integers(2, IMAGE_TOKEN, seq_len).astype(np.int32)
        ids[0] = 1
        ids[1 : 1 + n_img] = IMAGE_TOKEN
        trained = np.zeros(seq_len, bool)
        trained[1 + n_img :] = True
        views = rng.standard_normal((1, 224, 224, 3)).astype(np.float32)
        examples.append(Example.build(cfg, f"r{i}", ids, trained, views, media))
    shape = batching.BatchShape.for_model(cfg, batch, seq_len, 1, n_img)
    return batching.pad_batch(examples, shape, cfg)


class TorchTrainer:
    """transformers LLaVA in train mode, frozen tower under no_grad, fused AdamW."""

    def __init__(self, hf, host: dict[str, np.ndarray]):
        self.hf = hf.train()
        tower = hf.model.vision_tower
        tower.requires_grad_(False)
        tower.forward = torch.no_grad()(tower.forward)
        self.params = [p for p in hf.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            self.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, fused=True
        )
        ids = torch.tensor(host["input_ids"], dtype=torch.long)
        # HF shifts labels itself: label[t] supervises logits[t - 1], like our loss_mask[t - 1].
        trained = np.zeros_like(host["loss_mask"], bool)
        trained[:, 1:] = host["loss_mask"][:, :-1] > 0
        labels = torch.where(torch.tensor(trained), ids, torch.tensor(-100))
        pixels = torch.tensor(host["pixel_values"][:, 0].transpose(0, 3, 1, 2).copy())
        self.inputs = dict(input_ids=ids, pixel_values=pixels, labels=labels)

    def step(self) -> float:
        loss = self.hf(**self.inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


def train_config(batch: int, seq_len: int):
    config = base_config()
    o = config.optimizer
    o.lr, (o.b1, o.b2), o.eps, o.grad_clip = LR, BETAS, EPS, CLIP
    o.weight_decay, o.warmup_ratio, o.schedule = 0.0, 0.0, "constant"
    config.train.batch_size = batch
    config.data.max_len = seq_len
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    return config


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run_variant(name, base_cfg, params, host, torch_trainer, torch_log, args):
    remat, layout = name.split(":")
    cfg = base_cfg.with_run(
        dtype="float32", remat_policy=remat, vision_remat_policy=remat, scan_layers=layout == "scan"
    )
    config = train_config(args.batch, args.seq_len)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    setup = TrainSetup.build(config, 1000, mesh=mesh, model_cfg=cfg)
    state = init_state(setup, params={k: v.copy() for k, v in params.items()})
    step = make_train_step(setup)
    batch = shard_batch(host, mesh, BATCH_FIELDS)

    def jax_step():
        nonlocal state
        state, metrics = step(state, batch)
        return float(metrics["loss"])  # blocks until the step is done

    first_s, first_loss = timed(jax_step)
    print(f"  {name}: compile + first step {first_s:.1f} s", flush=True)
    jax_times, jax_losses, torch_times = [], [first_loss], []
    for _ in range(args.steps):
        t, loss = timed(torch_trainer.step)
        torch_times.append(t)
        torch_log.append(loss)
        t, loss = timed(jax_step)
        jax_times.append(t)
        jax_losses.append(loss)
        print(f"  {name}: torch {torch_times[-1]:.2f} s, jax {t:.2f} s", flush=True)
    del state
    jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
    # Each torch step and the llava-jax step right after it saw about the same load.
    paired = statistics.median(a / b for a, b in zip(torch_times, jax_times, strict=True))
    return dict(name=name, compile_s=first_s - jax_s, jax_s=jax_s, torch_s=torch_s,
                paired=paired, jax_losses=jax_losses, load=os.getloadavg()[0])  # fmt: skip


def time_pieces(name, base_cfg, params, host, torch_trainer, rounds: int):
    """Median seconds of forward (loss) and forward + backward (loss and the trained
    gradients) on both sides, alternating, to see where a step's time goes."""
    import jax.numpy as jnp
    from flax import nnx

    from llava_jax.models.build import abstract_model
    from llava_jax.param_paths import flat_to_nested
    from llava_jax.train.step import token_losses

    remat, layout = name.split(":")
    cfg = base_cfg.with_run(
        remat_policy=remat, vision_remat_policy=remat, scan_layers=layout == "scan"
    )
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    batch = shard_batch(host, mesh, BATCH_FIELDS)
    graphdef = nnx.split(abstract_model(cfg), nnx.Param)[0]
    nested = flat_to_nested(params)
    frozen = {"vision_tower": nested["vision_tower"]}
    trained = {k: v for k, v in nested.items() if k != "vision_tower"}

    def loss(trained, frozen):
        ce, _ = token_losses(graphdef, {**trained, **jax.lax.stop_gradient(frozen)}, batch)
        return jnp.sum(ce * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    fwd, grad = jax.jit(loss), jax.jit(jax.value_and_grad(loss))
    hf, inputs = torch_trainer.hf, torch_trainer.inputs

    def torch_fwd():
        with torch.no_grad():
            hf(**inputs).loss.item()

    def torch_grad():
        hf(**inputs).loss.backward()
        hf.zero_grad(set_to_none=True)

    pieces = {
        "jax forward": lambda: float(fwd(trained, frozen)),
        "jax forward+backward": lambda: jax.block_until_ready(grad(trained, frozen)),
        "torch forward": torch_fwd,
        "torch forward+backward": torch_grad,
    }
    for fn in pieces.values():
        fn()  # compile / warm up
    times = {k: [] for k in pieces}
    for _ in range(rounds):
        for k, fn in pieces.items():
            times[k].append(timed(fn)[0])
    for k, ts in times.items():
        print(f"  {name} {k:<24} {statistics.median(ts):6.2f} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side per variant")
    parser.add_argument("--width", type=int, default=512, help="LLaMA hidden size")
    parser.add_argument("--layers", type=int, default=8, help="LLaMA layers")
    parser.add_argument("--variants", nargs="+",
                        default=["none:scan", "full:scan", "none:unroll", "full:unroll"],
                        help="REMAT:scan|unroll (remat: none, full, dots, ...)")  # fmt: skip
    parser.add_argument("--pieces", type=int, default=0, metavar="ROUNDS",
                        help="also time forward and forward+backward of both sides for the "
                             "first variant, ROUNDS alternating rounds")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    work = tempfile.mkdtemp()
    hf = build_hf(args.width, args.layers)
    hf.save_pretrained(f"{work}/hf")
    convert_hf_to_jax(f"{work}/hf", f"{work}/jax")
    base_cfg = load_config(f"{work}/jax")
    params = {k: np.array(v) for k, v in load_params(f"{work}/jax").items()}
    host = make_batch(base_cfg, args.batch, args.seq_len)
    trainer = TorchTrainer(hf, host)
    total = sum(p.numel() for p in hf.parameters())
    trained = sum(p.numel() for p in trainer.params)
    tokens = args.batch * args.seq_len
    print(f"model: {total / 1e6:.0f}M params ({trained / 1e6:.0f}M trained), B={args.batch}, "
          f"T={args.seq_len} (256 image tokens per row), float32, {os.cpu_count()} CPU "
          f"threads; load average {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    if args.pieces:
        time_pieces(args.variants[0], base_cfg, params, host, trainer, args.pieces)
    if args.steps < 1:
        return
    torch_log: list[float] = []
    t0, loss0 = timed(trainer.step)  # torch warm-up and its step-1 loss on the fresh weights
    torch_log.append(loss0)
    print(f"torch first step {t0:.2f} s", flush=True)
    rows = []
    for name in args.variants:
        r = run_variant(name, base_cfg, params, host, trainer, torch_log, args)
        rows.append(r)
        k = min(3, len(r["jax_losses"]))
        diffs = [abs(a - b) for a, b in zip(r["jax_losses"][:k], torch_log[:k], strict=True)]
        print(f"{name:<12} jax {r['jax_s']:6.2f} s/step {tokens / r['jax_s']:7.1f} tok/s | "
              f"torch {r['torch_s']:6.2f} s/step {tokens / r['torch_s']:7.1f} tok/s | "
              f"{r['torch_s'] / r['jax_s']:5.2f}x (paired {r['paired']:.2f}x) | "
              f"compile {r['compile_s']:5.1f} s | load {r['load']:.1f}", flush=True)  # fmt: skip
        ours = np.round(r["jax_losses"][:k], 6).tolist()
        theirs = np.round(torch_log[:k], 6).tolist()
        print(f"  first {k} losses: jax {ours} torch {theirs}, max |diff| {max(diffs):.1e}")
    best = max(rows, key=lambda r: r["paired"])
    print(f"best: {best['name']} {best['paired']:.2f}x (median of per-pair ratios)")


if __name__ == "__main__":
    main()
