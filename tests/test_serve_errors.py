"""`llava-jax serve`: every class of bad request gets an OpenAI-style error and the server
goes on serving; the API key, the queue bound over HTTP, and clients that leave."""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request

import openai
import pytest
from PIL import Image
from serve_helpers import (
    JSON,
    MODEL,
    NEW,
    QUESTIONS,
    client,
    data_url,
    png_bytes,
    post,
    reference,
    server_of,
    tiny_image_message,
    user,
    wait_for,
)

# -- bad requests -----------------------------------------------------------------------------


def _bad_requests():
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    big = io.BytesIO()
    Image.new("RGB", (300, 300), "red").save(big, format="PNG")  # small file, many pixels
    big = big.getvalue()
    jpeg = png_bytes()  # truncated below
    return {
        "malformed-json": (None, b'{"model": ', 400, "invalid_request"),
        "not-an-object": ([1, 2], None, 400, "invalid_request"),
        "no-messages": ({"model": MODEL}, None, 400, "invalid_request"),
        "include-usage-not-bool": (
            {**good, "stream": True, "stream_options": {"include_usage": "no"}},
            None,
            400,
            "invalid_request",
        ),  # fmt: skip
        "bad-role": (
            {**good, "messages": [{"role": "tool", "content": "x"}]},
            None,
            400,
            "invalid_request",
        ),  # fmt: skip
        "unknown-model": ({**good, "model": "gpt-4o"}, None, 404, "model_not_found"),
        "bad-temperature": ({**good, "temperature": 3}, None, 400, "invalid_request"),
        "bad-max-tokens": ({**good, "max_tokens": "8"}, None, 400, "invalid_request"),
        "placeholder-in-text": (
            {**good, "messages": [{"role": "user", "content": "<image> x"}]},
            None,
            400,
            "invalid_request",
        ),  # fmt: skip
        "unknown-part": (
            {
                **good,
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
                ],
            },
            None,
            400,
            "invalid_request",
        ),  # fmt: skip
        "undecodable-image": (
            {**good, "messages": tiny_image_message(b"not an image at all")},
            None,
            400,
            "invalid_image",
        ),  # fmt: skip
        "truncated-image": (
            {**good, "messages": tiny_image_message(jpeg[:200])},
            None,
            400,
            "invalid_image",
        ),  # fmt: skip
        "bad-base64": (
            {
                **good,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}
                        ],
                    }
                ],
            },
            None,
            400,
            "invalid_image_url",
        ),  # fmt: skip
        "oversized-image": (
            {**good, "messages": tiny_image_message(big)},
            None,
            400,
            "image_too_large",
        ),  # fmt: skip
        "too-many-images": (
            {
                **good,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_url(png_bytes(i))}}
                            for i in range(3)
                        ],
                    }
                ],
            },
            None,
            400,
            "too_many_images",
        ),  # fmt: skip
        "over-context": (
            {**good, "messages": [{"role": "user", "content": "word " * 300}]},
            None,
            400,
            "context_length_exceeded",
        ),  # fmt: skip
        "answer-over-context": (
            {**good, "max_tokens": 250},
            None,
            400,
            "context_length_exceeded",
        ),  # fmt: skip
        "remote-url": (
            {
                **good,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "http://127.0.0.1:9/cat.png"},
                            }
                        ],
                    }
                ],
            },
            None,
            400,
            "remote_images_disabled",
        ),  # fmt: skip
        "file-path": (
            {
                **good,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}
                        ],
                    }
                ],
            },
            None,
            400,
            "local_images_disabled",
        ),  # fmt: skip
        "body-too-large": (
            {**good, "messages": [{"role": "user", "content": "x" * 300_000}]},
            None,
            413,
            "request_too_large",
        ),  # fmt: skip
    }


