"""Image loading and preprocessing for every LLaVA family, in NumPy and PIL only.

Pixel reference: transformers' PIL-backend processors (`LlavaImageProcessorPil`,
`LlavaNextImageProcessorPil`, `LlavaOnevisionImageProcessorPil`, v5.24). They resize uint8
images with PIL, rescale in float64 and cast to float32, then normalise in float32. We run the
same PIL resizes and the same float32 arithmetic, bit for bit, but resize the AnyRes canvas
once and normalise all crops in one vectorised pass instead of one PIL round trip per crop.

Geometry (canvas, grid) comes from `data/anyres.py`, which the model's feature plan also
reads, so the views made here are the ones the model expects: views[0] is the base view,
then the crops row-major. Views are channels-last float32[V, S, S, 3].
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava_jax.config import Family, LlavaConfig, VisionKind
from llava_jax.data import anyres

HW = tuple[int, int]
# Opening only these keeps Pillow's other parsers (FITS, PSD, ...) away from untrusted bytes.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


class ImageError(ValueError):
    """An image that cannot be used; the message is one line naming the file and the cause."""


# -- configuration ---------------------------------------------------------------------------

# transformers' class defaults (v5.24), used for keys a preprocessor_config.json leaves out.
_HF_DEFAULTS: dict[Family, dict[str, Any]] = {
    Family.LLAVA: dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                       do_center_crop=True, do_pad=False),
    Family.LLAVA_NEXT: dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                            do_center_crop=True, image_grid_pinpoints=[[336, 672], [672, 336],
                            [672, 672], [1008, 336], [336, 1008]]),
    Family.LLAVA_ONEVISION: dict(size={"height": 384, "width": 384}, crop_size=None,
                                 do_center_crop=False, image_grid_pinpoints=[
                                 [384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]),
}  # fmt: skip
_HF_COMMON = dict(do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255,
                  do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
                  do_convert_rgb=True, default_to_square=False)  # fmt: skip
_HF_TYPES = {
    Family.LLAVA: {"LlavaImageProcessor", "CLIPImageProcessor", "CLIPFeatureExtractor"},
    Family.LLAVA_NEXT: {"LlavaNextImageProcessor"},
    Family.LLAVA_ONEVISION: {"LlavaOnevisionImageProcessor", "LlavaOnevisionVideoProcessor"},
}
# Keys that never change pixels. Anything not here and not parsed below is refused.
_HF_IGNORED = {
    "image_processor_type", "video_processor_type", "feature_extractor_type", "processor_class",
    "_processor_class", "image_seq_length", "num_image_tokens", "vision_feature_select_strategy",
    "data_format", "input_data_format", "device", "return_tensors", "disable_grouping",
    "pad_size", "return_metadata", "video_metadata", "vision_aspect_ratio",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """How images become views, with transformers' field names and meanings.

    Attributes:
        family: the model family; OneVision alone switches multi-image samples to one view.
        aspect_ratio: "crop" (resize the shortest edge, center crop: HF llava), "pad" (pad to
            a square with the mean colour first: original LLaVA-1.5, HF `do_pad=True`),
            "anyres" (NeXT) or "anyres_max_N" (OneVision; same pixels as "anyres").
        size: (height, width) resize target, or None when `shortest_edge` is used.
        shortest_edge: resize the shorter side to this, keeping the aspect ratio.
        crop_size: (height, width) of the center crop; also the AnyRes crop side when set.
        resample: PIL resampling filter (3 = bicubic in every released config).
        image_grid_pinpoints: AnyRes canvases, (height, width) each.
        video_num_frames, video_fps: frames to sample from a video, from a video config with
            `do_sample_frames`; None means every frame given is used (HF's default).
    """

    family: Family
    aspect_ratio: str
    size: HW | None = None
    shortest_edge: int | None = None
    crop_size: HW | None = None
    do_resize: bool = True
    do_center_crop: bool = False
    resample: int = Image.Resampling.BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True
    image_grid_pinpoints: tuple[HW, ...] | None = None
    video_num_frames: int | None = None
    video_fps: float | None = None

    def __post_init__(self):
        # Canonical, hashable field types, whatever the caller passed (lists, ints, str).
        canonical = dict(
            family=Family(self.family),
            image_mean=tuple(float(v) for v in self.image_mean),
            image_std=tuple(float(v) for v in self.image_std),
            size=None if self.size is None else tuple(self.size),
            crop_size=None if self.crop_size is None else tuple(self.crop_size),
            image_grid_pinpoints=None
            if self.image_grid_pinpoints is None
            else tuple(tuple(int(v) for v in p) for p in self.image_grid_pinpoints),
        )
        for name, value in canonical.items():
            object.__setattr__(self, name, value)
        anyres_modes = self.family != Family.LLAVA
        if self.is_anyres != anyres_modes or (not anyres_modes and self.aspect_ratio not in
                                              ("crop", "pad")):  # fmt: skip
            want = "'anyres' or 'anyres_max_N'" if anyres_modes else "'crop' or 'pad'"
            raise ValueError(
                f"aspect_ratio {self.aspect_ratio!r}: family {self.family} needs {want}"
            )
        if self.is_anyres:
            anyres.parse_anyres_max(self.aspect_ratio)  # raises on a malformed N
            if not self.image_grid_pinpoints:
                raise ValueError(f"aspect_ratio {self.aspect_ratio!r} needs image_grid_pinpoints")
        if (self.size is None) == (self.shortest_edge is None):
            raise ValueError("give exactly one of size=(height, width) and shortest_edge")
        if self.do_center_crop and self.crop_size is None:
            raise ValueError("do_center_crop needs crop_size")
        if self.resample not in tuple(Image.Resampling):
            raise ValueError(f"resample {self.resample!r} is not a PIL resampling filter")
        self.view_size  # noqa: B018  (raises when views would not be square)

    @property
    def is_anyres(self) -> bool:
        return self.aspect_ratio.startswith("anyres")

    @property
    def patch_size(self) -> int:
        """AnyRes crop side: HF takes crop_size, else size, else shortest_edge (its order)."""
        if self.crop_size is not None:
            return self.crop_size[0]
        return self.size[0] if self.size is not None else self.shortest_edge

    @property
    def base_size(self) -> HW:
        """AnyRes base view: squashed to `size`, or to shortest_edge x shortest_edge."""
        return self.size if self.size is not None else (self.shortest_edge,) * 2

    def resize_hw(self, image_hw: HW) -> HW:
        """Resize target of HF's `resize` for an image of `image_hw` (torchvision's rule)."""
        if self.size is not None:
            return self.size
        h, w = image_hw
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if w <= h else (self.shortest_edge, new_long)

    def finish_hw(self, image_hw: HW) -> HW:
        """Size after the per-view tail (resize, then center crop) that HF applies to views."""
        hw = self.resize_hw(image_hw) if self.do_resize else image_hw
        return self.crop_size if self.do_center_crop else hw

    def tail_is_identity(self, hw: HW) -> bool:
        """Whether the per-view tail leaves an `hw` image untouched (then crops skip it)."""
        resized = not self.do_resize or self.resize_hw(hw) == hw
        return resized and (not self.do_center_crop or self.crop_size == hw)

    @property
    def view_size(self) -> int:
        """S, the side of every view."""
        if self.is_anyres:
            sizes = {self.finish_hw(self.base_size), self.finish_hw((self.patch_size,) * 2)}
        elif self.do_center_crop:
            sizes = {self.crop_size}
        elif self.do_resize and (self.size is not None or self.aspect_ratio == "pad"):
            sizes = {self.resize_hw((1, 1))}  # "pad" resizes a square: any side will do
        else:
            sizes = set()  # the view would keep the image's own size
        hw = sizes.pop() if len(sizes) == 1 else (0, 1)
        if hw[0] != hw[1]:
            raise ValueError(
                f"views would not be square S x S (size={self.size}, shortest_edge="
                f"{self.shortest_edge}, crop_size={self.crop_size}); the vision tower needs them"
            )
        return hw[0]

    @classmethod
    def from_hf(
        cls, d: dict[str, Any], family: Family | str, aspect_ratio: str | None = None
    ) -> ImageProcessorConfig:
        """From a `preprocessor_config.json` (or `video_preprocessor_config.json`) dict.

        Missing keys take transformers' class defaults for the family. `do_pad` means "pad to
        square" for HF llava and "pad the view axis of a batch" (no pixel change) for NeXT and
        OneVision. Unknown keys are refused, since they might change pixels.

        Args:
            d: the JSON dict.
            family: the model family.
            aspect_ratio: overrides the mode read from `d` (e.g. the model's
                `vision_aspect_ratio`); default "pad"/"crop" from `do_pad` for llava, "anyres"
                for NeXT, `d["vision_aspect_ratio"]` or "anyres_max_9" for OneVision.
        """
        family = Family(family)
        kind = d.get("image_processor_type") or d.get("video_processor_type")
        kind = kind or d.get("feature_extractor_type")
        if kind and kind.removesuffix("Fast").removesuffix("Pil") not in _HF_TYPES[family]:
            raise ValueError(f"preprocessor config: {kind!r} is not an image processor of {family}")
        # HF treats an explicit null like a missing key: the class default applies.
        merged = {**_HF_COMMON, **_HF_DEFAULTS[family]}
        merged.update({k: v for k, v in d.items() if v is not None})
        unknown = sorted(set(merged) - _HF_IGNORED - _PARSED_KEYS)
        if unknown:
            raise ValueError(
                f"preprocessor config: unsupported keys {unknown}; they may change pixels, "
                "so they are refused rather than ignored"
            )
        size = _size_dict(merged["size"], merged["default_to_square"], "size")
        crop = merged.get("crop_size")
        crop = None if crop is None else _size_dict(crop, True, "crop_size")
        if aspect_ratio is None:
            aspect_ratio = {
                Family.LLAVA: "pad" if merged.get("do_pad") else "crop",
                Family.LLAVA_NEXT: "anyres",
                Family.LLAVA_ONEVISION: d.get("vision_aspect_ratio") or "anyres_max_9",
            }[family]
        sample = bool(merged.get("do_sample_frames"))
        pinpoints = merged.get("image_grid_pinpoints")
        return cls(
            family=family,
            aspect_ratio=aspect_ratio,
            size=(size["height"], size["width"]) if "height" in size else None,
            shortest_edge=size.get("shortest_edge"),
            crop_size=None if crop is None else (crop["height"], crop["width"]),
            do_resize=bool(merged["do_resize"]),
            do_center_crop=bool(merged.get("do_center_crop")),
            resample=int(merged["resample"]),
            do_rescale=bool(merged["do_rescale"]),
            rescale_factor=float(merged["rescale_factor"]),
            do_normalize=bool(merged["do_normalize"]),
            image_mean=_triple(merged["image_mean"], "image_mean"),
            image_std=_triple(merged["image_std"], "image_std"),
            do_convert_rgb=bool(merged["do_convert_rgb"]),
            image_grid_pinpoints=tuple(tuple(p) for p in pinpoints) if pinpoints else None,
            video_num_frames=merged.get("num_frames") if sample else None,
            video_fps=merged.get("fps") if sample else None,
        )

    @classmethod
    def for_model(cls, cfg: LlavaConfig) -> ImageProcessorConfig:
        """Defaults for a model without a preprocessor_config.json.

        LLaVA-1.5 pads to square, as the original trained (HF crops unless `do_pad`). Mean and
        std follow the vision tower: OpenAI CLIP's, or SigLIP's 0.5 (released OneVision).
        """
        s = cfg.vision.image_size
        siglip = cfg.vision.kind == VisionKind.SIGLIP
        common = dict(
            family=cfg.family,
            image_mean=SIGLIP_MEAN if siglip else OPENAI_CLIP_MEAN,
            image_std=SIGLIP_STD if siglip else OPENAI_CLIP_STD,
            image_grid_pinpoints=cfg.image_grid_pinpoints,
        )
        if cfg.family == Family.LLAVA_ONEVISION:
            return cls(
                aspect_ratio=cfg.vision_aspect_ratio or "anyres_max_9", size=(s, s), **common
            )
        mode = "pad" if cfg.family == Family.LLAVA else "anyres"
        return cls(aspect_ratio=mode, shortest_edge=s, crop_size=(s, s), do_center_crop=True,
                   **common)  # fmt: skip

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, cfg: LlavaConfig) -> ImageProcessorConfig:
        """`preprocessor_config.json` of `model_dir` if present, else `for_model`; checked."""
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            proc = cls.for_model(cfg)
        else:
            try:
                d = json.loads(path.read_text())
                ratio = cfg.vision_aspect_ratio if cfg.family == Family.LLAVA_ONEVISION else None
                proc = cls.from_hf(d, cfg.family, aspect_ratio=ratio)
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"{path}: {e}") from None
        proc.check_model(cfg)
        return proc

    def check_model(self, cfg: LlavaConfig) -> None:
        """Raises unless these views are the ones `cfg`'s vision tower and feature plan expect."""
        if self.family != cfg.family:
            raise ValueError(f"image processor is for {self.family}, model is {cfg.family}")
        if self.view_size != cfg.vision.image_size:
            raise ValueError(
                f"image processor makes {self.view_size}px views, the vision tower takes "
                f"{cfg.vision.image_size}px"
            )
        if self.is_anyres and self.image_grid_pinpoints != tuple(cfg.image_grid_pinpoints):
            raise ValueError("image_grid_pinpoints differ between the image processor and model")


