"""Generation: greedy tokens identical to transformers' `generate`, batching, sampling."""

from __future__ import annotations

import hf_tiny
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
from llava_jax.conversion.source import load_model
from llava_jax.inference.generator import Generator, Prompt, SamplingConfig, bucket
from llava_jax.media.feature_plan import Media, build_feature_plan
from llava_jax.nn.attention_kernels import AttentionImpl, FusedAttention
from llava_jax.sharding import make_mesh, shard_model

IMG, VID = hf_tiny.IMAGE_TOKEN, hf_tiny.VIDEO_TOKEN
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (HF model, our Generator), converted once per module."""
    out = {}
    for family, build in hf_tiny.BUILDERS.items():
        tmp = tmp_path_factory.mktemp(family)
        hf = build()
        hf.save_pretrained(tmp / "hf")
        convert_hf_to_jax(tmp / "hf", tmp / "jax")
        out[family] = (hf, Generator(load_model(tmp / "jax")))
    return out


def make_prompt(cfg, media, rng, text_len=5):
    """A prompt with random text around each media item's expanded tokens, and its views."""
    plan = build_feature_plan(cfg, [media])
    ids = [1] + list(rng.randint(3, 140, size=text_len))
    images = [m for m in media if m.kind == "image"]
    per_image = plan.num_image_tokens[0] // max(len(images), 1)
    for m in media:
        if m.kind == "image":
            ids += [IMG] * per_image
        else:
            ids += [VID] * plan.num_video_tokens[0]
        ids += list(rng.randint(3, 140, size=3))
    views = rng.randn(plan.num_views[0], 42, 42, 3).astype(np.float32)
    return Prompt(np.array(ids, np.int32), views, tuple(media))


def hf_generate(hf, prompts, **inputs):
    """transformers greedy generate on a left-padded batch; returns generated ids per row."""
    length = max(len(p.input_ids) for p in prompts)
    ids = np.zeros((len(prompts), length), np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, length - len(p.input_ids) :] = p.input_ids
        mask[row, length - len(p.input_ids) :] = 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
            max_new_tokens=NEW_TOKENS, do_sample=False, **inputs,
        )  # fmt: skip
    eos = hf.generation_config.eos_token_id
    rows = []
    for row in out[:, length:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row)
    return rows


def ours(generator, prompts, **sampling):
    eos = generator.cfg.text.eos_token_id
    stop = (eos,) if isinstance(eos, int) else tuple(eos or ())
    cfg = SamplingConfig(max_new_tokens=NEW_TOKENS, stop_token_ids=stop, **sampling)
    return [g.token_ids for g in generator.generate(prompts, cfg)]


def nchw(views):
    return torch.tensor(views.transpose(0, 3, 1, 2))


def test_llava15_single_image(models):
    hf, gen = models["llava"]
    prompt = make_prompt(gen.cfg, [Media.image(42, 42)], np.random.RandomState(0))
    want = hf_generate(hf, [prompt], pixel_values=nchw(prompt.views))
    assert ours(gen, [prompt]) == want


def test_llava_next_batch_of_two_non_square_images(models):
    """Two prompts of different lengths and different AnyRes grids in one batch."""
    hf, gen = models["llava_next"]
    rng = np.random.RandomState(1)
    prompts = [
        make_prompt(gen.cfg, [Media.image(30, 50)], rng, text_len=9),
        make_prompt(gen.cfg, [Media.image(100, 40)], rng, text_len=2),
    ]
    views = max(len(p.views) for p in prompts)
    pixels = np.zeros((2, views, 3, 42, 42), np.float32)
    for row, p in enumerate(prompts):
        pixels[row, : len(p.views)] = p.views.transpose(0, 3, 1, 2)
    want = hf_generate(
        hf,
        prompts,
        pixel_values=torch.tensor(pixels),
        image_sizes=torch.tensor([[30, 50], [100, 40]]),
    )
    assert ours(gen, prompts) == want
    # Each row alone gives the same tokens as in the batch.
    assert [ours(gen, [p])[0] for p in prompts] == want


@pytest.mark.parametrize("image_hw", [(40, 55), (150, 170)], ids=["grid1x2", "downsampled"])
def test_onevision_single_image(models, image_hw):
    hf, gen = models["llava_onevision"]
    prompt = make_prompt(gen.cfg, [Media.image(*image_hw)], np.random.RandomState(2))
    want = hf_generate(
        hf, [prompt], pixel_values=nchw(prompt.views)[None], image_sizes=torch.tensor([image_hw])
    )
    assert ours(gen, [prompt]) == want


