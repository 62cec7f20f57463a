"""The server's limits and defaults, as data."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Everything `llava-jax serve` can be told, besides the model.

    Attributes:
      model_name: the id clients pass as `model` and `/v1/models` lists.
      api_key: when set, `/v1/*` requires `Authorization: Bearer <api_key>`.
      max_body_bytes: largest request body accepted (base64 images included).
      max_image_pixels: largest image (width * height) accepted, checked before decoding.
      max_images: most images in one request (all messages together).
      allow_remote_images: fetch `http(s)://` image URLs (off: refused with 400).
      local_image_dir: `file://` URLs and paths are read only from under this directory
        (None: refused with 400).
      default_max_tokens: answer length when a request gives no `max_tokens` (capped to what
        the context leaves).
      default_temperature: when a request gives none; 0 is greedy decoding.
      max_batch: most requests decoded together in one batch.
      max_queue: most requests waiting for a batch or still being read and prepared; more
        get 429 (before their bodies are read).
      batch_wait_s: at most this long, an idle scheduler given a request waits for the others
        the server is reading or preparing, so that they share its batch.
      batch_window_s: an idle scheduler given a request always waits this long for others
        (a fixed batching window; at most batch_wait_s).
      fetch_timeout_s: timeout for fetching a remote image.
    """

    model_name: str = "llava-jax"
    api_key: str | None = None
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8
    allow_remote_images: bool = False
    local_image_dir: Path | None = None
    default_max_tokens: int = 256
    default_temperature: float = 0.0
    max_batch: int = 8
    max_queue: int = 64
    batch_wait_s: float = 0.05
    batch_window_s: float = 0.0
    fetch_timeout_s: float = 10.0

    def __post_init__(self):
        for name in ("max_body_bytes", "max_image_pixels", "max_images", "default_max_tokens",
                     "max_batch", "max_queue"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.batch_window_s <= self.batch_wait_s or self.fetch_timeout_s <= 0:
            raise ValueError("need 0 <= batch_window_s <= batch_wait_s and fetch_timeout_s > 0")
