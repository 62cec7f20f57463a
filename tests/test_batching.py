"""Batch arrays: right padding and packing against hand-written arrays, packing parity with
the model, and LLaVA's modality/length grouping."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from llava_jax.checks import tiny_hf
from llava_jax.config import LlavaConfig
from llava_jax.conversion.hf_config import from_hf_config
from llava_jax.data import batching
from llava_jax.data.batching import BatchShape
from llava_jax.data.schema import BATCH_FIELDS, Example, RawRecord
from llava_jax.media import feature_plan
from llava_jax.media.feature_plan import Media
from llava_jax.models.build import abstract_model

IMG, VID = tiny_hf.IMAGE_TOKEN, tiny_hf.VIDEO_TOKEN


@functools.cache
def tiny_config(family: str) -> LlavaConfig:
    """The LlavaConfig of tiny_hf's model of `family`, without building the torch model."""
    common = dict(vision_config=tiny_hf.clip_config(), image_token_index=IMG)
    if family == "llava":
        hf = transformers.LlavaConfig(
            **common, text_config=tiny_hf.llama_config(), image_seq_length=9
        )
    elif family == "llava_next":
        hf = transformers.LlavaNextConfig(
            **common,
            text_config=tiny_hf.llama_config(),
            image_grid_pinpoints=tiny_hf.NEXT_PINPOINTS,
        )
    else:
        hf = transformers.LlavaOnevisionConfig(
            vision_config=tiny_hf.siglip_config(),
            text_config=tiny_hf.qwen2_config(),
            image_token_index=IMG,
            video_token_index=VID,
            image_grid_pinpoints=tiny_hf.OV_PINPOINTS,
            vision_aspect_ratio="anyres_max_9",
        )
    return from_hf_config(hf.to_dict())


def make_example(cfg, id_, media, text_len, seed=0, trained=None):
    """Random text tokens, then each medium's tokens (images first, then videos), then text."""
    rng = np.random.default_rng(seed)
    _, _, n_image, n_video = feature_plan.sample_plan(cfg, media)
    n_img_media = sum(m.kind == "image" for m in media)
    n_views = sum(feature_plan.num_views(cfg, m, n_img_media) for m in media)
    head = rng.integers(1, 100, 2)
    tail = rng.integers(1, 100, text_len)
    ids = np.concatenate([head, [IMG] * n_image, [VID] * n_video, tail]).astype(np.int32)
    if trained is None:
        trained = np.zeros(len(ids), bool)
        trained[-text_len // 2 :] = True
    s = cfg.vision.image_size
    views = rng.normal(size=(n_views, s, s, 3)).astype(np.float32)
    return Example.build(cfg, id_, ids, np.asarray(trained, bool), views, tuple(media))


def text_example(id_, ids, trained, cfg):
    s = cfg.vision.image_size
    return Example.build(
        cfg, id_, np.asarray(ids, np.int32), np.asarray(trained, bool), np.zeros((0, s, s, 3)), ()
    )


def random_model(cfg: LlavaConfig, seed: int = 0) -> nnx.Module:
    """LlavaModel(cfg) with N(0, 0.2) parameters, filled from abstract shapes (eager nnx
    initialisation takes tens of seconds on a busy CPU)."""
    graphdef, state = nnx.split(abstract_model(cfg))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)


def assert_arrays(got: dict, want: dict):
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=f"field {name!r}")


