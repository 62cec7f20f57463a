"""The FastAPI app: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, and the chat
page at `/`.

A request passes the browser guards (`guards.py`) and the API key, its body is read (within
the body limit and the read deadline), then in a worker thread it is parsed and validated
(`request.py`), its images read and decoded within the image memory (`images.py`) and its
prompt built; then it is queued for the scheduler thread. The answer comes back through an
asyncio queue fed from the scheduler with `call_soon_threadsafe`: streamed as server-sent
events in OpenAI's chunk format, or gathered into one response.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from llava_jax.inference.engine import Engine
from llava_jax.inference.generator import Prompt
from llava_jax.inference.prefix_cache import PrefixCache
from llava_jax.serve.config import ServeConfig
from llava_jax.serve.engine_scheduler import EngineScheduler
from llava_jax.serve.errors import APIError, invalid
from llava_jax.serve.fetch import Fetcher
from llava_jax.serve.guards import Guard
from llava_jax.serve.images import ImageMemory, decode_cost, decode_images, read_images
from llava_jax.serve.request import ChatRequest, parse_chat_request
from llava_jax.serve.scheduler import Event, Job, JobQueue, QueueFull, Scheduler

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
DRAIN_BYTES = 64 * 1024 * 1024  # read this much of an oversized body, so the 413 arrives


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, whole within `timeout_s` (408 otherwise) and within `limit` bytes (413)."""
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"the request body is over {limit} bytes (the server's "
                       "--max-body-mb)", "request_too_large")  # fmt: skip
    if declared.isdigit() and int(declared) > limit + DRAIN_BYTES:
        raise too_big
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):  # a client trickling its body holds nothing long
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit + DRAIN_BYTES:
                    break
                if size <= limit:
                    chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s (the "
                       "server's --read-timeout)", "request_timeout") from None  # fmt: skip
    if size > limit:
        raise too_big
    return b"".join(chunks)


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise invalid("the request body's JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON: {e}") from None


def _check_key(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Bytes, not str: compare_digest refuses non-ASCII str (a 500 instead of a 401).
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), api_key.encode()
    ):
        raise APIError(401, "a valid API key is required: send Authorization: Bearer <key>",
                       "invalid_api_key")  # fmt: skip


def _error_response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    if e.status == 408:  # the rest of the body may still come: the connection cannot be reused
        headers = {"Connection": "close"}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _busy(e: QueueFull) -> APIError:
    return APIError(429, f"the server is busy ({e}); retry shortly", "queue_full")


async def _post_on_disconnect(request: Request, events: asyncio.Queue) -> None:
    """Puts None on `events` when the client disconnects (its body has been read, so the
    next ASGI message is the disconnect), however fast tokens are flowing."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    events.put_nowait(None)


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


class _Mailbox:
    """Hands events from the scheduler thread to the event loop's queues, waking the loop
    once for everything posted before it runs (not once per token per request)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.lock, self.scheduled = loop, [], threading.Lock(), False

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        with self.lock:
            self.items.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is gone: shutting down
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, event in items:
            queue.put_nowait(event)


