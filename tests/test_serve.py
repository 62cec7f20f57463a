"""`llava-jax serve` over real HTTP on 127.0.0.1: the OpenAI client, streaming, batching, the
image-source flags, and the command itself (bad requests: test_serve_errors.py).

The reference for every answer is the pipeline run directly on the same conversation.
"""

from __future__ import annotations

import concurrent.futures
import functools
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from serve_helpers import (
    JSON,
    MODEL,
    NEW,
    QUESTIONS,
    TEMPLATE,
    client,
    data_url,
    png_bytes,
    post,
    reference,
    server_of,
    tiny_image_message,
    user,
)

from llava_jax.media.image_processing import load_image
from llava_jax.serve import ServeConfig
from llava_jax.serve.scheduler import Event, Job, QueueFull, Scheduler

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
                                     data=json.dumps(body).encode(), headers=JSON)  # fmt: skip
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
    stats = server_of(url).scheduler.stats
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
    broken = {"model": MODEL, "messages": tiny_image_message(b"GIF89a broken"), "max_tokens": 2}

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
    url = serve(allow_remote_images=True, fetch_networks=("127.0.0.1/32",))  # loopback: opted in
    want, *_ = reference(pipeline, QUESTIONS[0], seed=5)
    status, answer = post(url, _with_url(image_host + "/cat.png"))
    assert status == 200, answer
    assert answer["choices"][0]["message"]["content"] == want
    status, answer = post(url, _with_url(image_host + "/dog.png"))
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
