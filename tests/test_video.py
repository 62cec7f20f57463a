"""Video sampling, decoding and preprocessing.

transformers' `LlavaOnevisionVideoProcessor` needs torchvision, which is not installed, so
the pixel reference is derived from its source (transformers v5.24):
`BaseVideoProcessor._preprocess` resizes each uint8 frame with
`tvF.resize(BICUBIC, antialias=True)` and then `rescale_and_normalize`, which folds the
rescale into the mean and std (`_fuse_mean_std_and_rescale_factor`:
`torch.tensor(mean) * (1.0 / rescale_factor)`) before `tvF.normalize` (`sub_(mean).div_(std)`
in float32). `_reference` below writes those steps out with torch for the arithmetic and PIL
for the resize; `test_pil_resize_is_close_to_torchs_uint8_kernel` measures how far PIL is
from the uint8 antialiased kernel that torchvision calls on CPU.
"""

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.video_utils import VideoMetadata, default_sample_indices_fn

from llava_jax.config import LlavaConfig
from llava_jax.media import feature_plan
from llava_jax.media.feature_plan import Media
from llava_jax.media.processor_config import ImageProcessorConfig
from llava_jax.media.video import (
    VideoError,
    load_video,
    preprocess_video,
    sample_frame_indices,
)

# video_preprocessor_config.json of the llava-hf OneVision checkpoints.
OV_VIDEO = {
    "video_processor_type": "LlavaOnevisionVideoProcessor",
    "size": {"height": 384, "width": 384},
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "do_sample_frames": False,
}
CFG = ImageProcessorConfig.from_hf(OV_VIDEO, "llava_onevision")


