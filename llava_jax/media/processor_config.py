"""How images become views: `ImageProcessorConfig`, read from a checkpoint's processor files
(`processor_config.json` as transformers 5 writes it, or `preprocessor_config.json`) with
transformers' field names and defaults, or derived from the model config when there are none.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from PIL import Image

from llava_jax.config import Family, LlavaConfig, VisionKind
from llava_jax.media import anyres

HW = tuple[int, int]
# Opening only these keeps Pillow's other parsers (FITS, PSD, ...) away from untrusted bytes.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


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
        """The image processor transformers would load from `model_dir`, checked against `cfg`.

        Read from the files transformers reads, in its order (`find_processor_dict`); the
        `for_model` defaults only when `model_dir` has none. For OneVision a video processor,
        when the directory has its own, must make the same pixels: videos are preprocessed
        with these settings, so a differing one is refused rather than ignored.
        """
        model_dir = Path(model_dir)
        found = find_processor_dict(model_dir, "image_processor")
        if found is None:
            proc = cls.for_model(cfg)
        else:
            ratio = cfg.vision_aspect_ratio if cfg.family == Family.LLAVA_ONEVISION else None
            proc = _parse(found, cfg.family, ratio)
        if cfg.family == Family.LLAVA_ONEVISION:
            video = find_processor_dict(model_dir, "video_processor")
            if video is not None and video.source != getattr(found, "source", None):
                proc = proc.with_video_processor(_parse(video, cfg.family, proc.aspect_ratio),
                                                 video.source)  # fmt: skip
        proc.check_model(cfg)
        return proc

    def with_video_processor(
        self, video: ImageProcessorConfig, source: str
    ) -> ImageProcessorConfig:
        """This config with the frame sampling of `video`, whose pixels must be the same."""
        pixels = {f.name for f in dataclasses.fields(self)} - {
            "image_grid_pinpoints", "video_num_frames", "video_fps"}  # fmt: skip
        differ = sorted(n for n in pixels if getattr(self, n) != getattr(video, n))
        if differ:
            raise ValueError(
                f"{source}: the video processor differs from the image processor in {differ}; "
                "llava-jax preprocesses videos with the image processor's settings"
            )
        return dataclasses.replace(
            self, video_num_frames=video.video_num_frames, video_fps=video.video_fps
        )

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


# Where transformers 5.24 looks, best first: `processor_config.json` nests each sub-processor
# (what `ProcessorMixin.save_pretrained` writes since v5), then the per-processor files
# (`image_processing_base.get_image_processor_dict`, `video_processing_utils.
# get_video_processor_dict`).
PROCESSOR_FILE = "processor_config.json"
_PROCESSOR_FILES = {
    "image_processor": ("preprocessor_config.json",),
    "video_processor": ("video_preprocessor_config.json", "preprocessor_config.json"),
}


@dataclasses.dataclass(frozen=True)
class FoundProcessor:
    """Where a processor's settings were found: the file, with the key when nested."""

    source: str  # e.g. "DIR/processor_config.json[image_processor]"
    settings: dict[str, Any]


def find_processor_dict(model_dir: str | Path, kind: str) -> FoundProcessor | None:
    """The settings of `kind` ("image_processor" or "video_processor") in a checkpoint
    directory, from the first file transformers would take them from; None when no file has
    them. A file that exists but is not a JSON object raises, naming it.
    """
    model_dir = Path(model_dir)
    nested = _read_json_object(model_dir / PROCESSOR_FILE)
    if nested is not None and kind in nested:
        source = f"{model_dir / PROCESSOR_FILE}[{kind}]"
        if not isinstance(nested[kind], dict):
            raise ValueError(f"{source}: expected a JSON object, found {nested[kind]!r:.60}")
        return FoundProcessor(source, nested[kind])
    for name in _PROCESSOR_FILES[kind]:
        settings = _read_json_object(model_dir / name)
        if settings is not None:
            return FoundProcessor(str(model_dir / name), settings)
    return None


def _read_json_object(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def _parse(found: FoundProcessor, family: Family, aspect_ratio: str | None) -> ImageProcessorConfig:
    try:
        return ImageProcessorConfig.from_hf(found.settings, family, aspect_ratio=aspect_ratio)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{found.source}: {e}") from None


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