def test_pad_batch_hand_arrays():
    cfg = tiny_config("llava")  # one view of 9 tokens per image, one tap each
    shape = BatchShape(batch_size=3, max_len=14, max_views=2, max_image_tokens=10,
                       image_size=42, taps_per_token=1)  # fmt: skip
    s = cfg.vision.image_size
    views = np.arange(s * s * 3, dtype=np.float32).reshape(1, s, s, 3)
    a = Example.build(
        cfg,
        "a",
        np.array([5] + [IMG] * 9 + [6, 7], np.int32),
        np.array([0] * 10 + [1, 1], bool),
        views,
        (Media.image(30, 40),),
    )
    b = text_example("b", [8, 9, 10], [0, 1, 1], cfg)
    batch = batching.pad_batch([a, b], shape, cfg)
    assert set(batch) == set(BATCH_FIELDS)
    z2, z3 = [0, 0], [0, 0, 0]
    pixels = np.zeros((3, 2, s, s, 3), np.float32)
    pixels[0, 0] = views[0]
    assert_arrays(
        batch,
        {
            "input_ids": [[5] + [IMG] * 9 + [6, 7] + z2, [8, 9, 10] + [0] * 11, [0] * 14],
            "targets": [[IMG] * 9 + [6, 7] + z3, [9, 10] + [0] * 12, [0] * 14],
            "loss_mask": [[0] * 9 + [1, 1] + z3, [1, 1] + [0] * 12, [0] * 14],
            "segment_ids": [[1] * 12 + z2, [1] * 3 + [0] * 11, [0] * 14],
            "positions": [list(range(12)) + z2, [0, 1, 2] + [0] * 11, [0] * 14],
            "view_mask": [[True, False], [False, False], [False, False]],
            "pixel_values": pixels,
            "taps": np.array([[[p] for p in range(1, 10)] + [[0]], [[0]] * 10, [[0]] * 10]),
            "tap_weights": np.array([[[1]] * 9 + [[0]], [[0]] * 10, [[0]] * 10]),
        },
    )
    assert batch["input_ids"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    assert batch["taps"].dtype == np.int32 and batch["view_mask"].dtype == bool


def test_pack_rows_hand_arrays():
    """Three samples in one row: segments, restarting positions, no target across samples,
    the third sample's taps shifted past the first sample's view."""
    cfg = tiny_config("llava")
    shape = BatchShape(2, max_len=26, max_views=3, max_image_tokens=20, image_size=42,
                       taps_per_token=1)  # fmt: skip
    s = cfg.vision.image_size
    a = Example.build(cfg, "a", np.array([5] + [IMG] * 9 + [6, 7], np.int32),
                      np.array([0] * 10 + [1, 1], bool), np.full((1, s, s, 3), 1.0, np.float32),
                      (Media.image(30, 40),))  # fmt: skip
    b = text_example("b", [8, 9, 10], [0, 1, 1], cfg)
    c = Example.build(cfg, "c", np.array([IMG] * 9 + [11], np.int32),
                      np.array([0] * 9 + [1], bool), np.full((1, s, s, 3), 2.0, np.float32),
                      (Media.image(50, 20),))  # fmt: skip
    batch = batching.pack_rows([[a, b, c]], shape, cfg)
    ids_a, ids_b, ids_c = [5] + [IMG] * 9 + [6, 7], [8, 9, 10], [IMG] * 9 + [11]
    pixels = np.zeros((2, 3, s, s, 3), np.float32)
    pixels[0, 0], pixels[0, 1] = 1.0, 2.0
    assert_arrays(
        batch,
        {
            "input_ids": [ids_a + ids_b + ids_c + [0], [0] * 26],
            "targets": [[IMG] * 9 + [6, 7, 0] + [9, 10, 0] + [IMG] * 8 + [11, 0, 0], [0] * 26],
            "loss_mask": [[0] * 9 + [1, 1, 0] + [1, 1, 0] + [0] * 8 + [1, 0, 0], [0] * 26],
            "segment_ids": [[1] * 12 + [2] * 3 + [3] * 10 + [0], [0] * 26],
            "positions": [list(range(12)) + [0, 1, 2] + list(range(10)) + [0], [0] * 26],
            "view_mask": [[True, True, False], [False] * 3],
            "pixel_values": pixels,
            "taps": np.array([[[p] for p in range(1, 19)] + [[0]] * 2, [[0]] * 20]),
            "tap_weights": np.array([[[1]] * 18 + [[0]] * 2, [[0]] * 20]),
        },
    )


def test_packed_taps_put_the_rows_images_before_its_videos():
    """A video sample then an image sample: the row's image tokens come first (the model
    fills image tokens first), the video taps keep the first sample's views."""
    cfg = tiny_config("llava_onevision")
    p = cfg.tokens_per_view
    video = make_example(cfg, "v", [Media.video(2)], 3, seed=1)
    image = make_example(cfg, "i", [Media.image(50, 120)], 3, seed=2)
    shape = BatchShape.for_model(cfg, 1, max_len=128, max_views=12, max_image_tokens=64)
    batch = batching.pack_rows([[video, image]], shape, cfg)
    v_taps, v_w, _, _ = feature_plan.sample_plan(cfg, video.media)
    i_taps, i_w, n_img, _ = feature_plan.sample_plan(cfg, image.media)
    shifted = np.where(i_taps > 0, i_taps + 2 * p, 0)  # past the video's 2 frames
    n = n_img + len(v_taps)
    np.testing.assert_array_equal(batch["taps"][0, :n], np.concatenate([shifted, v_taps]))
    np.testing.assert_allclose(batch["tap_weights"][0, :n], np.concatenate([i_w, v_w]), 1e-7)
    assert not batch["tap_weights"][0, n:].any()
    assert batch["view_mask"][0].sum() == len(video.views) + len(image.views)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_packed_row_logits_equal_each_sample_alone(family):
    """Packing changes nothing a sample sees: per-token logits equal its own row's."""
    cfg = tiny_config(family)
    if family == "llava_next":  # an AnyRes image (3 views, unpadded grid) + text only
        samples = [
            make_example(cfg, "anyres", [Media.image(30, 70)], 5, seed=1),
            make_example(cfg, "text", [], 7, seed=2),
        ]
    else:  # a video sample before an image sample: the row reorders their taps
        samples = [
            make_example(cfg, "video", [Media.video(2)], 4, seed=3),
            make_example(cfg, "image", [Media.image(50, 120)], 5, seed=4),
            make_example(cfg, "text", [], 3, seed=5),
        ]
    model = random_model(cfg)
    forward = nnx.jit(lambda m, **b: m(**b).logits)
    fields = ("input_ids", "pixel_values", "taps", "tap_weights", "positions", "segment_ids")

    def logits(batch):
        return np.asarray(forward(model, **{k: batch[k] for k in fields}))

    total = sum(len(e.input_ids) for e in samples)
    views = sum(len(e.views) for e in samples)
    tokens = sum(len(e.taps) for e in samples)
    shape = BatchShape.for_model(cfg, 1, total + 3, views + 1, tokens + 2)
    packed_batch = batching.pack_rows([samples], shape, cfg)
    packed = logits(packed_batch)
    start = 0
    for e in samples:
        alone = logits(batching.pad_batch([e], shape, cfg))
        n = len(e.input_ids)
        np.testing.assert_allclose(
            packed[0, start : start + n], alone[0, :n], atol=1e-5, rtol=0, err_msg=e.id
        )
        start += n
    # The check can fail: without segment ids the second sample sees the first.
    merged = dict(packed_batch, segment_ids=(packed_batch["segment_ids"] > 0).astype(np.int32))
    n0 = len(samples[0].input_ids)
    alone = logits(batching.pad_batch([samples[1]], shape, cfg))
    assert not np.allclose(logits(merged)[0, n0 : n0 + 3], alone[0, :3], atol=1e-5)


def test_row_packer_first_fit_in_arrival_order():
    cfg = tiny_config("llava")
    shape = BatchShape(2, max_len=10, max_views=1, max_image_tokens=9, image_size=42,
                       taps_per_token=1)  # fmt: skip
    examples = [text_example(f"t{n}", [1] * n, [1] * n, cfg) for n in (6, 5, 4, 3, 7, 2)]
    batches = batching.first_fit_rows(examples, shape)
    ids = [[[e.id for e in row] for row in rows] for rows in batches]
    # 6 | 5; 4 joins 6 (10); 3 joins 5 (8); 7 fits no row -> next batch; 2 joins 7.
    assert ids == [[["t6", "t4"], ["t5", "t3"]], [["t7", "t2"]]]
    # Views and image tokens are budgets too: two images never share a 1-view row.
    img = [make_example(cfg, f"i{k}", [Media.image(9, 9)], 0, seed=k) for k in range(3)]
    shape = BatchShape(3, max_len=40, max_views=1, max_image_tokens=9, image_size=42,
                       taps_per_token=1)  # fmt: skip
    assert [[e.id for e in r] for r in batching.first_fit_rows(img, shape)[0]] == [
        ["i0"],
        ["i1"],
        ["i2"],
    ]


def test_batching_only_offsets_and_pads(monkeypatch):
    """The batcher reads each example's own plan (built in the Grain worker) and plans
    nothing itself."""
    cfg = tiny_config("llava_onevision")
    rows = [[make_example(cfg, "v", [Media.video(2)], 3, seed=1),
             make_example(cfg, "i", [Media.image(50, 120)], 3, seed=2)]]  # fmt: skip
    shape = BatchShape.for_model(cfg, 1, max_len=128, max_views=12, max_image_tokens=64)
    want = batching.pack_rows(rows, shape, cfg)

    def no_planning(*args, **kwargs):
        raise AssertionError("the batcher built a feature plan")

    monkeypatch.setattr(feature_plan, "sample_plan", no_planning)
    monkeypatch.setattr(feature_plan, "media_layouts", no_planning)
    assert_arrays(batching.pack_rows(rows, shape, cfg), want)


def test_bad_examples_are_rejected_with_their_id():
    cfg = tiny_config("llava")
    shape = BatchShape(1, 8, 1, 9, 42, 1)
    e = make_example(cfg, "short", [Media.image(9, 9)], 2)
    with pytest.raises(ValueError, match="row 0 needs"):
        batching.pad_batch([e], shape, cfg)
    ids = e.input_ids[:-2].copy()
    ids[2] = 7  # one image token fewer than the image needs
    with pytest.raises(ValueError, match="miscount: has 8 image"):
        Example.build(cfg, "miscount", ids, e.trained[:-2], e.views, e.media)


def test_group_by_modality_length():
    rng = np.random.default_rng(0)
    n, g = 103, 8
    lengths = rng.integers(1, 500, n)
    multimodal = rng.random(n) < 0.6
    order = batching.group_by_modality_length(lengths, multimodal, g, seed=3)
    assert sorted(order.tolist()) == list(range(n))
    n_mm, n_text = multimodal.sum(), (~multimodal).sum()
    n_full = n_mm // g + n_text // g
    batches = [order[i * g : (i + 1) * g] for i in range(n_full)]
    for batch in batches:
        assert len(set(multimodal[batch])) == 1, f"mixed batch {batch}"
        assert (np.diff(lengths[batch]) <= 0).all(), f"not longest first: {lengths[batch]}"
    kinds = [bool(multimodal[b[0]]) for b in batches]
    assert True in kinds and False in kinds and kinds != sorted(kinds)  # interleaved
    leftover = order[n_full * g :]
    assert len(leftover) == n_mm % g + n_text % g
    np.testing.assert_array_equal(
        order, batching.group_by_modality_length(lengths, multimodal, g, 3)
    )
    assert not np.array_equal(order, batching.group_by_modality_length(lengths, multimodal, g, 4))


def test_modality_length():
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat"}]
    assert batching.modality_length(RawRecord("a", conv, images=("x.jpg",))) == (6, True)
    assert batching.modality_length(RawRecord("b", conv)) == (6, False)
    assert batching.modality_length(RawRecord("c", "not a list")) == (1, False)
    assert batching.modality_length(RawRecord("d", [None, {"value": 3}])) == (1, False)
