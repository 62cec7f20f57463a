"""AnyRes geometry vs tables derived from both references (transformers'
`llava_next` / `llava_onevision` image processors and modeling files; haotian-liu/LLaVA and
LLaVA-VL/LLaVA-NeXT `llava/mm_utils.py`, `llava/model/llava_arch.py`) and vs transformers'
own functions."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlavaNextConfig, LlavaOnevisionConfig
from transformers.image_processing_utils import get_patch_output_size
from transformers.image_processing_utils import (
    select_best_resolution as hf_select_best_resolution,
)
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.llava_onevision import modeling_llava_onevision as hf_ov

# The PIL image processors: the torchvision ones need torchvision, which we do not install.
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.processing_llava_onevision import (
    LlavaOnevisionProcessor,
)

from llava_jax.media import anyres

NEXT = dict(
    pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], crop=336, g=24
)
OV = dict(pinpoints=[[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)], crop=384, g=27)
# The original repos read each pinpoint as (W, H): in our (H, W) terms, transposed.
ORIG_NEXT_PINPOINTS = [[w, h] for h, w in NEXT["pinpoints"]]


def _random_sizes(n=300, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(1, 1), (13, 7), (7, 13), (100, 800), (800, 100), (8000, 6000), (6000, 8000)]
    sizes += [(1, 8000), (8000, 1), (2, 3), (336, 336), (384, 384), (1156, 948), (704, 1496)]
    log_hw = rng.uniform(0, np.log(8000), size=(n, 2))
    sizes += [tuple(int(v) for v in np.exp(row).round().clip(1, 8000)) for row in log_hw]
    aspect = rng.integers(16, 1000, size=n // 4)
    sizes += [(int(a), int(8 * a)) for a in aspect] + [(int(8 * a), int(a)) for a in aspect]
    return sizes


SIZES = _random_sizes()
FAMILIES = {"next": NEXT, "onevision": OV}


def test_default_pinpoints_match_transformers():
    assert LlavaNextConfig().image_grid_pinpoints == NEXT["pinpoints"]
    assert LlavaOnevisionConfig().image_grid_pinpoints == OV["pinpoints"]
    assert LlavaOnevisionImageProcessorPil.image_grid_pinpoints == OV["pinpoints"]


# LLaVA-NeXT, derived by running both references' geometry on these sizes:
# (H, W), HF canvas, grid, unpadded, HF tokens, orig canvas, orig tokens.
NEXT_TABLE = [
    ((336, 336), (336, 672), (1, 2), (24, 24), 1176, (672, 336), 1176),
    ((176, 110), (336, 672), (1, 2), (24, 16), 984, (672, 336), 1526),
    ((480, 640), (672, 672), (2, 2), (36, 48), 2340, (672, 672), 2340),
    ((640, 480), (672, 672), (2, 2), (48, 36), 2352, (672, 672), 2352),
    ((1080, 1920), (672, 672), (2, 2), (28, 48), 1948, (672, 672), 1948),
    ((300, 1200), (336, 1008), (1, 3), (18, 72), 1890, (336, 1008), 1890),
    ((1000, 1000), (672, 672), (2, 2), (48, 48), 2928, (672, 672), 2928),
    ((704, 1496), (336, 1008), (1, 3), (24, 52), 1848, (336, 1008), 1800),
]


@pytest.mark.parametrize("hw, canvas, grid, unpadded, tokens, orig_canvas, orig_tokens", NEXT_TABLE)
def test_next_table(hw, canvas, grid, unpadded, tokens, orig_canvas, orig_tokens):
    layout = anyres.anyres_layout(hw, NEXT["pinpoints"], NEXT["crop"], NEXT["g"])
    assert (layout.canvas_hw, layout.grid, layout.unpadded_hw) == (canvas, grid, unpadded)
    assert layout.target_hw is None and layout.final_hw == unpadded
    assert layout.num_tokens == tokens
    assert anyres.num_image_tokens_next(hw, NEXT["pinpoints"], 336, 24) == tokens
    orig = anyres.anyres_layout(hw, ORIG_NEXT_PINPOINTS, 336, 24, rounding="int")
    assert orig.canvas_hw == orig_canvas and orig.num_tokens == orig_tokens


def test_next_int_rounding_differs_for_704x1496():
    assert anyres.num_image_tokens_next((704, 1496), NEXT["pinpoints"], 336, 24, "int") == 1800
    assert anyres.unpadded_shape((24, 72), (704, 1496), "int") == (0, 24, 11, 61)
    assert anyres.unpadded_shape((24, 72), (704, 1496), "round") == (0, 24, 10, 62)


# OneVision anyres_max_9 (transformers `llava_onevision`, the same way):
# (H, W), best, grid, unpadded, resize target, tokens.
OV_TABLE = [
    ((384, 384), (384, 384), (1, 1), (27, 27), None, 1485),
    ((100, 100), (384, 384), (1, 1), (27, 27), None, 1485),
    ((480, 640), (768, 768), (2, 2), (40, 54), None, 2929),
    ((300, 1200), (384, 1536), (1, 4), (27, 108), None, 3672),
    ((1080, 1920), (1152, 1920), (3, 5), (75, 135), (60, 108), 7269),
    ((1000, 1000), (1152, 1152), (3, 3), (81, 81), None, 7371),
    ((2304, 2304), (2304, 2304), (6, 6), (162, 162), (81, 81), 7371),
    ((1156, 948), (1536, 1152), (4, 3), (98, 81), None, 8765),
]


@pytest.mark.parametrize("hw, canvas, grid, unpadded, target, tokens", OV_TABLE)
def test_onevision_table(hw, canvas, grid, unpadded, target, tokens):
    layout = anyres.anyres_layout(hw, OV["pinpoints"], OV["crop"], OV["g"], max_num_patches=9)
    assert (layout.canvas_hw, layout.grid, layout.unpadded_hw) == (canvas, grid, unpadded)
    assert layout.target_hw == target
    assert layout.num_tokens == tokens
    assert anyres.num_image_tokens_onevision(hw, OV["pinpoints"], 384, 27) == tokens


def test_single_view_and_video_counts():
    assert anyres.num_image_tokens_multi_image(27) == 730
    assert anyres.pooled_tokens_per_side(27) == 14 and anyres.pooled_tokens_per_side(24) == 12
    assert anyres.num_video_tokens_onevision(1, 27) == 197
    assert anyres.num_video_tokens_onevision(32, 27) == 196 * 32 + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_canvas_and_grid_match_transformers(family):
    fam = FAMILIES[family]
    for hw in SIZES:
        canvas = anyres.select_best_resolution(hw, fam["pinpoints"])
        assert canvas == tuple(hf_select_best_resolution(hw, fam["pinpoints"])), hw
        # get_patch_output_size only reads the shape: a broadcast view costs no memory.
        image = np.broadcast_to(np.zeros((), np.uint8), (1, *hw))
        expected = get_patch_output_size(image, canvas, ChannelDimension.FIRST)
        resized = anyres.resized_size_for_patching(hw, canvas)
        assert resized == tuple(expected), hw
        padding = LlavaOnevisionImageProcessorPil._get_padding_size(None, resized, canvas)
        top, bottom, left, right = anyres.patching_padding(resized, canvas)
        assert ((top, bottom), (left, right)) == padding, hw
        grid = anyres.anyres_grid_shape(hw, fam["pinpoints"], fam["crop"])
        assert grid == hf_ov.get_anyres_image_grid_shape(hw, fam["pinpoints"], fam["crop"])
        num_patches = hf_ov.image_size_to_num_patches(hw, fam["pinpoints"], fam["crop"])
        assert grid[0] * grid[1] + 1 == num_patches, hw


@pytest.mark.parametrize("family", FAMILIES)
def test_unpad_matches_transformers(family):
    fam = FAMILIES[family]
    for hw in SIZES:
        rows, cols = anyres.anyres_grid_shape(hw, fam["pinpoints"], fam["crop"])
        cur = (rows * fam["g"], cols * fam["g"])
        grid = torch.arange(cur[0] * cur[1]).reshape(1, *cur)
        top, bottom, left, right = anyres.unpadded_shape(cur, hw)
        assert torch.equal(grid[:, top:bottom, left:right], hf_ov.unpad_image(grid, list(hw))), hw


def _next_processor():
    # Built without __init__ (which wants a tokenizer): _get_number_of_features reads only these.
    proc = object.__new__(LlavaNextProcessor)
    proc.image_processor = SimpleNamespace(image_grid_pinpoints=NEXT["pinpoints"])
    proc.patch_size = 14
    proc.num_additional_image_tokens = 1  # CLIP's CLS, removed again by the "default" strategy
    return proc


def _onevision_processor():
    proc = object.__new__(LlavaOnevisionProcessor)
    proc.image_processor = SimpleNamespace(image_grid_pinpoints=OV["pinpoints"])
    proc.num_image_tokens = 729
    proc.vision_aspect_ratio = "anyres_max_9"
    return proc


def test_token_counts_match_transformers_processors():
    next_proc, ov_proc = _next_processor(), _onevision_processor()
    for h, w in SIZES:
        expected_next = next_proc._get_number_of_features(h, w, 336, 336) - 1
        assert anyres.num_image_tokens_next((h, w), NEXT["pinpoints"], 336, 24) == expected_next
        expected_ov = ov_proc._get_number_of_features(h, w, 384, 384)
        assert anyres.num_image_tokens_onevision((h, w), OV["pinpoints"], 384, 27) == expected_ov


def _pack_with_layout(features, newline, layout, g):
    """Reference packing from the host-side layout alone (numpy, float64)."""
    rows, cols = layout.grid
    channels = features.shape[-1]
    x = features[1:].reshape(rows, cols, g, g, channels).transpose(4, 0, 2, 1, 3)
    x = x.reshape(channels, rows * g, cols * g)
    top, bottom, left, right = layout.unpad
    x = x[:, top:bottom, left:right]
    if layout.target_hw is not None:
        i0, i1, a0, a1 = anyres.bilinear_taps(x.shape[1], layout.target_hw[0])
        x = a0[:, None] * x[:, i0] + a1[:, None] * x[:, i1]
        j0, j1, b0, b1 = anyres.bilinear_taps(x.shape[2], layout.target_hw[1])
        x = b0 * x[:, :, j0] + b1 * x[:, :, j1]
    x = np.concatenate([x, np.broadcast_to(newline[:, None, None], (*x.shape[:2], 1))], axis=-1)
    return np.concatenate([features[0], x.reshape(channels, -1).T])


@pytest.mark.parametrize("hw", [row[0] for row in OV_TABLE] + SIZES[:: len(SIZES) // 25])
def test_layout_reproduces_transformers_pack_image_features(hw):
    rng = np.random.default_rng(hw[0] * 10007 + hw[1])
    layout = anyres.anyres_layout(hw, OV["pinpoints"], OV["crop"], OV["g"], max_num_patches=9)
    views = 1 + layout.grid[0] * layout.grid[1]
    features = rng.standard_normal((views, OV["g"] ** 2, 2))
    newline = rng.standard_normal(2)
    config = SimpleNamespace(
        vision_config=SimpleNamespace(image_size=384, patch_size=14),
        image_grid_pinpoints=OV["pinpoints"],
    )
    packed, lens = hf_ov.LlavaOnevisionModel.pack_image_features(
        SimpleNamespace(config=config),
        [torch.from_numpy(features)],
        torch.tensor([hw]),
        image_newline=torch.from_numpy(newline),
        vision_aspect_ratio="anyres_max_9",
    )
    assert lens.tolist() == [layout.num_tokens]
    ours = _pack_with_layout(features, newline, layout, OV["g"])
    np.testing.assert_allclose(ours, packed[0].numpy(), rtol=0, atol=1e-12)


TAP_PAIRS = [(27, 14), (75, 60), (135, 108), (162, 81), (5, 3), (3, 5), (1, 1)]


@pytest.mark.parametrize("pair_h, pair_w", list(itertools.product(TAP_PAIRS, TAP_PAIRS)))
def test_bilinear_taps_match_torch(pair_h, pair_w):
    (in_h, out_h), (in_w, out_w) = pair_h, pair_w
    x = np.random.default_rng(in_h * 1000 + in_w).standard_normal((in_h, in_w))
    i0, i1, a0, a1 = anyres.bilinear_taps(in_h, out_h)
    j0, j1, b0, b1 = anyres.bilinear_taps(in_w, out_w)
    assert i0.dtype == i1.dtype == np.int64 and a0.dtype == a1.dtype == np.float64
    np.testing.assert_array_equal(a0 + a1, 1.0)
    assert 0 <= i0.min() and max(i0.max(), i1.max()) < in_h
    rows = a0[:, None] * x[i0] + a1[:, None] * x[i1]
    ours = b0 * rows[:, j0] + b1 * rows[:, j1]
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x)[None, None], size=(out_h, out_w), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    assert np.abs(ours - expected).max() < 1e-12


def test_parse_anyres_max():
    assert anyres.parse_anyres_max("anyres_max_9") == 9
    assert anyres.parse_anyres_max("anyres_max_16") == 16
    assert anyres.parse_anyres_max("anyres") is None
    for bad in ["anyres_max_", "anyres_max_0", "anyres_max_9x", "pad", "square", "Anyres_max_9"]:
        with pytest.raises(ValueError, match="vision_aspect_ratio"):
            anyres.parse_anyres_max(bad)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="multiple of crop_size=336"):
        anyres.anyres_grid_shape((500, 500), [[500, 500]], 336)
    with pytest.raises(ValueError, match="no pinpoints"):
        anyres.select_best_resolution((10, 10), [])
    with pytest.raises(ValueError, match="positive"):
        anyres.anyres_layout((0, 10), NEXT["pinpoints"], 336, 24)
    with pytest.raises(ValueError, match="rounding"):
        anyres.unpadded_shape((24, 48), (10, 10), rounding="floor")