def test_onevision_multi_image_and_video(models):
    hf, gen = models["llava_onevision"]
    media = [Media.image(50, 80), Media.image(90, 30), Media.video(3)]
    prompt = make_prompt(gen.cfg, media, np.random.RandomState(3))
    images, video = prompt.views[:2], prompt.views[2:]
    want = hf_generate(
        hf, [prompt],
        pixel_values=nchw(images)[:, None], image_sizes=torch.tensor([[50, 80], [90, 30]]),
        batch_num_images=torch.tensor([2]), pixel_values_videos=nchw(video)[None],
    )  # fmt: skip
    assert ours(gen, [prompt]) == want


def test_text_only_batch(models):
    hf, gen = models["llava"]
    rng = np.random.RandomState(4)
    prompts = [Prompt(rng.randint(3, 140, size=n).astype(np.int32)) for n in (4, 11)]
    assert ours(gen, prompts) == hf_generate(hf, prompts)


def test_repetition_penalty_matches_transformers(models):
    hf, gen = models["llava"]
    prompt = Prompt(np.random.RandomState(5).randint(3, 140, size=8).astype(np.int32))
    want = hf_generate(hf, [prompt], repetition_penalty=1.3)
    assert ours(gen, [prompt], repetition_penalty=1.3) == want


def test_sampling_is_reproducible_with_a_seed(models):
    _, gen = models["llava_onevision"]
    prompt = Prompt(np.random.RandomState(6).randint(3, 140, size=8).astype(np.int32))
    settings = dict(temperature=1.5, top_k=50, top_p=0.9)
    first = ours(gen, [prompt], seed=7, **settings)
    assert ours(gen, [prompt], seed=7, **settings) == first
    others = [ours(gen, [prompt], seed=s, **settings) for s in (8, 9, 10)]
    assert any(o != first for o in others), "different seeds never changed the sample"


