"""`llava-jax serve` over real HTTP on 127.0.0.1: the OpenAI client, streaming, batching,
every class of bad request, the image-source flags, and the command itself.

The reference for every answer is the pipeline run directly on the same conversation.
"""

from __future__ import annotations

import concurrent.futures
import functools
import http.server
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from PIL import Image
from serve_helpers import TEMPLATE, LiveServer, build_model_dir, data_url, png_bytes

from llava_jax.data.image_processing import load_image
from llava_jax.pipeline import Pipeline
from llava_jax.serve import ServeConfig, create_app
from llava_jax.serve.scheduler import Event, Job, QueueFull, Scheduler

MODEL = "tiny-llava"
NEW = 8  # answer length in every test: one cache bucket, so one compile per batch size
# 33 to 41 prompt tokens each, all in one length bucket (as are the image questions below).
QUESTIONS = ["What is in the picture?", "Describe the image.", "What colour is it?",
             "Where was this taken?", "How many things are there?", "Describe it.",
             "What is it?", "How many?"]  # fmt: skip


_APPS = {}  # url -> the app behind it


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _server_of(url: str):
    """The server state behind a live URL (its scheduler, for its counters)."""
    return _APPS[url].state.server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def pipeline(model_dir):
    return Pipeline.load(model_dir, template=TEMPLATE, echo=lambda _: None)


@pytest.fixture(scope="module")
def serve(pipeline):
    """serve(**config) -> a live server's URL; servers share the pipeline (and its compiled
    programs) and stop at the end of the module."""
    servers = {}

    def start(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in servers:
            cfg = ServeConfig(model_name=MODEL, **overrides)
            servers[key] = LiveServer(create_app(pipeline, cfg))
            _APPS[servers[key].url] = servers[key].app
        return servers[key].url

    yield start
    for server in servers.values():
        server.close()


def reference(pipeline, question: str, seed: int = 0, max_tokens: int = NEW):
    """(answer, finish_reason, prompt tokens) of the pipeline itself, greedy, for an image
    then a question."""
    image = load_image(png_bytes(seed))
    prompt = pipeline.prompt([{"role": "user", "content": f"<image>\n{question}"}], [image])
    sampling = pipeline.stop_config(max_new_tokens=max_tokens)
    out = pipeline.generator.generate([prompt], sampling)[0]
    ids = out.token_ids
    if ids and ids[-1] in sampling.stop_token_ids:
        ids = ids[:-1]
    return pipeline.decode(ids), out.finish_reason, len(prompt.input_ids)


def user(question: str, seed: int = 0) -> dict:
    return {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(seed))}},
        {"type": "text", "text": question},
    ]}  # fmt: skip


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                         timeout=120, **kw)  # fmt: skip


