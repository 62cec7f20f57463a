"""Image loading and preprocessing for every LLaVA family, in NumPy and PIL only.

Pixel reference: transformers' PIL-backend processors (`LlavaImageProcessorPil`,
`LlavaNextImageProcessorPil`, `LlavaOnevisionImageProcessorPil`, v5.24). They resize uint8
images with PIL, rescale in float64 and cast to float32, then normalise in float32. We run the
same PIL resizes and the same float32 arithmetic, bit for bit, but resize the AnyRes canvas
once and normalise all crops in one vectorised pass instead of one PIL round trip per crop.

Geometry (canvas, grid) comes from `media/anyres.py`, which the model's feature plan also
reads, so the views made here are the ones the model expects: views[0] is the base view,
then the crops row-major. Views are channels-last float32[V, S, S, 3].
"""

from __future__ import annotations

import dataclasses
import functools
import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from etils import epath
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from llava_jax.config import Family
from llava_jax.media import anyres
from llava_jax.media.processor_config import ImageProcessorConfig
from llava_jax.paths import is_url

HW = tuple[int, int]
# Opening only these keeps Pillow's other parsers (FITS, PSD, ...) away from untrusted bytes.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")


class ImageError(ValueError):
    """An image that cannot be used; the message is one line naming the file and the cause."""


# -- decoding --------------------------------------------------------------------------------

# Formats we refuse, named so the error says what the file is.
_MAGIC = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"%PDF", "PDF"), (b"8BPS", "PSD"),
          (b"SIMPLE  =", "FITS"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\x00\x00\x01\x00",
          "ICO"), (b"<", "SVG/XML"))  # fmt: skip


