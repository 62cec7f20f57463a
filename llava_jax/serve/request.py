"""Parsing and validating an OpenAI chat completions request.

`parse_chat_request(body, cfg)` checks every field the server reads and turns the messages'
content parts into template messages with `<image>` placeholders, where the image parts were,
plus the list of image sources in order (read and decoded by `images.py`). Every problem
raises `APIError` with a one-line message naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from llava_jax.serve.config import ServeConfig
from llava_jax.serve.errors import APIError, invalid

PLACEHOLDERS = ("<image>", "<video>")
ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4  # as OpenAI
# Answer text is held back while it could begin a stop string: a long one would turn a
# stream into one chunk at its end.
MAX_STOP_CHARS = 64


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A validated chat request.

    Attributes:
      messages: `[{"role", "content": str}]`, `<image>` where each image part was.
      images: the image URLs (data, http(s) or file), in placeholder order.
      max_tokens: None: as many as the server default and the context allow.
      temperature, top_p, top_k, repetition_penalty, seed: sampling (seed None: random).
      stop: strings that end the answer (not included in it).
      stream: answer with server-sent events.
      include_usage: with `stream`, send a last chunk with the token counts.
    """

    model: str
    messages: tuple[dict[str, str], ...]
    images: tuple[str, ...]
    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _number(body, name, default, lo, hi, integer=False, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise invalid(f"{name} must be {kind}, got {value!r}", name)
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise invalid(f"{name} must be {low} and <= {hi}, got {value!r}", name)
    return value


def _content(i: int, role: str, content: Any, images: list[str]) -> str:
    """One message's content as template text; image parts become `<image>` placeholders."""
    where = f"messages[{i}].content"
    if isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list) and content:
        parts = content
    elif content is None and role == "assistant":
        parts = []
    else:
        raise invalid(f"{where} must be a string or a non-empty list of content parts", where)
    pieces = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"{where}[{j}].text must be a string", where)
            for tag in PLACEHOLDERS:
                if tag in text:
                    raise invalid(f"{where}[{j}]: text may not contain {tag}; send images as "
                                  "image_url content parts", where)  # fmt: skip
            pieces.append(text)
        elif kind == "image_url":
            if role != "user":
                raise invalid(f"{where}[{j}]: only user messages may hold images", where)
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise invalid(f"{where}[{j}].image_url.url must be a non-empty string", where)
            images.append(url)
            pieces.append("<image>")
        else:
            raise invalid(
                f"{where}[{j}]: content part type {kind!r} is not supported (text, image_url)",
                where,
            )
    return "\n".join(pieces)


def parse_chat_request(body: Any, cfg: ServeConfig) -> ChatRequest:
    """Validates a decoded JSON body; raises `APIError` (400, or 404 for an unknown model)."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required: a string naming the model (see /v1/models)", "model")
    if model != cfg.model_name:
        raise APIError(404, f"The model {model!r} does not exist; this server serves "
                       f"{cfg.model_name!r}", "model_not_found", "model")  # fmt: skip
    if body.get("n", 1) != 1:
        raise invalid("n must be 1", "n")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid("messages must be a non-empty list", "messages")
    messages, images = [], []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                          "messages")  # fmt: skip
        messages.append({"role": role, "content": _content(i, role, m.get("content"), images)})
    if len(images) > cfg.max_images:
        raise invalid(f"{len(images)} images in the request; at most {cfg.max_images} are "
                      "accepted", "messages", "too_many_images")  # fmt: skip
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 1, 2**31, integer=True)
    stop = body.get("stop")
    stop = (stop,) if isinstance(stop, str) else stop
    if stop is None:
        stop = ()
    fits = lambda s: isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS  # noqa: E731
    if not isinstance(stop, list | tuple) or len(stop) > MAX_STOP_STRINGS:
        stop = [None]
    if not all(map(fits, stop)):
        raise invalid(f"stop must be a string or a list of up to {MAX_STOP_STRINGS}, each of 1 "
                      f"to {MAX_STOP_CHARS} characters", "stop")  # fmt: skip
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise invalid("stream_options.include_usage must be true or false", "stream_options")
    return ChatRequest(
        model=model,
        messages=tuple(messages),
        images=tuple(images),
        max_tokens=max_tokens,
        temperature=float(_number(body, "temperature", cfg.default_temperature, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, lo_open=True)),
        top_k=_number(body, "top_k", 0, 0, 2**20, integer=True),
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, 0, 100, lo_open=True)),
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        stop=tuple(stop),
        stream=stream,
        include_usage=include_usage,
    )
