"""Image loading and preprocessing vs transformers' PIL-backend image processors.

Every comparison is exact (max |diff| == 0, well inside the 1e-5 the issue asks for): the
same PIL resizes on uint8 and the same float32 arithmetic give the same bits.
"""

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image
from transformers import (
    LlavaImageProcessorPil,
    LlavaNextImageProcessorPil,
    LlavaOnevisionImageProcessorPil,
)
from transformers.image_utils import load_image as hf_load_image

from llava_jax.config import LlavaConfig
from llava_jax.media import feature_plan
from llava_jax.media.feature_plan import Media
from llava_jax.media.image_processing import (
    ImageError,
    image_hw,
    load_image,
    preprocess_image,
    preprocess_images,
)
from llava_jax.media.processor_config import ImageProcessorConfig

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# preprocessor_config.json as released (llava-hf/llava-1.5-7b-hf, llava-v1.6-*-hf, onevision).
HF_JSON = {
    "llava": {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
              "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "resample": 3,
              "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "rescale_factor": 1 / 255,
              "processor_class": "LlavaProcessor"},
    "llava_next": {"image_processor_type": "LlavaNextImageProcessor", "do_pad": True,
                   "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
                   "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336],
                                            [336, 1008]], "image_mean": CLIP_MEAN,
                   "image_std": CLIP_STD},
    "llava_onevision": {"image_processor_type": "LlavaOnevisionImageProcessor", "do_pad": True,
                        "size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3,
                        "image_std": [0.5] * 3, "resample": 3, "do_convert_rgb": True,
                        "image_grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7)
                                                 for j in range(1, 7)]},
}  # fmt: skip
HF_CLASSES = {
    "llava": LlavaImageProcessorPil,
    "llava_next": LlavaNextImageProcessorPil,
    "llava_onevision": LlavaOnevisionImageProcessorPil,
}
MODELS = {
    "llava": LlavaConfig.llava15_7b(),
    "llava_next": LlavaConfig.llava_next_vicuna_7b(),
    "llava_onevision": LlavaConfig.onevision_qwen2("0.5b"),
}
# (family, HF do_pad for llava, multi-image)
MODES = {
    "crop": ("llava", False, False),
    "pad": ("llava", True, False),
    "next": ("llava_next", False, False),
    "onevision": ("llava_onevision", False, False),
    "onevision-multi": ("llava_onevision", False, True),
}


def _hf_kwargs(d):
    return {k: v for k, v in d.items() if not k.endswith(("_type", "_class"))}


def _processors(mode):
    family, do_pad, multi = MODES[mode]
    d = dict(HF_JSON[family], **({"do_pad": True} if do_pad else {}))
    return HF_CLASSES[family](**_hf_kwargs(d)), ImageProcessorConfig.from_hf(d, family), multi


def _hf_views(proc, images, multi):
    """transformers' pixel_values per image as channels-last float32[V, S, S, 3]."""
    out = proc(images=[images] if multi else images)["pixel_values"]
    out = [np.asarray(v) for v in out]
    return [(v[None] if v.ndim == 3 else v).transpose(0, 2, 3, 1) for v in out]


