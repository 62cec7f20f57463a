"""`feature_plan.media_layouts`: each media item's views and tokens, worked out once, in
arithmetic, and always the feature plan's own lengths."""

from __future__ import annotations

import pytest
from tiny_configs import LLAVA, NEXT, ONEVISION

from llava_jax.data.prompt import media_token_counts
from llava_jax.media import anyres, feature_plan
from llava_jax.media.feature_plan import Media, build_feature_plan, media_layouts, sample_plan

SAMPLES = [
    [Media.image(30, 50)],
    [Media.image(200, 40)],
    [Media.image(90, 90), Media.image(17, 300)],
    [Media.video(3)],
    [Media.image(64, 48), Media.video(2)],
    [],
]


def _cases():
    for cfg in (LLAVA, NEXT, ONEVISION):
        for media in SAMPLES:
            if cfg is ONEVISION or all(m.kind == "image" for m in media):
                yield pytest.param(cfg, media, id=f"{cfg.family}-{len(media)}-{media[:1]}")


@pytest.mark.parametrize("cfg, media", list(_cases()))
def test_layouts_are_the_plans_lengths(cfg, media):
    layouts = media_layouts(cfg, media)
    taps, _, n_image, n_video = sample_plan(cfg, media)
    tokens = {kind: sum(lo.num_tokens for lo in layouts if lo.media.kind == kind)
              for kind in ("image", "video")}  # fmt: skip
    assert (tokens["image"], tokens["video"]) == (n_image, n_video)
    assert len(taps) == n_image + n_video
    plan = build_feature_plan(cfg, [media])
    assert plan.num_views == (sum(lo.num_views for lo in layouts),)
    max_patches = 9 if cfg is ONEVISION else None  # ONEVISION is anyres_max_9
    for lo in layouts:
        if lo.anyres is not None:  # the tiling is the one AnyRes geometry, views included
            want = anyres.anyres_layout(lo.media.image_hw, cfg.image_grid_pinpoints,
                                        cfg.vision.image_size, cfg.vision.patches_per_side,
                                        max_patches)  # fmt: skip
            assert lo.anyres == want
            assert lo.num_views == 1 + want.grid[0] * want.grid[1]


def test_multi_image_onevision_sample_takes_one_view_per_image():
    layouts = media_layouts(ONEVISION, [Media.image(90, 90), Media.image(17, 300)])
    assert [(lo.num_views, lo.num_tokens, lo.anyres) for lo in layouts] == [(1, 10, None)] * 2


def test_token_counts_build_no_tap_array(monkeypatch):
    media = [Media.image(90, 90), Media.video(2)]
    want = [len(sample_plan(ONEVISION, media[:1])[0]), sample_plan(ONEVISION, media[1:])[3]]

    def no_taps(*args):
        raise AssertionError("token counts built a tap array")

    monkeypatch.setattr(feature_plan, "_image_taps", no_taps)
    monkeypatch.setattr(feature_plan, "_video_taps", no_taps)
    assert media_token_counts(ONEVISION, media) == want
    assert feature_plan.num_tokens(ONEVISION, Media.image(90, 90)) == want[0]
