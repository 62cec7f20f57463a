"""The server's limits and defaults, as data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

SCHEDULERS = ("engine", "batch")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Everything `llava-jax serve` can be told, besides the model.

    Attributes:
      model_name: the id clients pass as `model` and `/v1/models` lists.
      api_key: when set, `/v1/*` requires `Authorization: Bearer <api_key>`; printable ASCII
        without surrounding spaces (any other key could never match what clients send).
      max_body_bytes: largest request body accepted (base64 images included).
      max_image_pixels: largest image (width * height) accepted, checked before decoding.
      max_images: most images in one request (all messages together).
      image_memory_bytes: decoded images of all requests being prepared together stay within
        this; a request whose images do not fit now gets 429 before they are decoded.
      allow_remote_images: fetch `http(s)://` image URLs (off: refused with 400).
      fetch_networks: networks (CIDR) remote images may also come from; by default only
        public addresses are fetched from (no private, loopback or link-local ones).
      max_fetches: most remote images fetched at once (server-wide).
      fetch_timeout_s: the whole fetch of one remote image, redirects included.
      local_image_dir: `file://` URLs and paths are read only from under this directory
        (None: refused with 400).
      allowed_hosts: `Host` names accepted besides IP addresses and `localhost` (a defence
        against DNS rebinding); `*` accepts any.
      allowed_origins: browser `Origin`s (`https://app.example`) that may call the API besides
        the server's own page; `*` allows any.
      header_timeout_s: a connection must send a request's headers within this.
      max_connections: open connections (idle ones included) beyond which a request gets
        503 at once (uvicorn's `limit_concurrency`), so that held connections cannot use up
        the process's file descriptors.
      read_timeout_s: a request's whole body must arrive within this (408 otherwise).
      default_max_tokens: answer length when a request gives no `max_tokens` (capped to what
        the context leaves).
      default_temperature: when a request gives none; 0 is greedy decoding.
      max_batch: most requests decoded together in one batch.
      max_queue: most requests waiting for a batch or being prepared; more get 429 (a
        request takes its place once its body has arrived, so slow uploads hold none).
      batch_wait_s: at most this long, an idle scheduler given a request waits for the others
        the server is preparing, so that they share its batch.
      batch_window_s: an idle scheduler given a request always waits this long for others
        (a fixed batching window; at most batch_wait_s).
      scheduler: "engine" (continuous batching: requests join and leave the `max_batch`
        slots at every decode step) or "batch" (batches decoded from start to end).
      prefix_cache_bytes: the engine's prefix cache (KV entries of earlier prompts, reused
        by prompts that start with the same tokens and media); 0: off.
      slot_tokens: each engine slot's length (prompt and answer), which bounds what a request
        may ask for; None: the model's context. The slots' KV cache is `max_batch` x
        `slot_tokens` x the model's bytes per token at most (it grows with the rows).
    """

    model_name: str = "llava-jax"
    api_key: str | None = None
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8
    image_memory_bytes: int = 1024 * 1024 * 1024
    allow_remote_images: bool = False
    fetch_networks: tuple[str, ...] = ()
    max_fetches: int = 4
    fetch_timeout_s: float = 10.0
    local_image_dir: Path | None = None
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    header_timeout_s: float = 10.0
    max_connections: int = 512
    read_timeout_s: float = 60.0
    default_max_tokens: int = 256
    default_temperature: float = 0.0
    max_batch: int = 8
    max_queue: int = 64
    batch_wait_s: float = 0.05
    batch_window_s: float = 0.0
    scheduler: str = "engine"
    prefix_cache_bytes: int = 1024 * 1024 * 1024
    slot_tokens: int | None = None

    def __post_init__(self):
        for name in ("max_body_bytes", "max_image_pixels", "max_images", "image_memory_bytes",
                     "max_fetches", "max_connections", "default_max_tokens", "max_batch",
                     "max_queue"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("fetch_timeout_s", "header_timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got "
                             f"{self.scheduler!r}")  # fmt: skip
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")
        if self.slot_tokens is not None:
            if self.slot_tokens < 2:
                raise ValueError(f"slot_tokens must be >= 2, got {self.slot_tokens}")
            if self.scheduler != "engine":
                raise ValueError("slot_tokens sizes the engine's slots; the batch scheduler "
                                 "sizes each batch's cache to its requests")  # fmt: skip
        if not 0 <= self.batch_window_s <= self.batch_wait_s:
            raise ValueError("need 0 <= batch_window_s <= batch_wait_s")
        if self.api_key is not None:
            check_api_key(self.api_key)


def check_api_key(key: str) -> None:
    """Raises ValueError for a key no client could send back: empty (which would turn
    authentication off), with surrounding spaces (HTTP strips them), or not printable ASCII
    (headers are Latin-1 at best)."""
    if not key:
        raise ValueError("the API key is empty; give a key, or none to serve without one")
    if key != key.strip():
        raise ValueError("the API key has surrounding spaces, which clients cannot send")
    if not (key.isascii() and key.isprintable()):
        raise ValueError("the API key must be printable ASCII (clients send it in a header)")