def post(url: str, body, headers=None, raw: bytes | None = None):
    """(status, decoded JSON) of a POST to /v1/chat/completions."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- the OpenAI client ------------------------------------------------------------------------


def test_openai_client_answers_about_an_image(serve, pipeline):
    want, reason, n = reference(pipeline, QUESTIONS[0])
    out = client(serve()).chat.completions.create(
        model=MODEL, messages=[user(QUESTIONS[0])], max_tokens=NEW, temperature=0
    )
    assert out.choices[0].message.content == want
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == reason
    assert out.usage.prompt_tokens == n == 40  # 9 image tokens + template and question
    assert out.usage.total_tokens == n + out.usage.completion_tokens


def test_openai_client_streams(serve, pipeline):
    want, reason, n = reference(pipeline, QUESTIONS[1])
    stream = client(serve()).chat.completions.create(
        model=MODEL, messages=[user(QUESTIONS[1])], max_tokens=NEW, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2, "the answer came in one piece: not streamed"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == n
    assert len({c.id for c in chunks}) == 1


def test_sse_wire_format(serve):
    body = {"model": MODEL, "messages": [user(QUESTIONS[2])], "max_tokens": NEW, "stream": True}
    request = urllib.request.Request(serve() + "/v1/chat/completions",
                                     data=json.dumps(body).encode())  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: {"), event
        assert json.loads(event[6:])["object"] == "chat.completion.chunk"


def test_multi_turn_with_two_images(serve, pipeline):
    images = [load_image(png_bytes(1)), load_image(png_bytes(2))]
    messages = [{"role": "user", "content": "<image>\nWhat is this?"},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "And this?\n<image>"}]  # fmt: skip
    prompt = pipeline.prompt(messages, images)
    sampling = pipeline.stop_config(max_new_tokens=NEW)
    ids = pipeline.generator.generate([prompt], sampling)[0].token_ids
    want = pipeline.decode([i for i in ids if i not in sampling.stop_token_ids])
    second = [{"type": "text", "text": "And this?"},
              {"type": "image_url", "image_url": {"url": data_url(png_bytes(2))}}]  # fmt: skip
    api_messages = [user("What is this?", 1), {"role": "assistant", "content": "A cat."},
                    {"role": "user", "content": second}]  # fmt: skip
    out = client(serve()).chat.completions.create(model=MODEL, messages=api_messages,
                                                  max_tokens=NEW, temperature=0)  # fmt: skip
    assert out.usage.prompt_tokens == len(prompt.input_ids)
    assert out.choices[0].message.content == want


def test_stop_string_ends_the_answer(serve, pipeline):
    want, *_ = reference(pipeline, QUESTIONS[3])
    stop = next(want[i : i + 2] for i in range(2, len(want) - 1) if want[i : i + 2].strip())
    for stream in (False, True):
        out = client(serve()).chat.completions.create(
            model=MODEL, messages=[user(QUESTIONS[3])], max_tokens=NEW, temperature=0,
            stop=[stop], stream=stream,
        )  # fmt: skip
        if stream:
            chunks = [c for c in out if c.choices]
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = out.choices[0].message.content, out.choices[0].finish_reason
        assert (text, reason) == (want[: want.index(stop)], "stop"), (stream, want, stop)


def test_sampling_follows_the_seed(serve):
    def sample(seed):
        return client(serve()).chat.completions.create(
            model=MODEL, messages=[user(QUESTIONS[0])], max_tokens=NEW, temperature=1.5,
            top_p=0.9, seed=seed,
        ).choices[0].message.content  # fmt: skip

    answers = [sample(seed) for seed in (1, 1, 2, 3)]
    assert answers[0] == answers[1], "the same seed gave different answers"
    assert len(set(answers)) > 1, "seeds 1, 2, 3 all gave the same answer: not sampling"


def test_models_and_health(serve):
    with urllib.request.urlopen(serve() + "/v1/models") as response:
        models = json.loads(response.read())
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert [m.id for m in client(serve()).models.list()] == [MODEL]
    with urllib.request.urlopen(serve() + "/health") as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["context"] == 256


# -- batching ---------------------------------------------------------------------------------


def ask(url: str, i: int) -> str:
    out = client(url).chat.completions.create(
        model=MODEL, messages=[user(QUESTIONS[i], seed=i)], max_tokens=NEW, temperature=0
    )
    return out.choices[0].message.content


def test_eight_concurrent_requests_batch_and_match_sequential(serve):
    sequential = [ask(serve(), i) for i in range(8)]
    url = serve(batch_wait_s=5.0, batch_window_s=5.0)  # a batch waits to be full (or 5 s)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        concurrent_answers = list(pool.map(functools.partial(ask, url), range(8)))
    health = json.loads(urllib.request.urlopen(url + "/health").read())
    assert concurrent_answers == sequential
    assert len(set(sequential)) > 1, "all answers alike: the test could not tell rows apart"
    assert (health["requests"], health["batches"], health["largest_batch"]) == (8, 1, 8)


# Greedy and sampled rows with every kind of setting, each its own seed.
MIXED = [dict(temperature=0), dict(temperature=1.5, seed=1), dict(temperature=1.5, seed=2),
         dict(temperature=1.0, top_k=3, seed=1), dict(temperature=0.7, top_p=0.8, seed=4),
         dict(temperature=1.2, top_k=5, top_p=0.9, seed=5), dict(temperature=0, top_k=7),
         dict(temperature=1.5, seed=1, repetition_penalty=1.3)]  # fmt: skip


def settings(**kw) -> dict:
    """OpenAI client arguments; top_k and repetition_penalty travel in extra_body."""
    extra = {k: kw.pop(k) for k in ("top_k", "repetition_penalty") if k in kw}
    return {**kw, "extra_body": extra} if extra else kw


def ask_with(url: str, i: int) -> str:
    out = client(url).chat.completions.create(
        model=MODEL, messages=[user(QUESTIONS[i], seed=i)], max_tokens=NEW, **settings(**MIXED[i])
    )
    return out.choices[0].message.content


def test_any_mix_of_settings_shares_a_batch_and_matches_alone(serve):
    """A row's sample depends on its own request (seed included), not on its batch-mates."""
    alone = [ask_with(serve(), i) for i in range(8)]
    url = serve(batch_wait_s=5.0, batch_window_s=5.0)  # a batch waits to be full (or 5 s)
    stats = _server_of(url).scheduler.stats
    before = stats["requests"], stats["batches"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(functools.partial(ask_with, url), range(8)))
    assert together == alone
    assert (stats["requests"] - before[0], stats["batches"] - before[1]) == (8, 1)
    # Rows 1 and 7 share seed 1 and temperature; the penalty is what sets them apart.
    assert len(set(alone)) > 4, "too few distinct answers: the test could not tell rows apart"


