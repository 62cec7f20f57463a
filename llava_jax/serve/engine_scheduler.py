"""The continuous-batching scheduler (`serve --scheduler engine`, the default): one thread
runs the decode engine, and requests join and leave its slots at every step.

Jobs wait in the same bounded queue as the batch scheduler's. Whenever slots are free, waiting
jobs take them (the engine prefills them, reusing a prompt prefix from its prefix cache, and
they decode from the next step on); a row that ends, or whose client has gone, frees its slot
at once. An idle engine given a job waits, as the batch scheduler does, up to `batch_wait_s`
for the requests the server is still preparing, so that clients answered together start
together. `/health` counts as `batches` the runs from idle to idle, as `largest_batch` the
most rows decoded together.
"""

from __future__ import annotations

import logging

from llava_jax.inference.engine import Engine, Request
from llava_jax.serve.errors import APIError
from llava_jax.serve.scheduler import Event, Job, JobQueue, TextStream

log = logging.getLogger(__name__)


class EngineScheduler(JobQueue):
    """Runs jobs through `engine`, whose slots (`engine.num_slots`) bound the rows decoded
    together.

    Args:
      engine: a `llava_jax.inference.engine.Engine`.
      decode: token ids -> text (the pipeline's `decode`).
      max_queue, batch_wait_s, batch_window_s: as in `ServeConfig`.
    """

    def __init__(self, engine: Engine, decode, max_queue: int = 64, batch_wait_s: float = 0.05,
                 batch_window_s: float = 0.0):  # fmt: skip
        self.engine = engine
        self._running: dict[Request, tuple[Job, TextStream]] = {}
        super().__init__(decode, engine.num_slots, max_queue, batch_wait_s, batch_window_s)
        self.stats["slots"] = engine.num_slots
        if engine.prefix_cache is not None:
            self.stats.update(engine.prefix_cache.stats, prefix_cache_bytes=0)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self.engine.busy and not self._closing:
                    self._cond.wait()
                if self._closing:
                    break
                if not self.engine.busy:
                    self._gather()
                    self.stats["batches"] += bool(self._pending)
                free = self.engine.num_slots - self.engine.active - len(self.engine.waiting)
                while self._pending and free > 0:
                    job = self._pending.popleft()
                    if not job.cancelled.is_set():
                        free -= self._add(job)
            for request, (job, _) in list(self._running.items()):
                if job.cancelled.is_set():
                    self.engine.cancel(request)
            try:
                self.engine.step()
            except Exception as e:  # noqa: BLE001 (a bug or a device error: keep serving)
                log.exception("the decode engine failed with %d rows", len(self._running))
                self._fail_all(APIError(500, f"generation failed: {e}", "generation_failed"))
                self.engine.reset()
            self._count()
        self._fail_all(APIError(503, "the server is shutting down", "server_shutting_down"))

    def _add(self, job: Job) -> bool:
        stream = TextStream(job, self.decode)

        def on_token(token: int) -> bool:  # True: the stream ended it (a stop, a gone client)
            stream.push(token)
            return stream.finished

        request = Request(job.prompt, job.sampling, on_token=on_token, on_finish=self._finished)
        try:
            self.engine.add(request)
        except ValueError as e:  # over a slot: the server checks the context before
            job.sink(Event("error", error=APIError(400, str(e), "context_length_exceeded")))
            return False
        self._running[request] = (job, stream)
        self.stats["requests"] += 1
        return True

    def _finished(self, request: Request) -> None:
        """Called by the engine when a request ends."""
        job, stream = self._running.pop(request)
        if request.finish_reason == "error":
            log.error("generation failed for a request", exc_info=request.error)
            stream.finished = True
            job.sink(Event("error", error=APIError(500, f"generation failed: {request.error}",
                                                   "generation_failed")))  # fmt: skip
        elif request.finish_reason == "cancelled":
            stream.finished = stream.left = True
        else:
            stream.finish(request.finish_reason)  # no-op when the stream ended it
        self.stats["cancelled"] += stream.left

    def _fail_all(self, error: APIError) -> None:
        for request in list(self._running):
            job, stream = self._running.pop(request)
            if not stream.finished:
                stream.finished = True
                job.sink(Event("error", error=error))
        self.engine.clear()

    def _count(self) -> None:
        self.stats["running"] = self.engine.active
        self.stats["steps"] = self.engine.stats["steps"]
        self.stats["decoded_tokens"] = self.engine.stats["decoded_tokens"]
        self.stats["largest_batch"] = max(self.stats["largest_batch"], self.engine.active)
        cache = self.engine.prefix_cache
        if cache is not None:
            self.stats.update(cache.stats, prefix_cache_bytes=cache.bytes)