def to_rgb(image: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb`: composite any transparency onto white, then RGB.

    Applies to RGBA, LA, PA and P or L with a `transparency` entry. Note that
    `transformers.image_utils.load_image` (HF given a path or URL) instead calls
    `convert("RGB")`, which drops alpha, as the original LLaVA repos do.
    """
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def count_frames(path: str | Path) -> int:
    """Frames in an image file `load_image` has read: over 1 for an animated GIF, WebP or
    PNG, of which `load_image` decodes the first."""
    with Image.open(path, formats=IMAGE_FORMATS) as im:
        return getattr(im, "n_frames", 1)


def load_image(source: str | Path | bytes, max_pixels: int | None = None) -> Image.Image:
    """Decodes an image file into an upright RGB PIL image, or raises `ImageError`.

    EXIF orientation is applied, as `transformers.image_utils.load_image` does, then
    transparency is composited onto white (`to_rgb`). Truncated files are errors, never
    partial images (`ImageFile.LOAD_TRUNCATED_IMAGES` is left off).

    Args:
        source: a path (local, or a URL such as gs://), or the file's bytes.
        max_pixels: refuse images with more pixels; only tightens Pillow's
            `Image.MAX_IMAGE_PIXELS`, whose warning is raised as an error here.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        # catch_warnings is process-wide, not thread-safe; the explicit pixel check below is the
        # gate that does not depend on it.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fp = io.BytesIO(source) if name == "<bytes>" else _open(source)
            with fp:  # the decoded image outlives the file; only frame 0 is read
                im = Image.open(fp, formats=IMAGE_FORMATS)
                limit = min(v for v in (max_pixels, Image.MAX_IMAGE_PIXELS, 2**62) if v)
                if im.width * im.height > limit:
                    raise Image.DecompressionBombError(
                        f"{im.width}x{im.height} = {im.width * im.height} pixels, over {limit}"
                    )
                im.load()  # decode now: truncation and corruption surface here
        ImageOps.exif_transpose(im, in_place=True)
        return to_rgb(im)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise ImageError(f"{name}: cannot read the file ({e.strerror})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: refused as a decompression bomb: {_one_line(e)}") from None
    except UnidentifiedImageError:
        head = source[:16] if name == "<bytes>" else _head(source)
        found = next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)
        cause = f"unsupported format {found}" if found else "not an image (or an unknown format)"
        raise ImageError(f"{name}: {cause}; accepted: {', '.join(IMAGE_FORMATS)}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: corrupt or truncated image: {_one_line(e)}") from None


def image_hw(source: str | Path | bytes) -> HW:
    """The (height, width) `load_image` gives for `source` (a path, local or a URL, or the
    file's bytes), read from its header alone (no decoding), EXIF orientation applied; or
    raises `ImageError`. A truncated file is found only when `load_image` decodes it."""
    is_bytes = isinstance(source, (bytes, bytearray))
    name = "<bytes>" if is_bytes else str(source)
    try:
        fp = io.BytesIO(source) if is_bytes else _open(source)
        with fp, Image.open(fp, formats=IMAGE_FORMATS) as im:
            hw = (im.height, im.width)
            # Orientations 5-8 turn the image a quarter (as `ImageOps.exif_transpose`).
            if im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):
                hw = hw[::-1]
            return hw
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        raise ImageError(f"{name}: cannot read the file ({e.strerror})") from None
    except UnidentifiedImageError:
        head = bytes(source[:16]) if is_bytes else _head(source)
        found = next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)
        cause = f"unsupported format {found}" if found else "not an image (or an unknown format)"
        raise ImageError(f"{name}: {cause}; accepted: {', '.join(IMAGE_FORMATS)}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: corrupt or truncated image: {_one_line(e)}") from None


def _open(path: str | Path):
    """A binary file object for a local path or a URL (gs://, through etils.epath)."""
    return epath.Path(path).open("rb") if is_url(path) else open(path, "rb")  # noqa: SIM115


def _head(path: str | Path) -> bytes:
    with _open(path) as f:
        return f.read(16)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# -- preprocessing ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcessedImage:
    """Views of one image: float32[V, S, S, 3], and its original (height, width)."""

    views: np.ndarray
    image_hw: HW


def preprocess_image(
    image: Image.Image | np.ndarray,
    cfg: ImageProcessorConfig,
    multi_image: bool = False,
    layout: anyres.AnyresLayout | None = None,
) -> ProcessedImage:
    """The normalised views of one image, as the model's feature plan expects them.

    Args:
        image: a PIL image (converted with `to_rgb`), or uint8[H, W] / [H, W, 1|3|4].
        cfg: the image processor config.
        multi_image: the image is one of several in a sample. OneVision then pads it to a
            square with int(255 * mean) and makes one view (HF `batch_num_images > 1`);
            other families ignore it.
        layout: the image's AnyRes tiling when the caller has it already (the model's
            `feature_plan.media_layouts`), so canvas and grid are worked out once per image.

    Returns:
        `ProcessedImage` with V = 1 + rows * cols for AnyRes, else 1.
    """
    img = _as_rgb_image(image, cfg.do_convert_rgb)
    image_hw = (img.height, img.width)
    fill = tuple(int(x * 255) for x in cfg.image_mean)  # HF's pad colour, truncated
    if cfg.is_anyres and not (multi_image and cfg.family == Family.LLAVA_ONEVISION):
        views = _anyres_views(img, cfg, layout)
    else:
        if cfg.is_anyres or cfg.aspect_ratio == "pad":
            img = _pad_to_square(img, fill)
        view = resize_and_crop(img, cfg)
        views = np.empty((1, *view.shape), np.float32)
        views[0] = view
    normalize_(views, cfg)
    return ProcessedImage(views, image_hw)


def _as_rgb_image(image: Image.Image | np.ndarray, convert: bool) -> Image.Image:
    if isinstance(image, Image.Image):
        image = to_rgb(image) if convert else image
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise ValueError(f"image array must be uint8[H, W(, C)], found {arr.dtype}{arr.shape}")
        arr = arr[..., None] if arr.ndim == 2 else arr
        if convert and arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        elif convert and arr.shape[-1] == 4:  # HF's numpy rule: blend onto white, round
            alpha = arr[..., 3:4] / 255
            arr = np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(arr[..., 0] if arr.shape[-1] == 1 else arr))
    if image.mode != "RGB":
        raise ValueError(f"image mode {image.mode} is not RGB and do_convert_rgb is off")
    return image


def pixels_hw(image: Image.Image | np.ndarray) -> HW:
    """(height, width) of a PIL image or an array [H, W(, C)]."""
    return (image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2]


def _resize(image: Image.Image | np.ndarray, hw: HW, resample: int) -> Image.Image | np.ndarray:
    """PIL resize on uint8, as HF's PIL backend does; a same-size resize is PIL's identity."""
    if pixels_hw(image) == tuple(hw):
        return image
    _check_pixels(hw, "resizing")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return image.resize((hw[1], hw[0]), resample=resample)


def _check_pixels(hw: HW, what: str) -> None:
    """A thin image (1 x 80000 is an 80 kB PNG) padded to a square or resized to a shortest
    edge of 336 would allocate gigabytes; transformers does it anyway, we refuse."""
    if Image.MAX_IMAGE_PIXELS and hw[0] * hw[1] > Image.MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{what} would make a {hw[1]}x{hw[0]} image, over Pillow's MAX_IMAGE_PIXELS "
            f"({Image.MAX_IMAGE_PIXELS}); the image's aspect ratio is too extreme"
        )


def _center_crop(arr: np.ndarray, hw: HW) -> np.ndarray:
    """HF's numpy `center_crop`, including its zero padding when the image is smaller."""
    h, w = arr.shape[:2]
    ch, cw = hw
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return arr[top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    pad_top, pad_left = -(-(nh - h) // 2), -(-(nw - w) // 2)
    canvas = np.zeros((nh, nw, arr.shape[2]), arr.dtype)
    canvas[pad_top : pad_top + h, pad_left : pad_left + w] = arr
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


def resize_and_crop(image: Image.Image | np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """HF's per-view tail: resize to `size` (or the shortest edge), then center crop."""
    if cfg.do_resize:
        image = _resize(image, cfg.resize_hw(pixels_hw(image)), cfg.resample)
    arr = np.asarray(image)
    return _center_crop(arr, cfg.crop_size) if cfg.do_center_crop else arr


def _pad_to_square(img: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """HF `pad_to_square` / orig `expand2square`: centred, offset (side - short) // 2."""
    if img.width == img.height:
        return img
    side = max(img.width, img.height)
    _check_pixels((side, side), "padding to a square")
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas


def _anyres_views(
    img: Image.Image, cfg: ImageProcessorConfig, layout: anyres.AnyresLayout | None
) -> np.ndarray:
    """Base view + crops of the chosen canvas, uint8 values in a float32[V, S, S, 3] array."""
    image_hw, ps = (img.height, img.width), cfg.patch_size
    if layout is None:
        canvas_hw = anyres.select_best_resolution(image_hw, cfg.image_grid_pinpoints)
        rows, cols = anyres.anyres_grid_shape(image_hw, cfg.image_grid_pinpoints, ps)
        new_h, new_w = anyres.resized_size_for_patching(image_hw, canvas_hw)
    else:
        canvas_hw, (rows, cols), (new_h, new_w) = layout.canvas_hw, layout.grid, layout.resized_hw
        if layout.image_hw != image_hw or canvas_hw != (rows * ps, cols * ps):
            raise ValueError(
                f"AnyRes layout for a {layout.image_hw} image in {layout.grid} crops of a "
                f"{canvas_hw} canvas does not fit a {image_hw} image in {ps}px crops"
            )
    top, _, left, _ = anyres.patching_padding((new_h, new_w), canvas_hw)
    # HF pads with 0 in uint8, before normalisation: black, not the mean colour.
    canvas = np.zeros((*canvas_hw, 3), np.uint8)
    canvas[top : top + new_h, left : left + new_w] = np.asarray(
        _resize(img, (new_h, new_w), cfg.resample)
    )
    base = resize_and_crop(_resize(img, cfg.base_size, cfg.resample), cfg)
    s = base.shape[0]
    views = np.empty((1 + rows * cols, s, s, 3), np.float32)
    views[0] = base
    crops = canvas.reshape(rows, ps, cols, ps, 3).swapaxes(1, 2)
    if cfg.tail_is_identity((ps, ps)):
        views[1:].reshape(rows, cols, ps, ps, 3)[...] = crops  # the tail is an identity
    else:
        for i, crop in enumerate(crops.reshape(-1, ps, ps, 3)):
            views[1 + i] = resize_and_crop(crop, cfg)
    return views


def normalize_(x: np.ndarray, cfg: ImageProcessorConfig, fused: bool = False) -> None:
    """In place: float32 x holding 0..255 -> rescaled and normalised, HF's float32 result.

    Images (HF PIL backend): float32(float64(u) * rescale_factor), then (x - mean) / std in
    float32. Videos (`fused`, HF torchvision backend): (u - mean / rescale_factor) /
    (std / rescale_factor) in float32, rescale and normalisation folded into one step.
    """
    rescale, mean, std = _normalizer(
        cfg.do_rescale, cfg.rescale_factor, cfg.do_normalize, cfg.image_mean, cfg.image_std, fused
    )
    if rescale == "float64":  # no exact float32 shortcut for this factor: HF's own route
        x[...] = x.astype(np.float64) * cfg.rescale_factor
    elif rescale == "divide":
        x /= np.float32(round(1.0 / cfg.rescale_factor))
    elif rescale == "multiply":
        x *= np.float32(cfg.rescale_factor)
    if mean is not None:
        # Broadcasting a (3,) vector runs numpy's inner loop 3 elements at a time; rows of the
        # mean tiled along the width are ~4x faster and give the same float32 results.
        rows, width = x.reshape(-1, x.shape[-2] * 3), x.shape[-2]
        rows -= np.tile(mean, width)
        rows /= np.tile(std, width)


@functools.cache
def _normalizer(do_rescale, factor, do_normalize, mean, std, fused):
    """(rescale step, float32 mean, float32 std) reproducing HF's arithmetic exactly."""
    m32, s32 = np.array(mean, np.float32), np.array(std, np.float32)
    if fused and do_rescale and do_normalize:
        scale = np.float32(1.0 / factor)  # HF: torch.tensor(mean) * (1.0 / rescale_factor)
        return None, m32 * scale, s32 * scale
    mean_std = (m32, s32) if do_normalize else (None, None)
    if not do_rescale:
        return None, *mean_std
    if fused:
        return "multiply", *mean_std  # torch: uint8 tensor * python float
    # u / 255 in float32 equals HF's float32(float64(u) * (1 / 255)) for every u; check it
    # for this factor rather than assume it.
    u, divisor = np.arange(256, dtype=np.float64), round(1.0 / factor)
    divided = u.astype(np.float32) / np.float32(max(divisor, 1))
    exact = divisor >= 1 and np.array_equal((u * factor).astype(np.float32), divided)
    return ("divide" if exact else "float64"), *mean_std


def preprocess_images(
    images: Sequence[Image.Image | np.ndarray],
    cfg: ImageProcessorConfig,
    layouts: Sequence[anyres.AnyresLayout | None] | None = None,
) -> list[ProcessedImage]:
    """The images of one sample: OneVision treats more than one as multi-image.

    `layouts`, when given, is each image's AnyRes tiling (None where it has none), as
    `preprocess_image` takes it.
    """
    layouts = [None] * len(images) if layouts is None else layouts
    return [
        preprocess_image(im, cfg, multi_image=len(images) > 1, layout=layout)
        for im, layout in zip(images, layouts, strict=True)
    ]
