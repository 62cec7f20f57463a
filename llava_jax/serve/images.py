"""A request's images: read from their sources, then decoded within a memory budget.

`read_images` gets each image's file bytes: from a base64 data URL, a remote URL (through
`fetch.Fetcher`, where allowed) or a file under `local_image_dir` (where allowed).
`ImageMemory` admits a request's decoding only while the decoded pixels of every request being
prepared fit `image_memory_bytes`: the cost is known from the files' headers before anything
is decoded, so small files of many pixels cannot add up to gigabytes. Every problem raises
`APIError` with a one-line message naming the image.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import threading
import urllib.parse
import warnings
from pathlib import Path

from PIL import Image

from llava_jax.media.image_processing import IMAGE_FORMATS, ImageError, load_image
from llava_jax.serve.config import ServeConfig
from llava_jax.serve.errors import APIError, invalid
from llava_jax.serve.fetch import Fetcher

# Peak bytes per pixel while decoding: Pillow's decoded frame (up to 4 bytes a pixel: RGBA,
# CMYK, 32-bit) and its RGB copy (3), rounded up. The processor's resized views are far smaller.
DECODE_BYTES_PER_PIXEL = 8


def _data_url(url: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise invalid("an image data URL must look like data:image/<format>;base64,<data>",
                      "image_url", "invalid_image_url")  # fmt: skip
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("an image data URL holds invalid base64", "image_url",
                      "invalid_image_url") from None  # fmt: skip


def _local(url: str, cfg: ServeConfig) -> bytes:
    if cfg.local_image_dir is None:
        raise invalid("local image files are refused by this server (start it with "
                      "--local-image-dir DIR); send the image as a base64 data URL",
                      "image_url", "local_images_disabled")  # fmt: skip
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url
    if "\0" in path:
        raise invalid("a local image path may not contain NUL", "image_url", "invalid_image_url")
    root = Path(cfg.local_image_dir).resolve()
    target = (root / path).resolve()  # an absolute path stays itself; `..` is resolved away
    if not target.is_relative_to(root):
        raise invalid(f"{path}: outside the directory images may be read from",
                      "image_url", "local_image_refused")  # fmt: skip
    try:
        if target.stat().st_size > cfg.max_body_bytes:
            raise APIError(413, f"{path}: over {cfg.max_body_bytes} bytes", "image_too_large",
                           "image_url")  # fmt: skip
        return target.read_bytes()
    except OSError as e:
        raise invalid(f"{path}: cannot read the file ({e.strerror})", "image_url",
                      "image_not_found") from None  # fmt: skip


def read_images(urls: tuple[str, ...], cfg: ServeConfig, fetcher: Fetcher) -> list[bytes]:
    """Every image's file bytes, in order (blocking: run off the event loop)."""
    files = []
    for url in urls:
        scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
        if scheme == "data":
            files.append(_data_url(url))
        elif scheme in ("http", "https"):
            if not cfg.allow_remote_images:
                raise invalid("remote image URLs are refused by this server (start it with "
                              "--allow-remote-images); send the image as a base64 data URL",
                              "image_url", "remote_images_disabled")  # fmt: skip
            files.append(fetcher.fetch(url))
        elif scheme in ("file", ""):
            files.append(_local(url, cfg))
        else:
            raise invalid(f"image URL scheme {scheme!r} is not supported (data, http, https)",
                          "image_url", "invalid_image_url")  # fmt: skip
    return files


def decode_cost(data: bytes, cfg: ServeConfig) -> int:
    """Peak bytes decoding this file takes, from its header alone; 0 for a file that
    `decode_images` refuses before decoding (one Pillow cannot open, or over the pixel limit),
    with its own message."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                pixels = im.width * im.height
    except Exception:  # noqa: BLE001 (any parser error is reported by decode_images)
        return 0
    return pixels * DECODE_BYTES_PER_PIXEL if pixels <= cfg.max_image_pixels else 0


def decode_images(files: list[bytes], cfg: ServeConfig) -> list[Image.Image]:
    """Decodes every image (blocking: run off the event loop, within `ImageMemory`)."""
    images = []
    for k, data in enumerate(files):
        try:
            images.append(load_image(data, max_pixels=cfg.max_image_pixels))
        except ImageError as e:
            oversized = "decompression bomb" in str(e)
            code = "image_too_large" if oversized else "invalid_image"
            message = str(e).replace("<bytes>", f"image {k + 1}", 1)
            raise invalid(message, "image_url", code) from None
    return images


class ImageMemory:
    """The budget of decoded image bytes shared by the requests being prepared."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def reserve(self, cost: int):
        """Holds `cost` bytes of the budget for the block; raises `APIError` 413 when the
        budget could never hold them, 429 when it cannot now."""
        if cost > self.capacity:
            raise APIError(413, f"the request's images take {cost} bytes decoded, over the "
                           f"server's {self.capacity} (--image-memory-mb)", "image_too_large",
                           "image_url")  # fmt: skip
        with self._lock:
            if self.used + cost > self.capacity:
                raise APIError(429, "the server is decoding other images (its image memory is "
                               "in use); retry shortly", "image_memory_full")  # fmt: skip
            self.used += cost
        try:
            yield
        finally:
            with self._lock:
                self.used -= cost
