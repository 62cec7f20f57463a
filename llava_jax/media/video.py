"""Video loading and preprocessing for LLaVA-OneVision, in NumPy and PIL (PyAV to decode).

Frames are sampled with transformers' rule (`video_utils.default_sample_indices_fn`) and
preprocessed with the arithmetic of `LlavaOnevisionVideoProcessor` (v5.24), which runs on
transformers' torchvision backend (`BaseVideoProcessor._preprocess`):

  1. resize every frame to `size` (384 x 384: a squash, no padding) with
     `tvF.resize(uint8, BICUBIC, antialias=True)`; center crop only if `do_center_crop`;
  2. `rescale_and_normalize` fused: mean' = float32(mean) * (1 / rescale_factor), same for
     std, then `(float32(u) - mean') / std'` in float32 (`_fuse_mean_std_and_rescale_factor`,
     `tvF.normalize`).

torchvision is not a dependency, so step 1 uses PIL's bicubic resize on uint8, which is
what torchvision's uint8 antialiased kernel was ported from and what the original
LLaVA-NeXT video path (SigLIP image processor on each frame) runs. The two kernels agree to
within a few uint8 levels, not bit for bit (tests/test_video.py measures it); step 2 is
reproduced exactly.

Decoding: animated GIF and WebP through PIL; every other container through PyAV, an
optional extra (`pip install 'llava-jax[video]'`).
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from llava_jax.config import Family
from llava_jax.media.image_processing import (
    normalize_,
    resize_and_crop,
    to_rgb,
)
from llava_jax.media.processor_config import ImageProcessorConfig

_PIL_VIDEO_FORMATS = ("GIF", "WEBP")


class VideoError(ValueError):
    """A video that cannot be used; the message is one line naming the file and the cause."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What was decoded: the whole video's frame count and rate, and the frames kept."""

    total_num_frames: int
    fps: float | None
    height: int
    width: int
    frame_indices: tuple[int, ...]
    backend: str  # "pyav" or "pil"


def sample_frame_indices(
    total_num_frames: int,
    num_frames: int | None = None,
    fps: float | None = None,
    video_fps: float | None = None,
) -> np.ndarray:
    """Frames to keep, as transformers' `default_sample_indices_fn` picks them.

    `num_frames` frames at `arange(n) * total // n` (the original LLaVA-NeXT uses
    `linspace(0, total - 1, n)` instead, which ends on the last frame); or, with `fps`,
    `max(1, int(total / video_fps * fps))` frames by the same rule; or every frame.

    Returns:
        int64[F], ascending.
    """
    if num_frames is not None and fps is not None:
        raise ValueError("num_frames and fps are mutually exclusive; give one")
    if fps is not None:
        if not video_fps:
            raise ValueError("sampling at an fps needs the video's own frame rate, unknown here")
        num_frames = max(1, int(total_num_frames / video_fps * fps))
    if num_frames is None:
        return np.arange(total_num_frames, dtype=np.int64)
    if not 1 <= num_frames <= total_num_frames:
        raise ValueError(f"cannot sample {num_frames} frames from a {total_num_frames}-frame video")
    return np.arange(num_frames, dtype=np.int64) * total_num_frames // num_frames


# The first bytes of the containers FFmpeg reads that users give (file(1)'s magic numbers),
# and of the images given by mistake: without PyAV they tell "needs PyAV" from "not a video".
_IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")
_VIDEO_SIGNATURES = (
    b"\x1a\x45\xdf\xa3",  # Matroska, WebM
    b"\x00\x00\x01\xba",  # MPEG program stream
    b"\x00\x00\x01\xb3",  # MPEG video
    b"\x30\x26\xb2\x75",  # ASF, WMV
    b"FLV",
    b"OggS",
)
TS_PACKET = 188  # an MPEG transport stream: a sync byte 0x47 every 188 bytes


def load_video(
    path: str | Path | bytes,
    num_frames: int | None = None,
    fps: float | None = None,
    max_pixels: int | None = None,
) -> tuple[np.ndarray, VideoInfo]:
    """Decodes sampled frames of a video file, or raises `VideoError`.

    Args:
        path: a video file (any container FFmpeg reads, with PyAV), or an animated GIF/WebP;
            or the file's bytes.
        num_frames: sample this many frames uniformly (see `sample_frame_indices`).
        fps: or sample at this rate; neither keeps every frame, as transformers does.
        max_pixels: refuse larger frames; only tightens Pillow's MAX_IMAGE_PIXELS.

    Returns:
        (frames uint8[F, H, W, 3] RGB, `VideoInfo`).
    """
    if isinstance(path, (bytes, bytearray)):
        path = _Bytes(path)
    name = str(path)
    if not isinstance(path, _Bytes) and not Path(path).is_file():
        raise VideoError(f"{name}: no such file")
    limit = min(v for v in (max_pixels, Image.MAX_IMAGE_PIXELS, 2**62) if v)  # only tightens
    try:
        if isinstance(path, _Bytes):
            head = path[: TS_PACKET + 1]
        else:
            with open(path, "rb") as f:
                head = f.read(TS_PACKET + 1)
        if head[:6] in (b"GIF87a", b"GIF89a") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
            return _load_pil(path, num_frames, fps, limit)
        return _load_pyav(path, head, num_frames, fps, limit)
    except VideoError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise VideoError(f"{name}: refused as a decompression bomb: {_one_line(e)}") from None
    except ValueError as e:  # sampling arguments that do not fit this video
        raise VideoError(f"{name}: {_one_line(e)}") from None
    except (OSError, EOFError, SyntaxError) as e:
        raise VideoError(f"{name}: not a video, or corrupt: {_one_line(e)}") from None