_PARSED_KEYS = set(_HF_COMMON) | {
    "size", "crop_size", "do_center_crop", "do_pad", "image_grid_pinpoints",
    "do_sample_frames", "num_frames", "fps",
}  # fmt: skip


def _size_dict(value: Any, default_to_square: bool, name: str) -> dict[str, int]:
    """HF `get_size_dict`: an int, a (height, width) pair, or a dict we implement."""
    if isinstance(value, int):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": int(value[0]), "width": int(value[1])}
    if isinstance(value, dict) and set(value) in ({"shortest_edge"}, {"height", "width"}):
        return {k: int(v) for k, v in value.items()}
    raise ValueError(f"{name}={value!r}: only {{shortest_edge}} or {{height, width}} is supported")


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (RGB), found {value!r}")
    return tuple(float(v) for v in values)


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


def load_image(source: str | Path | bytes, max_pixels: int | None = None) -> Image.Image:
    """Decodes an image file into an upright RGB PIL image, or raises `ImageError`.

    EXIF orientation is applied, as `transformers.image_utils.load_image` does, then
    transparency is composited onto white (`to_rgb`). Truncated files are errors, never
    partial images (`ImageFile.LOAD_TRUNCATED_IMAGES` is left off).

    Args:
        source: a path, or the file's bytes.
        max_pixels: refuse images with more pixels; only tightens Pillow's
            `Image.MAX_IMAGE_PIXELS`, whose warning is raised as an error here.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        # catch_warnings is process-wide, not thread-safe; the explicit pixel check below is the
        # gate that does not depend on it.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fp = io.BytesIO(source) if name == "<bytes>" else open(source, "rb")  # noqa: SIM115
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


def _head(path: str | Path) -> bytes:
    with open(path, "rb") as f:
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
    image: Image.Image | np.ndarray, cfg: ImageProcessorConfig, multi_image: bool = False
) -> ProcessedImage:
    """The normalised views of one image, as the model's feature plan expects them.

    Args:
        image: a PIL image (converted with `to_rgb`), or uint8[H, W] / [H, W, 1|3|4].
        cfg: the image processor config.
        multi_image: the image is one of several in a sample. OneVision then pads it to a
            square with int(255 * mean) and makes one view (HF `batch_num_images > 1`);
            other families ignore it.

    Returns:
        `ProcessedImage` with V = 1 + rows * cols for AnyRes, else 1.
    """
    img = _as_rgb_image(image, cfg.do_convert_rgb)
    image_hw = (img.height, img.width)
    fill = tuple(int(x * 255) for x in cfg.image_mean)  # HF's pad colour, truncated
    if cfg.is_anyres and not (multi_image and cfg.family == Family.LLAVA_ONEVISION):
        views = _anyres_views(img, cfg)
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


def _hw(image: Image.Image | np.ndarray) -> HW:
    return (image.height, image.width) if isinstance(image, Image.Image) else image.shape[:2]


def _resize(image: Image.Image | np.ndarray, hw: HW, resample: int) -> Image.Image | np.ndarray:
    """PIL resize on uint8, as HF's PIL backend does; a same-size resize is PIL's identity."""
    if _hw(image) == tuple(hw):
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
        image = _resize(image, cfg.resize_hw(_hw(image)), cfg.resample)
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


def _anyres_views(img: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """Base view + crops of the chosen canvas, uint8 values in a float32[V, S, S, 3] array."""
    image_hw, ps = (img.height, img.width), cfg.patch_size
    canvas_hw = anyres.select_best_resolution(image_hw, cfg.image_grid_pinpoints)
    rows, cols = anyres.anyres_grid_shape(image_hw, cfg.image_grid_pinpoints, ps)
    new_h, new_w = anyres.resized_size_for_patching(image_hw, canvas_hw)
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
    images: Sequence[Image.Image | np.ndarray], cfg: ImageProcessorConfig
) -> list[ProcessedImage]:
    """The images of one sample: OneVision treats more than one as multi-image."""
    return [preprocess_image(im, cfg, multi_image=len(images) > 1) for im in images]
