"""End-to-end and per-stage parity with transformers, float32 on CPU.

Each case saves a tiny random HF model, converts it with `convert_hf_to_jax`, runs both
implementations on the same inputs and compares, in order, the image features placed at the
image tokens (tower + connector + packing) and the logits, so a failure says which stage
differs. Tolerance: max |difference| <= 1e-4 (float32; observed ~1e-6).
"""

from __future__ import annotations

import hf_tiny
import numpy as np
import pytest
import torch

from llava_jax.conversion.hf_to_jax import convert_hf_to_jax
from llava_jax.conversion.source import load_model
from llava_jax.media.feature_plan import Media, build_feature_plan, check_placeholders

ATOL = 1e-4
IMG, VID = hf_tiny.IMAGE_TOKEN, hf_tiny.VIDEO_TOKEN


def convert(hf_model, tmp_path, **overrides):
    hf_model.save_pretrained(tmp_path / "hf")
    convert_hf_to_jax(tmp_path / "hf", tmp_path / "jax")
    return load_model(tmp_path / "jax", **overrides)


def prompt(media_tokens: list[tuple[int, int]], rng) -> np.ndarray:
    """Token ids: some text, then each (token id, count) block followed by more text."""
    ids = [1] + list(rng.randint(2, 140, size=3))
    for token, count in media_tokens:
        ids += [token] * count + list(rng.randint(2, 140, size=4))
    return np.array([ids], np.int32)


def assert_close(name: str, got, want, atol=ATOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
    diff = np.abs(got - want)
    where = np.unravel_index(np.argmax(diff), diff.shape)
    assert diff.max() <= atol, f"{name}: max |diff| {diff.max():.3g} at {where} (atol {atol})"


def run_ours(model, ids, views_nchw: list[np.ndarray], media: list[Media]):
    """views_nchw: per media item, its views float[V, C, S, S] in HF layout."""
    cfg = model.cfg
    # Pixel rows follow the plan's order: all images, then all videos.
    pairs = list(zip(views_nchw, media, strict=True))
    ordered = [v for v, m in pairs if m.kind == "image"] + [
        v for v, m in pairs if m.kind == "video"
    ]
    pixels = np.concatenate(ordered)[None].transpose(0, 1, 3, 4, 2)  # [1, V, S, S, C]
    plan = build_feature_plan(cfg, [media], max_views=pixels.shape[1])
    check_placeholders(cfg, ids, plan)
    return model(ids, pixel_values=pixels, taps=plan.taps, tap_weights=plan.weights), plan


def hf_image_features(hf_model, **kw) -> np.ndarray:
    with torch.no_grad():
        out = hf_model.model.get_image_features(**kw, return_dict=True).pooler_output
    return torch.cat(list(out)).reshape(-1, out[0].shape[-1]).numpy()


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_llava15(tmp_path, kv_heads, scan):
    hf = hf_tiny.llava(kv_heads=kv_heads)
    model = convert(hf, tmp_path, scan_layers=scan)
    rng = np.random.RandomState(0)
    ids = prompt([(IMG, 9)], rng)
    pixels = rng.randn(1, 3, hf_tiny.CROP, hf_tiny.CROP).astype(np.float32)
    out, plan = run_ours(model, ids, [pixels], [Media.image(42, 42)])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    want = hf_image_features(hf, pixel_values=torch.tensor(pixels))
    assert_close("image features", out.image_features[0, : len(want)], want)
    assert_close("logits", out.logits, ref)


@pytest.mark.parametrize("layers", [-1, (-3, -1)], ids=["last", "concat"])
def test_llava15_feature_layers(tmp_path, layers):
    """A list-valued vision_feature_layer concatenates layers on channels."""
    hf = hf_tiny.llava(feature_layer=list(layers) if isinstance(layers, tuple) else layers)
    model = convert(hf, tmp_path)
    rng = np.random.RandomState(1)
    ids = prompt([(IMG, 9)], rng)
    pixels = rng.randn(1, 3, 42, 42).astype(np.float32)
    out, _ = run_ours(model, ids, [pixels], [Media.image(42, 42)])
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    assert_close("logits", out.logits, ref)


def next_inputs(rng, num_views):
    return rng.randn(num_views, 3, hf_tiny.CROP, hf_tiny.CROP).astype(np.float32)


def check_anyres_image(hf, model, image_hw, seed):
    """One AnyRes image (base view + crops): image features and logits against HF."""
    rng = np.random.RandomState(seed)
    media = [Media.image(*image_hw)]
    plan = build_feature_plan(model.cfg, [media])
    views = next_inputs(rng, plan.num_views[0])
    ids = prompt([(IMG, plan.num_image_tokens[0])], rng)
    out, _ = run_ours(model, ids, [views], media)
    hf_pixels = {"pixel_values": torch.tensor(views)[None], "image_sizes": torch.tensor([image_hw])}
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), **hf_pixels).logits.numpy()
    want = hf_image_features(hf, **hf_pixels)
    assert_close("image features", out.image_features[0, : len(want)], want)
    assert_close("logits", out.logits, ref)