def test_warp_matches_transformers_logits_processors_per_row():
    """Each row's settings filter its logits exactly as transformers' processors (repetition
    penalty, temperature, top-k, top-p, in that order) do for that row alone; ties included."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from llava_jax.inference.generator import warp

    rng = np.random.RandomState(11)
    vocab = 64
    logits = rng.randn(6, vocab).astype(np.float32)
    logits[:, 10:14] = logits[:, 9:10]  # ties at the top-k and top-p cuts
    seen_ids = rng.randint(0, vocab, size=(6, 5))
    rows = [  # temperature, top_k, top_p, repetition_penalty
        (1.0, 0, 1.0, 1.0), (0.7, 5, 1.0, 1.0), (1.3, 0, 0.8, 1.0),
        (0.5, 3, 0.6, 1.4), (2.0, 64, 0.95, 0.8), (1.0, 1, 0.3, 1.0),
    ]  # fmt: skip
    seen = np.zeros((6, vocab), bool)
    np.put_along_axis(seen, seen_ids, True, axis=1)
    temperature, top_k, top_p, penalty = (np.array(col) for col in zip(*rows, strict=True))
    knobs = {"temperature": temperature.astype(np.float32), "top_k": top_k.astype(np.int32),
             "top_p_tail": (1 - top_p).astype(np.float32),
             "repetition_penalty": penalty.astype(np.float32)}  # fmt: skip
    ours = np.asarray(warp(jnp.asarray(logits), jnp.asarray(seen), knobs))
    for i, (temperature, top_k, top_p, penalty) in enumerate(rows):
        ids = torch.tensor(seen_ids[i : i + 1])
        scores = torch.tensor(logits[i : i + 1])
        scores = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
        if top_k:
            scores = TopKLogitsWarper(top_k)(ids, scores)
        scores = TopPLogitsWarper(top_p)(ids, scores)
        want = scores.numpy()[0]
        kept = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(ours[i]), kept, err_msg=f"row {i}: kept set")
        np.testing.assert_allclose(ours[i][kept], want[kept], rtol=1e-6, err_msg=f"row {i}")
        assert 0 < kept.sum() < vocab or (top_k, top_p) in ((0, 1.0), (64, 0.95))


def test_streaming_callback_sees_every_token(models):
    _, gen = models["llava"]
    prompt = Prompt(np.random.RandomState(7).randint(3, 140, size=6).astype(np.int32))
    streamed = []
    result = gen.generate([prompt], SamplingConfig(max_new_tokens=6),
                          on_token=lambda row, tok: streamed.append(tok))  # fmt: skip
    assert streamed == result[0].token_ids and len(streamed) == 6


def test_compiles_once_per_bucket(models):
    """Three prompts with different image sizes and lengths, one shape bucket: one compile
    of prefill and of the decode step, none per token."""
    gen = Generator(nnx.merge(models["llava_next"][1].graphdef, models["llava_next"][1].state))
    rng = np.random.RandomState(8)
    prompts = [make_prompt(gen.cfg, [Media.image(*hw)], rng, n)
               for hw, n in [((30, 50), 3), ((42, 84), 6), ((42, 42), 12)]]  # fmt: skip
    for prompt in prompts:
        gen.generate([prompt], SamplingConfig(max_new_tokens=6, seed=len(prompt.input_ids)))
    assert (gen._prefill._cache_size(), gen._step._cache_size()) == (1, 1)


def test_placeholder_mismatch_is_an_error(models):
    _, gen = models["llava"]
    prompt = make_prompt(gen.cfg, [Media.image(42, 42)], np.random.RandomState(9))
    short = Prompt(prompt.input_ids[:-5][prompt.input_ids[:-5] != IMG][:3].copy(), prompt.views,
                   prompt.media)  # fmt: skip
    with pytest.raises(ValueError, match="image tokens do not match"):
        gen.generate([short])


def test_prompt_longer_than_context_is_an_error(models):
    _, gen = models["llava"]
    prompt = Prompt(np.ones(250, np.int32))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        gen.generate([prompt], SamplingConfig(max_new_tokens=10))


def test_bucket():
    assert [bucket(n) for n in (1, 16, 17, 256, 257, 1500, 8765)] == [
        16, 16, 32, 256, 512, 1536, 8960,
    ]  # fmt: skip


def test_generation_on_a_sharded_mesh(models):
    """FSDP x tensor-parallel weights on 8 CPU devices give the single-device tokens."""
    _, gen = models["llava_onevision"]
    prompt = make_prompt(gen.cfg, [Media.image(150, 170)], np.random.RandomState(10))
    want = ours(gen, [prompt])
    model = nnx.merge(gen.graphdef, jax.tree.map(jnp.copy, gen.state))
    shard_model(model, make_mesh(data=1, fsdp=4, tensor=2))
    sharded = Generator(model)
    kernel = sharded.state["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert tuple(kernel.get_value().sharding.spec) == (None, "fsdp", "tensor")
    assert ours(sharded, [prompt]) == want


def test_prefill_attention_auto_is_the_xla_path_on_cpu(models):
    _, gen = models["llava"]
    assert gen.attention is None
    with pytest.raises(ValueError, match="'splash' does not run on cpu devices"):
        Generator(nnx.merge(gen.graphdef, gen.state), attention="splash")


@pytest.mark.slow  # Pallas' interpreter
def test_prefill_through_the_splash_kernel(models):
    """The prefill (vision tower and decoder) through splash in Pallas' interpreter gives the
    XLA path's greedy tokens: three prompts of different lengths (left padding), rows split
    over data=2, so a fourth row is added for the kernel and dropped."""
    _, gen = models["llava"]
    mesh = make_mesh(2, 1, 1, devices=jax.devices()[:2])
    model = nnx.merge(gen.graphdef, jax.tree.map(jnp.copy, gen.state))
    shard_model(model, mesh)
    traced = []  # `causal` of each kernel call traced: the tower's (False), the decoder's

    class Splash(FusedAttention):
        def __call__(self, *args, causal, **kwargs):
            traced.append(causal)
            return super().__call__(*args, causal=causal, **kwargs)

    fused = Generator(model, attention=Splash(AttentionImpl.SPLASH, mesh, interpret=True))
    rng = np.random.RandomState(20)
    prompts = [make_prompt(gen.cfg, [Media.image(42, 42)], rng, text_len=n) for n in (5, 9, 2)]
    want = ours(gen, prompts)
    assert ours(fused, prompts) == want
    assert set(traced) == {False, True}


def test_media_without_views_is_an_error(models):
    _, gen = models["llava"]
    prompt = make_prompt(gen.cfg, [Media.image(42, 42)], np.random.RandomState(11))
    with pytest.raises(ValueError, match="0 views given, its media need 1"):
        gen.generate([Prompt(prompt.input_ids, None, prompt.media)])


def test_stop_string_ends_a_row(models):
    """A stop string (matched on decoded text) ends generation with finish_reason "stop"."""
    _, gen = models["llava"]
    prompt = Prompt(np.random.RandomState(12).randint(3, 140, size=6).astype(np.int32))
    free = gen.generate([prompt], SamplingConfig(max_new_tokens=6))[0].token_ids
    stopper = Generator.__new__(Generator)
    stopper.__dict__.update(gen.__dict__)
    stopper.decode = lambda ids: "".join(f"<{i}>" for i in ids)
    stop = f"<{free[2]}>"
    out = stopper.generate([prompt], SamplingConfig(max_new_tokens=6, stop_strings=(stop,)))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == free[: free.index(free[2]) + 1]
