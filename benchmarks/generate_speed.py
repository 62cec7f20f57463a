"""Greedy decoding speed of llava-jax against transformers `generate`, same model, same run.

A OneVision-shaped model (SigLIP-style tower d=384, 6 layers at 384 px; Qwen2 decoder d=512,
8 layers, 32k vocabulary), random weights, float32 on the CPU. One 384x384 image per prompt
(1485 image tokens + text). For batch 1 and batch 8 it reports time to first token and decode
tokens/s (tokens after the first, per second, per row x rows) of both, checks that both
produce the same tokens, and reports our compile time separately.

    python benchmarks/generate_speed.py [--new-tokens 64] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from llava_jax.conversion.hf_to_jax import convert_hf_to_jax  # noqa: E402
from llava_jax.conversion.source import load_model  # noqa: E402
from llava_jax.inference.generator import Generator, Prompt, SamplingConfig  # noqa: E402
from llava_jax.media.feature_plan import Media, build_feature_plan  # noqa: E402

IMAGE_TOKEN = 32000


def build_hf(image_token: int = IMAGE_TOKEN):
    torch.manual_seed(0)
    vision = transformers.SiglipVisionConfig(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
        image_size=384, patch_size=14, vision_use_head=False,
    )  # fmt: skip
    text = transformers.Qwen2Config(
        vocab_size=32064, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=True, eos_token_id=None,
    )  # fmt: skip
    cfg = transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=image_token,
        video_token_index=image_token + 1, tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlavaOnevisionForConditionalGeneration(cfg).eval()


class _StepClock(transformers.LogitsProcessor):
    """Records when transformers asks for each new token's logits processing: the first call
    comes right after prefill, each later one after a decode step."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def hf_timed(hf, ids, mask, pixels, sizes, new_tokens):
    """(time to first token, decode tokens/s per row, generated ids) of transformers."""
    clock = _StepClock()
    with torch.no_grad():
        start = time.perf_counter()
        out = hf.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
            pixel_values=torch.tensor(pixels), image_sizes=torch.tensor(sizes),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            logits_processor=transformers.LogitsProcessorList([clock]),
        )  # fmt: skip
    first = clock.times[0] - start
    rate = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
    return first, rate, out[:, ids.shape[1] :].numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    work = tempfile.mkdtemp()
    hf = build_hf()
    hf.save_pretrained(f"{work}/hf")
    convert_hf_to_jax(f"{work}/hf", f"{work}/jax")
    gen = Generator(load_model(f"{work}/jax"))
    rng = np.random.RandomState(0)
    media = (Media.image(384, 384),)
    plan = build_feature_plan(gen.cfg, [media])
    views = rng.randn(plan.num_views[0], 384, 384, 3).astype(np.float32)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    print(f"model: {sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M params, "
          f"image tokens per prompt {plan.num_image_tokens[0]}, {args.new_tokens} new tokens, "
          f"float32, {os.cpu_count()} CPU threads")  # fmt: skip
    print("batch  impl          TTFT s  decode tok/s  speed-up")
    for batch in args.batches:
        prompts = []
        for row in range(batch):
            text = list(rng.randint(10, 30000, size=8 + 3 * row))
            ids = [1, *text[:4], *[IMAGE_TOKEN] * plan.num_image_tokens[0], *text[4:]]
            prompts.append(Prompt(np.array(ids, np.int32), views, media))
        start = time.perf_counter()
        gen.generate(prompts, sampling)  # compile prefill and decode for this bucket
        compile_s = time.perf_counter() - start
        ours = gen.generate(prompts, sampling)
        length = max(len(p.input_ids) for p in prompts)
        ids = np.zeros((batch, length), np.int64)
        mask = np.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, length - len(p.input_ids) :], mask[row, length - len(p.input_ids) :] = (
                p.input_ids, 1)  # fmt: skip
        pixels = np.repeat(views.transpose(0, 3, 1, 2)[None], batch, axis=0)
        first, hf_rate, hf_tokens = hf_timed(hf, ids, mask, pixels, [[384, 384]] * batch,
                                             args.new_tokens)  # fmt: skip
        same = all(list(hf_tokens[r]) == g.token_ids for r, g in enumerate(ours))
        hf_rate = batch * hf_rate
        our_rate = batch * ours[0].decode_tokens_per_s
        print(f"{batch:<6} transformers  {first:6.3f}  {hf_rate:12.1f}")
        print(f"{batch:<6} llava-jax     {ours[0].time_to_first_token_s:6.3f}  {our_rate:12.1f}"
              f"  {our_rate / hf_rate:6.2f}x  (compile+first run {compile_s:.1f} s; "
              f"tokens identical: {same})")  # fmt: skip


if __name__ == "__main__":
    main()