def _image(h, w, seed=0):
    """Gradients plus noise: structure for the resizes, no flat regions that hide offsets."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * 7 + y * 3) % 256], -1)
    return Image.fromarray((a + rng.integers(0, 48, a.shape)).clip(0, 255).astype(np.uint8))


def _check(proc, cfg, images, multi, model):
    # One image per call outside multi-image samples: HF pads a batch's views to its maximum.
    refs = (
        _hf_views(proc, images, True)
        if multi
        else [_hf_views(proc, [im], False)[0] for im in images]
    )
    for image, ref in zip(images, refs, strict=True):
        ours = preprocess_image(image, cfg, multi_image=multi)
        w, h = image.size
        assert ours.image_hw == (h, w)
        assert ours.views.dtype == np.float32 and ours.views.shape == ref.shape
        np.testing.assert_array_equal(ours.views, ref)
        # The model's geometry agrees on how many views this image has, and its layout, handed
        # to the preprocessing (as the training transform does), cuts the same views.
        layout = feature_plan.media_layout(model, Media.image(h, w), len(images) if multi else 1)
        assert len(ours.views) == layout.num_views
        given = preprocess_image(image, cfg, multi_image=multi, layout=layout.anyres)
        np.testing.assert_array_equal(given.views, ref)


def test_a_layout_of_another_image_is_refused():
    _, cfg, _ = _processors("next")
    model = MODELS["llava_next"]
    layout = feature_plan.media_layout(model, Media.image(300, 700)).anyres
    with pytest.raises(ValueError, match=r"AnyRes layout for a \(300, 700\) image"):
        preprocess_image(_image(700, 300), cfg, layout=layout)


SIZES = [(1, 1), (13, 7), (7, 13), (37, 296), (296, 37), (333, 517), (1080, 1920), (768, 384)]


@pytest.mark.parametrize("mode", list(MODES))
def test_pixels_match_transformers(mode):
    proc, cfg, multi = _processors(mode)
    model = MODELS[MODES[mode][0]]
    images = [_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    if multi:  # HF pads a multi-image sample only with 2+ images in it
        for pair in zip(images[::2], images[1::2], strict=True):
            _check(proc, cfg, list(pair), True, model)
    else:
        _check(proc, cfg, images, False, model)


@pytest.mark.parametrize("mode", ["pad", "onevision"])
def test_huge_image_matches_transformers(mode):
    proc, cfg, multi = _processors(mode)
    image = Image.fromarray(np.asarray(_image(600, 800)).repeat(10, 0).repeat(10, 1))  # 8000x6000
    _check(proc, cfg, [image], multi, MODELS[MODES[mode][0]])


def _png(image, **kw):
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _modes():
    rgb = _image(41, 67)
    alpha = Image.fromarray(np.tile(np.arange(67, dtype=np.uint8)[None] * 3, (41, 1)))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    la = rgb.convert("L")
    la.putalpha(alpha)
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    return {
        "L": _png(rgb.convert("L")),
        "RGBA": _png(rgba),
        "LA": _png(la),
        "P": _png(pal),
        "P+transparency": _png(pal, transparency=int(np.asarray(pal)[0, 0])),
        "1": _png(rgb.convert("1")),
        "GIF": _gif(rgb),
        "BMP": _encoded(rgb, "BMP"),
        "WEBP-RGBA": _encoded(rgba, "WEBP", lossless=True),
    }


def _encoded(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gif(image):
    return _encoded(image.convert("P", palette=Image.Palette.ADAPTIVE), "GIF", transparency=0)


@pytest.mark.parametrize("name", list(_modes()))
@pytest.mark.parametrize("mode", ["pad", "onevision"])
def test_color_modes_convert_as_transformers(name, mode):
    """HF given the decoded PIL image composites transparency onto white; so do we."""
    data = _modes()[name]
    proc, cfg, multi = _processors(mode)
    ref = _hf_views(proc, [Image.open(io.BytesIO(data))], multi)[0]
    np.testing.assert_array_equal(preprocess_image(load_image(data), cfg).views, ref)
    # A raw, unconverted PIL image goes through the same conversion.
    raw = preprocess_image(Image.open(io.BytesIO(data)), cfg).views
    np.testing.assert_array_equal(raw, ref)


def test_rgba_is_composited_onto_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(load_image(_png(rgba))).tolist() == [[[255, 255, 255]] * 4] * 4


def _exif_jpeg(orientation, h=30, w=50):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encoded(_image(h, w), "JPEG", exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_as_transformers_load_image(orientation, tmp_path):
    data = _exif_jpeg(orientation)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    ours = load_image(path)
    ref = hf_load_image(str(path))  # exif_transpose + convert("RGB")
    assert ours.size == ref.size == ((30, 50) if orientation in (6, 8) else (50, 30))
    assert image_hw(path) == (ours.height, ours.width)  # from the header alone
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    proc, cfg, _ = _processors("next")
    np.testing.assert_array_equal(
        preprocess_image(ours, cfg).views, _hf_views(proc, [ref], False)[0]
    )


def test_array_inputs():
    proc, cfg, _ = _processors("onevision")
    rgb = np.asarray(_image(50, 70))
    gray = rgb[..., 0]
    ref = _hf_views(proc, [Image.fromarray(gray)], False)[0]
    np.testing.assert_array_equal(preprocess_image(gray, cfg).views, ref)
    np.testing.assert_array_equal(
        preprocess_image(rgb, cfg).views, preprocess_image(Image.fromarray(rgb), cfg).views
    )
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(rgb.astype(np.float32), cfg)


def test_multi_image_sample_uses_one_view_per_image_only_for_onevision():
    images = [_image(400, 1200), _image(1200, 400)]
    for mode, views in [("onevision", [1, 1]), ("next", [4, 4])]:
        _, cfg, _ = _processors(mode)
        assert [len(p.views) for p in preprocess_images(images, cfg)] == views
        model = MODELS[MODES[mode][0]]
        assert views == [feature_plan.num_views(model, Media.image(400, 1200), 2)] * 2
    _, cfg, _ = _processors("onevision")
    alone = feature_plan.num_views(MODELS["llava_onevision"], Media.image(400, 1200), 1)
    assert len(preprocess_images(images[:1], cfg)[0].views) == alone == 1 + 2 * 4  # AnyRes


@pytest.mark.parametrize("mode", ["pad", "crop", "onevision-multi"])
def test_thin_images_cannot_allocate_gigabytes(mode):
    """1 x 300000 pixels is a tiny file; padded to a square or resized to a 336 shortest edge
    it would be 9e10 or 1e8 pixels. transformers allocates them; we refuse."""
    _, cfg, multi = _processors(mode)
    with pytest.raises(ValueError, match="aspect ratio is too extreme"):
        preprocess_image(np.zeros((1, 300_000, 3), np.uint8), cfg, multi_image=multi)
    _, cfg, _ = _processors("onevision")  # AnyRes canvases are bounded by the pinpoints
    views = preprocess_image(np.zeros((1, 300_000, 3), np.uint8), cfg).views
    assert len(views) == feature_plan.num_views(MODELS["llava_onevision"], Media.image(1, 300_000))


# -- errors ----------------------------------------------------------------------------------


def _bomb_png(width, height):
    """A PNG header claiming width x height: decoding would allocate it; Pillow must refuse."""
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "make, cause",
    [
        (lambda p: p / "missing.jpg", "cannot read the file"),
        (lambda p: p, "cannot read the file"),  # a directory
        (lambda p: _write(p, b"hello, I am text"), "not an image"),
        (lambda p: _write(p, b"II*\x00" + b"\x00" * 64), "unsupported format TIFF"),
        (lambda p: _write(p, _exif_jpeg(1, 300, 400)[:2000]), "corrupt or truncated"),
        (lambda p: _write(p, _png(_image(40, 40))[:-30]), "corrupt or truncated"),
        (lambda p: _write(p, _bomb_png(100_000, 100_000)), "decompression bomb"),  # > 2x limit
        (lambda p: _write(p, _bomb_png(10_000, 10_000)), "decompression bomb"),  # warning tier
    ],
    ids=[
        "missing",
        "directory",
        "text",
        "tiff",
        "truncated-jpeg",
        "truncated-png",
        "bomb",
        "bomb-warning",
    ],  # fmt: skip
)
def test_load_errors_are_one_line_and_name_the_file(tmp_path, make, cause):
    path = make(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak out as a warning either
        with pytest.raises(ImageError) as info:
            load_image(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)) and cause in message


def _write(directory, data):
    path = directory / "file.img"
    path.write_bytes(data)
    return path


def test_load_errors_from_bytes_and_max_pixels():
    with pytest.raises(ImageError, match="^<bytes>: not an image"):
        load_image(b"\x00" * 10)
    data = _png(_image(40, 50))
    assert load_image(data, max_pixels=2000).size == (50, 40)
    with pytest.raises(ImageError, match="decompression bomb: 50x40 = 2000 pixels, over 1999"):
        load_image(data, max_pixels=1999)
    assert isinstance(ImageError("x"), ValueError)


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(HF_JSON))
def test_released_configs_and_defaults_agree_with_the_model(family):
    model = MODELS[family]
    cfg = ImageProcessorConfig.from_hf(HF_JSON[family], family)
    cfg.check_model(model)
    assert cfg.view_size == model.vision.image_size
    default = ImageProcessorConfig.for_model(model)
    default.check_model(model)
    # The defaults differ from HF only where the original does: 1.5 pads instead of cropping.
    expected = {"llava": "pad", "llava_next": "anyres", "llava_onevision": "anyres_max_9"}
    assert default.aspect_ratio == expected[family]
    assert cfg == default.__class__(**{**default.__dict__, "aspect_ratio": cfg.aspect_ratio})


def test_from_hf_missing_keys_take_transformers_class_defaults():
    cfg = ImageProcessorConfig.from_hf({}, "llava_onevision")
    ref = LlavaOnevisionImageProcessorPil()
    assert cfg.size == (ref.size.height, ref.size.width) and cfg.image_mean == ref.image_mean
    assert cfg.image_grid_pinpoints == tuple(tuple(p) for p in ref.image_grid_pinpoints)
    assert ImageProcessorConfig.from_hf({"do_pad": True}, "llava").aspect_ratio == "pad"
    assert ImageProcessorConfig.from_hf({"size": 336, "crop_size": 336}, "llava").view_size == 336
    nulls = ImageProcessorConfig.from_hf({"crop_size": None, "do_center_crop": None}, "llava")
    assert nulls.crop_size == (224, 224) and nulls.do_center_crop  # null = class default


@pytest.mark.parametrize(
    "d, family, match",
    [
        ({"size": {"shortest_edge": 336, "longest_edge": 672}}, "llava", "shortest_edge"),
        ({"reducing_gap": 2.0}, "llava", "unsupported keys \\['reducing_gap'\\]"),
        ({"do_flip_channel_order": True}, "llava_next", "may change pixels"),
        ({"image_processor_type": "SiglipImageProcessor"}, "llava_onevision", "not an image"),
        ({"image_mean": [0.5, 0.5]}, "llava", "3 values"),
        ({"size": {"shortest_edge": 336}, "do_center_crop": False}, "llava", "square"),
        ({"size": {"height": 384, "width": 512}}, "llava_onevision", "square"),
        ({"image_grid_pinpoints": [[384, 500]]}, "llava_onevision", None),
    ],
)
def test_from_hf_refuses_what_it_does_not_implement(d, family, match):
    if match is None:  # a pinpoint that crops do not tile fails when the image is processed
        cfg = ImageProcessorConfig.from_hf(d, family)
        with pytest.raises(ValueError, match="not a multiple of crop_size"):
            preprocess_image(_image(10, 10), cfg)
        return
    with pytest.raises(ValueError, match=match):
        ImageProcessorConfig.from_hf(d, family)


def test_aspect_ratio_is_checked_against_the_family():
    with pytest.raises(ValueError, match="needs 'crop' or 'pad'"):
        ImageProcessorConfig.from_hf({}, "llava", aspect_ratio="anyres")
    with pytest.raises(ValueError, match="needs 'anyres'"):
        ImageProcessorConfig.from_hf({}, "llava_next", aspect_ratio="pad")
    with pytest.raises(ValueError, match="anyres_max_N"):
        ImageProcessorConfig.from_hf({}, "llava_onevision", aspect_ratio="anyres_max_x")
    cfg = ImageProcessorConfig.from_hf({"vision_aspect_ratio": "anyres_max_4"}, "llava_onevision")
    assert cfg.aspect_ratio == "anyres_max_4"


def test_from_pretrained_reads_the_file_or_uses_defaults(tmp_path):
    model = MODELS["llava"]
    assert ImageProcessorConfig.from_pretrained(tmp_path, model).aspect_ratio == "pad"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(HF_JSON["llava"]))
    assert ImageProcessorConfig.from_pretrained(tmp_path, model).aspect_ratio == "crop"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"crop_size": 224}))
    with pytest.raises(ValueError, match="224px views, the vision tower takes 336px"):
        ImageProcessorConfig.from_pretrained(tmp_path, model)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"bogus": 1}))
    with pytest.raises(ValueError, match="preprocessor_config.json: .*bogus"):
        ImageProcessorConfig.from_pretrained(tmp_path, model)