class _Bytes(bytes):
    """A video file's contents, named `<bytes>` in messages."""

    def __str__(self) -> str:
        return "<bytes>"

    __format__ = object.__format__


def _source(path):
    """What PIL and PyAV open: the path itself, or the bytes as a file."""
    return io.BytesIO(path) if isinstance(path, _Bytes) else str(path)


def _check_size(path, h: int, w: int, limit: int | None) -> None:
    if limit and h * w > limit:
        raise VideoError(f"{path}: frames of {w}x{h} = {h * w} pixels are over the limit {limit}")


def _load_pil(path, num_frames, fps, limit) -> tuple[np.ndarray, VideoInfo]:
    """Animated GIF/WebP: the frame rate comes from the mean frame duration."""
    with warnings.catch_warnings():  # Pillow's pixel-limit warning, as an error
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(_source(path), formats=_PIL_VIDEO_FORMATS)
    with im:
        _check_size(path, im.height, im.width, limit)
        total = getattr(im, "n_frames", 1)
        durations = []
        for i in range(total):
            im.seek(i)
            durations.append(im.info.get("duration") or 0)
        video_fps = 1000 * total / sum(durations) if sum(durations) > 0 else None
        indices = sample_frame_indices(total, num_frames, fps, video_fps)
        frames = []
        for i in indices:
            im.seek(int(i))
            # Same rule as for images: transparency composited onto white, as HF's video
            # `convert_to_rgb` also blends onto white.
            frames.append(np.asarray(to_rgb(im)))
        info = VideoInfo(total, video_fps, im.height, im.width, tuple(indices.tolist()), "pil")
    return np.stack(frames), info


def _container(head: bytes) -> str:
    """The kind of file ("video", "image" or "unknown") its first bytes show."""
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free"):  # MP4, MOV, 3GP
        return "video"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video"
    if head.startswith(_VIDEO_SIGNATURES):
        return "video"
    if len(head) > TS_PACKET and head[0] == head[TS_PACKET] == 0x47:
        return "video"
    if head.startswith(_IMAGE_SIGNATURES):
        return "image"
    return "unknown"


def _load_pyav(path, head, num_frames, fps, limit) -> tuple[np.ndarray, VideoInfo]:
    try:
        import av
    except ImportError:
        kind = _container(head)
        if kind == "image":
            raise VideoError(f"{path}: a still image, not a video; give it as an image") from None
        if kind == "unknown":
            raise VideoError(
                f"{path}: not a video container known without PyAV (MP4, MOV, WebM, Matroska, "
                "AVI, MPEG, FLV, Ogg, ASF, animated GIF/WebP); for others: pip install "
                "'llava-jax[video]'"
            ) from None
        raise VideoError(
            f"{path}: decoding this video needs PyAV: pip install 'llava-jax[video]'"
        ) from None
    try:
        with av.open(_source(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            h, w = stream.height, stream.width
            _check_size(path, h, w, limit)
            video_fps = float(stream.average_rate) if stream.average_rate else None
            # Some containers (Matroska, WebM) do not record a frame count: count packets.
            total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        if total < 1:
            raise VideoError(f"{path}: the video has no frames")
        indices = sample_frame_indices(total, num_frames, fps, video_fps)
        wanted, last, frames, decoded = set(indices.tolist()), int(indices[-1]), [], 0
        with av.open(_source(path)) as container:  # reopened: seeking back is unreliable
            for frame in container.decode(container.streams.video[0]):
                if decoded in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                decoded += 1
                if decoded > last:
                    break
    except av.error.FFmpegError as e:
        raise VideoError(f"{path}: unsupported or corrupt video: {_one_line(e)}") from None
    if len(frames) < len(indices):
        raise VideoError(
            f"{path}: the stream ended after {decoded} frames, but {total} were announced"
        )
    info = VideoInfo(total, video_fps, h, w, tuple(indices.tolist()), "pyav")
    return np.stack(frames), info


def preprocess_video(frames: np.ndarray, cfg: ImageProcessorConfig) -> np.ndarray:
    """Normalised frames for the model: float32[F, S, S, 3] (one view per frame).

    Args:
        frames: uint8[F, H, W, 3] RGB, or uint8[F, H, W(, 1)] grayscale (repeated, as
            torchvision's `grayscale_to_rgb`).
        cfg: a OneVision image (or video) processor config; its `size` is the squash target.
    """
    if cfg.family != Family.LLAVA_ONEVISION:
        raise ValueError(f"family {cfg.family} has no video support")
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] not in (1, 3):
        raise ValueError(f"frames must be uint8[F, H, W, 3], found {frames.dtype}{frames.shape}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    s = cfg.finish_hw(frames.shape[1:3])
    if s[0] != s[1]:
        raise ValueError(f"frames would become {s[0]}x{s[1]} views; the tower needs squares")
    out = np.empty((len(frames), *s, 3), np.float32)
    for i, frame in enumerate(frames):
        out[i] = resize_and_crop(frame, cfg)
    normalize_(out, cfg, fused=True)
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