@pytest.mark.parametrize(
    "image_hw", [(42, 42), (30, 50), (100, 40), (20, 130)], ids=["square", "wide", "tall", "1x3"]
)
def test_llava_next(tmp_path, image_hw):
    hf = hf_tiny.llava_next()
    check_anyres_image(hf, convert(hf, tmp_path), image_hw, seed=2)


def test_llava_next_mistral_sliding_window(tmp_path):
    """Mistral with a window shorter than the prompt, so the window really masks."""
    hf = hf_tiny.llava_next(kv_heads=1, text_kind="mistral", sliding_window=8)
    model = convert(hf, tmp_path)
    assert model.cfg.text.sliding_window == 8
    check_anyres_image(hf, model, (60, 30), seed=3)


@pytest.mark.parametrize(
    "image_hw",
    [(42, 42), (40, 55), (150, 170), (250, 250), (60, 240)],
    ids=["grid1x1", "grid1x2", "grid4x5-downsampled", "grid6x6-downsampled", "grid2x6"],
)
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_onevision_single_image(tmp_path, image_hw, tie):
    hf = hf_tiny.llava_onevision(tie=tie)
    check_anyres_image(hf, convert(hf, tmp_path), image_hw, seed=4)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_onevision_multi_image_and_video(tmp_path, scan):
    """Two images (one view + one newline each) and a 3-frame video in one prompt."""
    hf = hf_tiny.llava_onevision(kv_heads=1)
    model = convert(hf, tmp_path, scan_layers=scan)
    rng = np.random.RandomState(5)
    media = [Media.image(50, 80), Media.video(3), Media.image(90, 30)]
    plan = build_feature_plan(model.cfg, [media], max_views=8)
    assert plan.num_image_tokens[0] == 2 * (9 + 1)  # g*g + newline per image
    assert plan.num_video_tokens[0] == 3 * 4 + 1  # ceil(3/2)^2 per frame + one newline
    images = [rng.randn(1, 3, 42, 42).astype(np.float32) for _ in range(2)]
    video = rng.randn(3, 3, 42, 42).astype(np.float32)
    # Text order: image, video, image. Features still follow HF: images in order, then video.
    ids = prompt([(IMG, 10), (VID, 13), (IMG, 10)], rng)
    out, _ = run_ours(model, ids, [images[0], video, images[1]], media)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids),
            pixel_values=torch.tensor(np.stack(images)),  # [images, 1 view, C, S, S]
            image_sizes=torch.tensor([[50, 80], [90, 30]]),
            batch_num_images=torch.tensor([2]),
            pixel_values_videos=torch.tensor(video)[None],
        ).logits.numpy()
    assert_close("logits", out.logits, ref)


def test_batch_with_left_padding(tmp_path):
    """Two samples of different lengths in one batch, the shorter one left-padded."""
    hf = hf_tiny.llava_next(kv_heads=2)
    model = convert(hf, tmp_path)
    rng = np.random.RandomState(6)
    media = [[Media.image(42, 84)], [Media.image(84, 42)]]
    plan = build_feature_plan(model.cfg, media, max_views=3)
    views = [next_inputs(rng, 3) for _ in media]
    rows = [prompt([(IMG, n)], rng)[0] for n in plan.num_image_tokens]
    rows[1] = rows[1][:-3]
    length = max(map(len, rows))
    ids = np.zeros((2, length), np.int32)
    mask = np.zeros((2, length), np.int32)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :], mask[b, length - len(row) :] = row, 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
    pixels = np.stack(views).transpose(0, 1, 3, 4, 2)
    out = model(
        ids,
        pixel_values=pixels,
        taps=plan.taps,
        tap_weights=plan.weights,
        positions=positions,
        segment_ids=mask,
    )
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions, dtype=torch.long),
            pixel_values=torch.tensor(np.stack(views)),
            image_sizes=torch.tensor([m[0].image_hw for m in media]),
        ).logits.numpy()
    valid = mask.astype(bool)
    assert_close("logits (non-padding)", np.asarray(out.logits)[valid], ref[valid])