def test_no_sampling_setting_compiles_a_new_program(serve, pipeline):
    url = serve()
    ask_with(url, 1)  # sampled, greedy and padded rows of this bucket are compiled now
    ask(url, 0)
    programs = (pipeline.generator._prefill._cache_size(), pipeline.generator._step._cache_size())
    for kw in (dict(temperature=0.3, top_k=11, seed=123), dict(temperature=2.0, top_k=999,
               top_p=0.5, seed=-4), dict(temperature=0, top_k=12345)):  # fmt: skip
        client(url).chat.completions.create(model=MODEL, messages=[user(QUESTIONS[0])],
                                            max_tokens=NEW, **settings(**kw))  # fmt: skip
    now = (pipeline.generator._prefill._cache_size(), pipeline.generator._step._cache_size())
    assert now == programs


def test_bad_requests_among_good_ones(serve):
    """Concurrent good and bad requests: each bad one gets its 400, each good one its answer."""
    url = serve(max_batch=1)  # batch size 1 was compiled already
    want = [ask(serve(), i) for i in range(4)]
    broken = {"model": MODEL, "messages": _tiny_image_message(b"GIF89a broken"), "max_tokens": 2}

    def one(i):
        return ask(url, i // 2) if i % 2 == 0 else post(url, broken)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    assert results[0::2] == want
    assert all(status == 400 and body["error"]["code"] == "invalid_image"
               for status, body in results[1::2]), results[1::2]  # fmt: skip


def test_full_queue_is_refused(pipeline):
    """With one running and one waiting, a third job is refused, and all that were accepted
    finish."""
    scheduler = Scheduler(pipeline.generator, pipeline.decode, 256, max_batch=1, max_queue=1,
                          batch_wait_s=0)  # fmt: skip
    done = []
    finished = threading.Semaphore(0)

    def sink(event: Event):
        if event.kind != "delta":
            done.append(event.kind)
            finished.release()

    messages = [{"role": "user", "content": f"<image>\n{QUESTIONS[0]}"}]
    prompt = pipeline.prompt(messages, [load_image(png_bytes())])  # shapes compiled already
    sampling = pipeline.stop_config(max_new_tokens=NEW)
    accepted = refused = 0
    try:
        for _ in range(3):
            try:
                scheduler.submit(Job(prompt, sampling, (), sink))
                accepted += 1
            except QueueFull:
                refused += 1
        assert refused >= 1 and accepted >= 1
        for _ in range(accepted):
            assert finished.acquire(timeout=120)
        assert done == ["done"] * accepted
    finally:
        scheduler.close()


# -- bad requests -----------------------------------------------------------------------------


def _tiny_image_message(data: bytes, kind="png"):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(data, kind)}},
        {"type": "text", "text": "hi"}]}]  # fmt: skip


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
            {**good, "messages": _tiny_image_message(b"not an image at all")},
            None,
            400,
            "invalid_image",
        ),  # fmt: skip
        "truncated-image": (
            {**good, "messages": _tiny_image_message(jpeg[:200])},
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
            {**good, "messages": _tiny_image_message(big)},
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
    scheduler = _server_of(url).scheduler
    with scheduler.arriving(), scheduler.arriving():
        status, answer = post(url, {"model": MODEL, "messages": [user(QUESTIONS[0])]})
        assert status == 429 and answer["error"]["code"] == "queue_full", answer
        with pytest.raises(openai.RateLimitError):
            client(url).chat.completions.create(model=MODEL, messages=[user(QUESTIONS[0])])
        request = urllib.request.Request(url + "/v1/chat/completions", data=b"{}")
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
    scheduler = _server_of(url).scheduler
    before = scheduler.stats["cancelled"]
    body = {"model": MODEL, "messages": [user(QUESTIONS[4])], "max_tokens": 200,
            "temperature": 0, "stop": ["never-said"]}  # fmt: skip
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
        )
        _wait_for(lambda: scheduler.stats["running"])  # generating
    _wait_for(lambda: not scheduler.stats["running"])
    assert scheduler.stats["cancelled"] == before + 1, "the row ran to its end"


