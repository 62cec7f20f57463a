"""The FastAPI app: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, and the chat
page at `/`.

A request is read (within the body limit), validated (`request.py`), its images decoded and
its prompt built in a worker thread, then queued for the scheduler thread. The answer comes
back through an asyncio queue fed from the scheduler with `call_soon_threadsafe`: streamed as
server-sent events in OpenAI's chunk format, or gathered into one response.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
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

from llava_jax.generate import Prompt
from llava_jax.serve.config import ServeConfig
from llava_jax.serve.errors import APIError, invalid
from llava_jax.serve.request import ChatRequest, load_images, parse_chat_request
from llava_jax.serve.scheduler import Event, Job, QueueFull, Scheduler

STATIC = Path(__file__).parent / "static"
DRAIN_BYTES = 64 * 1024 * 1024  # read this much of an oversized body, so the 413 arrives
DISCONNECT_POLL_S = 0.05  # a non-streaming request checks this often whether its client left


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length", "")
    too_big = APIError(413, f"the request body is over {limit} bytes (the server's "
                       "--max-body-mb)", "request_too_large")  # fmt: skip
    if declared.isdigit() and int(declared) > limit + DRAIN_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit + DRAIN_BYTES:
            break
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise too_big
    try:
        return json.loads(b"".join(chunks))
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
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _busy(e: QueueFull) -> APIError:
    return APIError(429, f"the server is busy ({e}); retry shortly", "queue_full")


async def _next_event(events: asyncio.Queue, request: Request) -> Event | None:
    """The request's next event, or None once its client has disconnected."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                return None


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
        self.scheduler = Scheduler(
            pipeline.generator, pipeline.decode, self.context, cfg.max_batch, cfg.max_queue,
            cfg.batch_wait_s, cfg.batch_window_s,
        )  # fmt: skip
        # Tokenizing and preprocessing run in worker threads; the tokenizer is not meant to be
        # shared across threads, so prompts are built one at a time.
        self._prompt_lock = threading.Lock()
        self.started = int(time.time())
        self._mailbox: _Mailbox | None = None

    def prepare(self, chat: ChatRequest) -> Job:
        """Images decoded, prompt built and checked against the context (blocking)."""
        images = load_images(chat.images, self.cfg)
        try:
            with self._prompt_lock:
                prompt: Prompt = self.pipeline.prompt(list(chat.messages), images)
        except ValueError as e:  # PromptError, placeholders, an image the processor refuses
            raise invalid(str(e), "messages") from None
        n = len(prompt.input_ids)
        room = self.context - n
        if room < 1 or (chat.max_tokens is not None and chat.max_tokens > room):
            asked = chat.max_tokens or 1
            raise invalid(f"This model's maximum context length is {self.context} tokens; the "
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
        return Job(prompt, sampling, stop, sink=_no_sink)

    async def submit(self, chat: ChatRequest) -> tuple[Job, asyncio.Queue[Event]]:
        """Prepares and queues a request; its events arrive on the returned queue."""
        job = await run_in_threadpool(self.prepare, chat)
        if self._mailbox is None:
            self._mailbox = _Mailbox(asyncio.get_running_loop())
        events: asyncio.Queue[Event] = asyncio.Queue()
        job.sink = functools.partial(self._mailbox.post, events)
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise _busy(e) from None
        return job, events

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
        try:
            while (event := await _next_event(events, request)) and event.kind == "delta":
                texts.append(event.text)
        finally:
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


def _no_sink(event: Event) -> None:
    raise RuntimeError("a job was run before its sink was set")


def create_app(pipeline, cfg: ServeConfig | None = None) -> FastAPI:
    """The app serving `pipeline` (a `llava_jax.pipeline.Pipeline`) under `cfg`'s limits."""
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

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return _error_response(APIError(e.status_code, str(e.detail), code))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                        "internal_error"))  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _check_key(request, cfg.api_key)
        try:
            arriving = server.scheduler.arriving()  # counts against the queue bound
        except QueueFull as e:
            raise _busy(e) from None
        with arriving:
            chat = parse_chat_request(await _read_json(request, cfg.max_body_bytes), cfg)
            job, events = await server.submit(chat)
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