BAD = _bad_requests()
LIMITS = dict(max_image_pixels=200 * 200, max_images=2, max_body_bytes=200_000)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_gets_an_openai_error(serve, name):
    body, raw, status, code = BAD[name]
    url = serve(**LIMITS)
    got, answer = post(url, body, raw=raw)
    assert got == status, answer
    error = answer["error"]
    assert error["code"] == code, error
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and "\n" not in error["message"]
    # ... and the server goes on serving.
    ok, _ = post(url, {"model": MODEL, "messages": [user(QUESTIONS[0])],
                       "max_tokens": 1})  # fmt: skip
    assert ok == 200


def test_openai_client_raises_on_errors(serve):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(serve()).chat.completions.create(model="nope", messages=[user("hi")])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client(serve()).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 300}]
        )


def test_unknown_route_is_a_json_error(serve):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(serve() + "/v1/completions")
    assert e.value.code == 404
    assert json.loads(e.value.read())["error"]["code"] == "not_found"


def test_api_key(serve):
    url = serve(api_key="sekrit")
    status, answer = post(url, {"model": MODEL, "messages": [user(QUESTIONS[0])], "max_tokens": 1})
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    status, _ = post(url, {"model": MODEL, "messages": [user(QUESTIONS[0])], "max_tokens": 1},
                     headers={"Authorization": "Bearer wrong"})  # fmt: skip
    assert status == 401
    with pytest.raises(openai.AuthenticationError):
        client(url, api_key="wrong").models.list()
    out = client(url, api_key="sekrit").chat.completions.create(
        model=MODEL, messages=[user(QUESTIONS[0])], max_tokens=1
    )
    assert out.choices[0].finish_reason in ("length", "stop")
    assert urllib.request.urlopen(url + "/health").status == 200  # open to probes
    assert urllib.request.urlopen(url + "/").status == 200  # the page asks for the key


def test_full_queue_over_http(serve):
    """With max_queue requests still arriving, the next one gets 429, Retry-After and an
    OpenAI error before its body is read; once they are in, requests are served again."""
    url = serve(max_queue=2)
    scheduler = server_of(url).scheduler
    with scheduler.arriving(), scheduler.arriving():
        status, answer = post(url, {"model": MODEL, "messages": [user(QUESTIONS[0])]})
        assert status == 429 and answer["error"]["code"] == "queue_full", answer
        with pytest.raises(openai.RateLimitError):
            client(url).chat.completions.create(model=MODEL, messages=[user(QUESTIONS[0])])
        request = urllib.request.Request(url + "/v1/chat/completions", data=b"{}", headers=JSON)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request)
        assert e.value.headers["Retry-After"] == "1"
    status, _ = post(url, {"model": MODEL, "messages": [user(QUESTIONS[0])], "max_tokens": 1})
    assert status == 200


def test_non_ascii_api_key_is_a_401(serve):
    url = serve(api_key="sekrit")
    raw = urllib.request.Request(url + "/v1/models",
                                 headers={"Authorization": "Bearer s\u00e9krit".encode().decode(
                                     "latin-1")})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(raw)
    assert e.value.code == 401


def test_non_streaming_client_leaving_stops_its_row(serve):
    url = serve(max_batch=1)
    scheduler = server_of(url).scheduler
    before = scheduler.stats["cancelled"]
    body = {"model": MODEL, "messages": [user(QUESTIONS[4])], "max_tokens": 200,
            "temperature": 0, "stop": ["never-said"]}  # fmt: skip
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
        )
        wait_for(lambda: scheduler.stats["running"])  # generating
    wait_for(lambda: not scheduler.stats["running"])
    assert scheduler.stats["cancelled"] == before + 1, "the row ran to its end"


def test_client_leaving_mid_stream(serve, pipeline):
    url = serve()
    body = {"model": MODEL, "messages": [user(QUESTIONS[4])], "max_tokens": 200, "stream": True}
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=json.dumps(body).encode(), headers=JSON
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.readline().startswith(b"data: ")
    want, *_ = reference(pipeline, QUESTIONS[0])
    out = client(url).chat.completions.create(model=MODEL, messages=[user(QUESTIONS[0])],
                                              max_tokens=NEW, temperature=0)  # fmt: skip
    assert out.choices[0].message.content == want