def test_client_leaving_mid_stream(serve, pipeline):
    url = serve()
    body = {"model": MODEL, "messages": [user(QUESTIONS[4])], "max_tokens": 200, "stream": True}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.readline().startswith(b"data: ")
    want, *_ = reference(pipeline, QUESTIONS[0])
    out = client(url).chat.completions.create(model=MODEL, messages=[user(QUESTIONS[0])],
                                              max_tokens=NEW, temperature=0)  # fmt: skip
    assert out.choices[0].message.content == want


# -- where images may come from ---------------------------------------------------------------


@pytest.fixture(scope="module")
def image_host(tmp_path_factory):
    """A plain HTTP server on 127.0.0.1 serving cat.png."""
    root = tmp_path_factory.mktemp("www")
    (root / "cat.png").write_bytes(png_bytes(5))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _with_url(url: str) -> dict:
    return {"model": MODEL, "max_tokens": NEW, "temperature": 0, "messages": [{"role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": QUESTIONS[0]}]}]}  # fmt: skip


def test_remote_images_when_allowed(serve, pipeline, image_host):
    want, *_ = reference(pipeline, QUESTIONS[0], seed=5)
    status, answer = post(serve(allow_remote_images=True), _with_url(image_host + "/cat.png"))
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"] == want
    status, answer = post(serve(allow_remote_images=True), _with_url(image_host + "/dog.png"))
    assert status == 400 and answer["error"]["code"] == "image_fetch_failed"


def test_local_images_only_from_the_allowed_dir(serve, pipeline, tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "cat.png").write_bytes(png_bytes(5))
    (tmp_path / "secret.png").write_bytes(png_bytes(6))
    url = serve(local_image_dir=tmp_path / "pics")
    want, *_ = reference(pipeline, QUESTIONS[0], seed=5)
    for ref in (f"file://{tmp_path}/pics/cat.png", "cat.png"):
        status, answer = post(url, _with_url(ref))
        assert status == 200, answer
        assert answer["choices"][0]["message"]["content"] == want
    for ref in (f"file://{tmp_path}/secret.png", "../secret.png", "/etc/hostname"):
        status, answer = post(url, _with_url(ref))
        assert status == 400 and answer["error"]["code"] == "local_image_refused", (ref, answer)


# -- the command ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command(model_dir, pipeline):
    """`llava-jax serve` on a model dir `convert hf-to-jax` wrote: the OpenAI client gets the
    pipeline's own answer about an image, streamed and not."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llava_jax.cli.main", "serve", "--model", str(model_dir),
         "--template", TEMPLATE, "--port", str(port), "--api-key", "k"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                health = json.loads(
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read()
                )
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert health["model"] == "tiny-llava"
        api = client(f"http://127.0.0.1:{port}", api_key="k")
        assert [m.id for m in api.models.list()] == ["tiny-llava"]
        want, *_ = reference(pipeline, QUESTIONS[0])
        out = api.chat.completions.create(model=MODEL, messages=[user(QUESTIONS[0])],
                                          max_tokens=NEW, temperature=0)  # fmt: skip
        assert out.choices[0].message.content == want
        chunks = api.chat.completions.create(
            model=MODEL, messages=[user(QUESTIONS[0])], max_tokens=NEW, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "serving 'tiny-llava' on http://127.0.0.1:" in err


def test_serve_command_bad_flag_is_one_line(model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llava_jax.cli.main", "serve", "--model", str(model_dir),
         "--local-image-dir", str(tmp_path / "nowhere")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"llava-jax: error: --local-image-dir {tmp_path / 'nowhere'}: not a directory"
    ]


def test_config_is_checked():
    with pytest.raises(ValueError, match="max_batch"):
        ServeConfig(max_batch=0)
    assert ServeConfig().api_key is None