def _frames(n, h, w, seed=0):
    """Smooth frames (natural-image-like), each shifted, with a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for t in range(n):
        rgb = [np.sin(6 * x + t) + np.cos(5 * y), np.sin(9 * y - t), np.cos(4 * (x + y) + t)]
        a = (np.stack(rgb, -1) + 2) * 60 + rng.normal(0, 3, (h, w, 3))
        out.append(a.clip(0, 255).astype(np.uint8))
    return np.stack(out)


def _reference(frames, cfg):
    """HF's torchvision video path, step by step; PIL stands in for torchvision's resize."""
    h, w = cfg.size
    resized = np.stack(
        [np.asarray(Image.fromarray(f).resize((w, h), resample=cfg.resample)) for f in frames]
    )
    video = torch.from_numpy(resized).permute(0, 3, 1, 2)  # [F, C, H, W], as HF holds it
    mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)
    std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    out = video.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("cfg", [CFG, CFG.__class__(**{**CFG.__dict__, "image_mean": (0.48145466,
                         0.4578275, 0.40821073), "image_std": (0.26862954, 0.26130258,
                         0.27577711)})], ids=["siglip", "clip"])  # fmt: skip
def test_preprocess_matches_the_derived_reference_exactly(cfg):
    frames = _frames(3, 90, 160)
    ours = preprocess_video(frames, cfg)
    assert ours.shape == (3, 384, 384, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, _reference(frames, cfg))
    model = LlavaConfig.onevision_qwen2("0.5b")
    assert len(ours) == feature_plan.num_views(model, Media.video(len(frames)))


def test_preprocess_squashes_without_padding_and_accepts_grayscale():
    frames = _frames(2, 40, 400)
    ours = preprocess_video(frames, CFG)
    # A 1:10 frame squashed to a square: no mean-colour or black bars anywhere.
    assert ours.shape == (2, 384, 384, 3) and (ours[:, :, :, 0].std(axis=1) > 0).all()
    gray = frames[..., 0]
    np.testing.assert_array_equal(
        preprocess_video(gray, CFG), preprocess_video(np.repeat(gray[..., None], 3, -1), CFG)
    )
    with pytest.raises(ValueError, match="uint8"):
        preprocess_video(frames.astype(np.float32), CFG)
    llava = ImageProcessorConfig.for_model(LlavaConfig.llava15_7b())
    with pytest.raises(ValueError, match="no video support"):
        preprocess_video(frames, llava)


def test_pil_resize_is_close_to_torchs_uint8_kernel():
    """torchvision resizes uint8 with torch's antialiased kernel, ported from Pillow's."""
    frames = _frames(4, 240, 320)
    ours = np.stack([np.asarray(Image.fromarray(f).resize((384, 384), 3)) for f in frames])
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    ref = torch.nn.functional.interpolate(video, (384, 384), mode="bicubic", antialias=True)
    diff = np.abs(ours.astype(int) - ref.permute(0, 2, 3, 1).numpy().astype(int))
    # Measured: at most 1 uint8 level (1/127.5 after SigLIP normalisation), on < 1% of values.
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


@pytest.mark.parametrize("total", [1, 7, 16, 100, 301])
@pytest.mark.parametrize("num_frames", [1, 4, 7, 32])
def test_sample_frame_indices_as_transformers(total, num_frames):
    meta = VideoMetadata(total_num_frames=total, fps=29.97)
    if num_frames > total:
        with pytest.raises(ValueError, match="cannot sample"):
            sample_frame_indices(total, num_frames)
        return
    ref = default_sample_indices_fn(meta, num_frames=num_frames)
    np.testing.assert_array_equal(sample_frame_indices(total, num_frames), ref)
    for fps in (0.5, 1, 2.5):
        ref = default_sample_indices_fn(meta, fps=fps)
        np.testing.assert_array_equal(sample_frame_indices(total, fps=fps, video_fps=29.97), ref)
    np.testing.assert_array_equal(sample_frame_indices(total), np.arange(total))


def _gif(path, n=12, duration=100):
    levels = [(i * 20, 255 - i * 20, (i * 50) % 256) for i in range(n)]
    frames = [Image.new("RGB", (64, 48), c) for c in levels]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration, loop=0)
    return np.array(levels)


def test_animated_gif_without_pyav(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # PIL decodes GIFs: PyAV not needed
    levels = _gif(tmp_path / "a.gif")
    frames, info = load_video(tmp_path / "a.gif", num_frames=4)
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    assert info.frame_indices == (0, 3, 6, 9) and info.total_num_frames == 12
    assert info.fps == pytest.approx(10.0) and info.backend == "pil"
    np.testing.assert_array_equal(frames[:, 0, 0], levels[[0, 3, 6, 9]])
    frames, info = load_video(tmp_path / "a.gif", fps=5)  # 1.2 s at 5 fps: 6 frames
    assert info.frame_indices == (0, 2, 4, 6, 8, 10)


def _encode(path, codec, n=12, rate=10, pix_fmt="yuv420p", options=None):
    av = pytest.importorskip("av")
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pix_fmt
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(
                np.full((48, 64, 3), i * 20 % 256, np.uint8), "rgb24"
            )
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.mark.parametrize(
    "name, codec, pix_fmt", [("v.mp4", "mpeg4", "yuv420p"), ("v.mkv", "ffv1", "yuv444p")]
)  # Matroska records no frame count: the loader counts packets
def test_pyav_decoding(tmp_path, name, codec, pix_fmt):
    _encode(tmp_path / name, codec, pix_fmt=pix_fmt)
    frames, info = load_video(tmp_path / name, num_frames=3)
    assert frames.shape == (3, 48, 64, 3) and info.frame_indices == (0, 4, 8)
    assert info.total_num_frames == 12 and info.fps == 10.0 and info.backend == "pyav"
    np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), [0, 80, 160], atol=3)
    frames, info = load_video(tmp_path / name)
    assert len(frames) == 12
    assert preprocess_video(frames, CFG).shape == (12, 384, 384, 3)


@pytest.mark.parametrize(
    "setup, kwargs, cause",
    [
        (lambda p: p / "none.mp4", {}, "no such file"),
        (lambda p: _garbage(p / "t.mp4"), {}, "unsupported or corrupt"),
        (lambda p: _truncated(p), {}, "corrupt"),  # the index (moov) is lost
        (lambda p: _truncated(p, front=True), {"num_frames": 3}, "stream ended after"),
        (lambda p: _gif(p / "a.gif") is None or p / "a.gif", {"num_frames": 13}, "cannot sample"),
        (lambda p: _write(p / "a.gif", b"GIF89a" + b"\x00" * 30), {}, "not a video, or corrupt"),
        (lambda p: _gif(p / "a.gif") is None or p / "a.gif", {"max_pixels": 100}, "over the limit"),
    ],
    ids=[
        "missing",
        "garbage",
        "truncated",
        "truncated-indexed",
        "too-many-frames",
        "broken-gif",
        "too-large",
    ],  # fmt: skip
)
def test_errors_are_one_line_and_name_the_file(tmp_path, setup, kwargs, cause):
    path = setup(tmp_path)
    with pytest.raises(VideoError) as info:
        load_video(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path)) and cause in message


def _write(path, data):
    path.write_bytes(data)
    return path


def _garbage(path):
    pytest.importorskip("av")  # without PyAV the error is the missing decoder instead
    return _write(path, b"not a video at all" * 10)


def _truncated(tmp_path, front=False):
    # With the index in front ("faststart"), the header promises frames the data lacks.
    _encode(
        tmp_path / "full.mp4", "mpeg4", n=30, options={"movflags": "faststart"} if front else None
    )
    data = (tmp_path / "full.mp4").read_bytes()
    return _write(tmp_path / "cut.mp4", data[: len(data) // 3])


def test_missing_decoder_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    path = _write(tmp_path / "v.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    with pytest.raises(VideoError, match=r"needs PyAV: pip install 'llava-jax\[video\]'"):
        load_video(path)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"hello, this is a text file\n", "not a video container known without PyAV (MP4"),
        (b"G" + b"not a transport stream " * 10, "not a video container known without PyAV"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "a still image, not a video"),
    ],
    ids=["text", "text-starting-with-G", "png"],
)
def test_not_a_video_without_pyav_is_not_a_missing_decoder(tmp_path, monkeypatch, data, message):
    monkeypatch.setitem(sys.modules, "av", None)
    path = _write(tmp_path / "v.mp4", data)
    with pytest.raises(VideoError) as info:
        load_video(path)
    assert str(info.value).startswith(f"{path}: {message}"), info.value
    assert "needs PyAV" not in str(info.value)


def test_sampling_arguments_are_checked():
    with pytest.raises(ValueError, match="mutually exclusive"):
        sample_frame_indices(10, num_frames=2, fps=1, video_fps=10)
    with pytest.raises(ValueError, match="frame rate"):
        sample_frame_indices(10, fps=1)