class _Server:
    """The state behind the routes: the pipeline, its scheduler and the config."""

    def __init__(self, pipeline, cfg: ServeConfig):
        self.pipeline, self.cfg = pipeline, cfg
        self.context = pipeline.cfg.text.max_position_embeddings
        self.whose = "This model's"  # OpenAI's wording, which clients match
        if cfg.slot_tokens is not None:  # the longest request a slot holds
            if cfg.slot_tokens > self.context:
                raise ValueError(f"--slot-tokens {cfg.slot_tokens} is over the model's context "
                                 f"of {self.context} tokens")  # fmt: skip
            self.context, self.whose = cfg.slot_tokens, "This server's (--slot-tokens)"
        self.scheduler = _scheduler(pipeline, cfg)
        # Tokenizing and preprocessing run in worker threads; the tokenizer is not meant to be
        # shared across threads, so prompts are built one at a time.
        self._prompt_lock = threading.Lock()
        # A token spells at most this many characters of text, so a prompt of more than
        # context * max_token_chars characters is over the context before it is tokenized.
        self.max_token_chars = max(map(len, pipeline.tokenizer.get_vocab()))
        self.image_memory = ImageMemory(cfg.image_memory_bytes)
        self.fetcher = Fetcher(cfg)
        self.started = int(time.time())
        self._mailbox: _Mailbox | None = None

    def prepare(self, body: bytes) -> tuple[ChatRequest, Job]:
        """The body parsed and validated, images decoded, prompt built and checked against
        the context (blocking: run off the event loop)."""
        chat = parse_chat_request(_parse_json(body), self.cfg)
        chars = sum(len(m["content"]) for m in chat.messages)
        if chars > self.context * self.max_token_chars:  # refused before tokenizing
            raise invalid(f"{self.whose} maximum context length is {self.context} tokens; the "
                          f"messages hold {chars} characters, more than that many tokens can "
                          f"(at most {self.max_token_chars} characters each)", "messages",
                          "context_length_exceeded")  # fmt: skip
        files = read_images(chat.images, self.cfg, self.fetcher)
        with self.image_memory.reserve(sum(decode_cost(f, self.cfg) for f in files)):
            images = decode_images(files, self.cfg)
            del files
            try:
                with self._prompt_lock:
                    prompt: Prompt = self.pipeline.prompt(list(chat.messages), images)
            except ValueError as e:  # PromptError, placeholders, an image the processor refuses
                raise invalid(str(e), "messages") from None
            del images  # the prompt holds the processor's pixels; the decoded images go
        n = len(prompt.input_ids)
        room = self.context - n
        if room < 1 or (chat.max_tokens is not None and chat.max_tokens > room):
            asked = chat.max_tokens or 1
            raise invalid(f"{self.whose} maximum context length is {self.context} tokens; the "
                          f"messages take {n} tokens and {asked} were asked for the answer",
                          "messages", "context_length_exceeded")  # fmt: skip
        max_tokens = chat.max_tokens or min(self.cfg.default_max_tokens, room)
        try:
            sampling = self.pipeline.stop_config(
                max_new_tokens=max_tokens, temperature=chat.temperature, top_p=chat.top_p,
                top_k=chat.top_k, repetition_penalty=chat.repetition_penalty,
                seed=secrets.randbits(31) if chat.seed is None else chat.seed,
            )  # fmt: skip
        except ValueError as e:
            raise invalid(str(e)) from None
        stop = tuple(dict.fromkeys(chat.stop + sampling.stop_strings))
        return chat, Job(prompt, sampling, stop, sink=_no_sink)

    def submit(self, job: Job) -> asyncio.Queue[Event]:
        """Queues a prepared job (on the event loop); its events arrive on the returned queue."""
        if self._mailbox is None:
            self._mailbox = _Mailbox(asyncio.get_running_loop())
        events: asyncio.Queue[Event] = asyncio.Queue()
        job.sink = functools.partial(self._mailbox.post, events)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise _busy(e) from None
        return events

    async def respond(self, request: Request, chat: ChatRequest, job: Job,
                      events: asyncio.Queue[Event]):  # fmt: skip
        """The answer: a stream of server-sent events, or one JSON response."""
        meta = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()),
                "model": self.cfg.model_name}  # fmt: skip
        usage = {"prompt_tokens": len(job.prompt.input_ids)}
        if chat.stream:
            return StreamingResponse(
                self._stream(job, events, meta, usage, chat.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await self._gather(request, job, events, meta, usage)

    async def _gather(self, request, job, events, meta, usage) -> JSONResponse | None:
        """The whole answer as one response; the row stops as soon as the client leaves."""
        texts = []
        watch = asyncio.create_task(_post_on_disconnect(request, events))
        try:
            while (event := await events.get()) and event.kind == "delta":
                texts.append(event.text)
        finally:
            watch.cancel()
            job.cancelled.set()  # no-op when done; stops the row if the client left
        if event is None:
            return None  # nobody to answer
        if event.kind == "error":
            return _error_response(event.error)
        usage["completion_tokens"] = event.completion_tokens
        usage["total_tokens"] = usage["prompt_tokens"] + event.completion_tokens
        message = {"role": "assistant", "content": "".join(texts)}
        choice = {"index": 0, "message": message, "finish_reason": event.finish_reason,
                  "logprobs": None}  # fmt: skip
        return JSONResponse(
            {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}
        )

    async def _stream(self, job, events, meta, usage, include_usage: bool):
        meta = {**meta, "object": "chat.completion.chunk"}

        def chunk(delta, finish=None):
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse({**meta, "choices": [choice]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            while (event := await events.get()).kind == "delta":
                yield chunk({"content": event.text})  # one chunk per delta, as OpenAI streams
            if event.kind == "done":
                yield chunk({}, event.finish_reason)
                if include_usage:
                    total = usage["prompt_tokens"] + event.completion_tokens
                    counts = {**usage, "completion_tokens": event.completion_tokens,
                              "total_tokens": total}  # fmt: skip
                    yield _sse({**meta, "choices": [], "usage": counts})
            else:
                yield _sse(event.error.body())
            yield _sse("[DONE]")
        finally:
            job.cancelled.set()


def _scheduler(pipeline, cfg: ServeConfig) -> JobQueue:
    if cfg.scheduler == "batch":
        context = pipeline.cfg.text.max_position_embeddings
        return Scheduler(pipeline.generator, pipeline.decode, context, cfg.max_batch,
                         cfg.max_queue, cfg.batch_wait_s, cfg.batch_window_s)  # fmt: skip
    cache = PrefixCache.for_model(pipeline.cfg, cfg.prefix_cache_bytes)
    engine = Engine(pipeline.generator, num_slots=cfg.max_batch, max_length=cfg.slot_tokens,
                    prefix_cache=cache)  # fmt: skip
    return EngineScheduler(engine, pipeline.decode, cfg.max_queue, cfg.batch_wait_s,
                           cfg.batch_window_s)  # fmt: skip


def _no_sink(event: Event) -> None:
    raise RuntimeError("a job was run before its sink was set")


def create_app(pipeline, cfg: ServeConfig | None = None) -> FastAPI:
    """The app serving `pipeline` (an `inference.pipeline.Pipeline`) under `cfg`'s limits."""
    cfg = cfg or ServeConfig()
    # One call before any worker thread, so the tokenizer's settings are fixed from then on.
    pipeline.prompt("warm up")
    server = _Server(pipeline, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(server.scheduler.close)

    app = FastAPI(title="llava-jax", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)  # fmt: skip
    app.state.server = server
    app.add_middleware(Guard, cfg=cfg)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return _error_response(APIError(e.status_code, str(e.detail), code))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        # The cause goes to the log, not to the client (it may name files or other services).
        log.error("internal error on %s", request.url.path, exc_info=e)
        return _error_response(APIError(500, "internal error (see the server's log)",
                                        "internal_error"))  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _check_key(request, cfg.api_key)
        if server.scheduler.full:  # a flood is refused before its bodies are read
            raise _busy(QueueFull(f"{cfg.max_queue} requests are waiting already"))
        body = await _read_body(request, cfg.max_body_bytes, cfg.read_timeout_s)
        try:  # a place in the queue only once the body is here: slow uploads hold none
            arriving = server.scheduler.arriving()
        except QueueFull as e:
            raise _busy(e) from None
        with arriving:
            chat, job = await run_in_threadpool(server.prepare, body)
            events = server.submit(job)
        return await server.respond(request, chat, job, events)

    @app.get("/v1/models")
    async def models(request: Request):
        _check_key(request, cfg.api_key)
        model = {"id": cfg.model_name, "object": "model", "created": server.started,
                 "owned_by": "llava-jax"}  # fmt: skip
        return {"object": "list", "data": [model]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_name, "context": server.context,
                "queued": server.scheduler.queued, **server.scheduler.stats}  # fmt: skip

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
