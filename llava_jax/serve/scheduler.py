"""The batching scheduler: one thread runs the jitted generator over batches of requests.

Requests wait in a bounded queue. When the generator is free, the scheduler takes the oldest
request and every waiting request that can share its batch (a combined length within the
context; sampling settings and seeds are per row, so any mix of them shares a batch), up to
`max_batch`; before it starts, it waits (at most `batch_wait_s`) for requests the server is
still reading or preparing (`arriving`), so that clients answered together by the last batch
come back together in the next. Requests arriving while a batch decodes join the next one.
The batch is padded to a power-of-two size with copies of its first prompt, so the compiled
programs are reused across batch sizes as the generator's shape buckets reuse them across
lengths.

Each row streams through `TextStream`: token ids become text deltas as they arrive (held back
while they could be the start of a stop string), and the row ends at its own `max_tokens` or
stop string even while others in its batch go on. When every row has ended, the batch stops.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from llava_jax.inference.generator import Prompt, SamplingConfig
from llava_jax.serve.errors import APIError

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue holds `max_queue` requests already."""


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request's sink receives, from the scheduler thread.

    kind "delta": `text` is new answer text. "done": the answer ended (`finish_reason`,
    `completion_tokens`). "error": `error` ends the request.
    """

    kind: str
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: APIError | None = None


@dataclasses.dataclass
class Job:
    """One request for the scheduler.

    Attributes:
      prompt: the tokenized prompt with its views.
      sampling: this request's settings (`max_new_tokens` is its `max_tokens`; a request
        without a seed has been given a random one).
      stop: stop strings of this request and of the template, cut from the answer.
      sink: receives `Event`s, called from the scheduler thread; must not block.
    """

    prompt: Prompt
    sampling: SamplingConfig
    stop: tuple[str, ...]
    sink: Callable[[Event], None]
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)


class _BatchDone(Exception):
    """Raised from the token callback when every row has ended: stops the generator."""


class TextStream:
    """Turns one row's token ids into text deltas and decides when the row ends."""

    def __init__(self, job: Job, decode: Callable[[list[int]], str]):
        self.job, self.decode = job, decode
        self.ids: list[int] = []
        self.sent = 0  # characters of the answer already sent
        self.finished = False
        self.left = False  # the client went away before the answer ended
        self.hold = max(map(len, job.stop), default=1) - 1

    def push(self, token: int) -> None:
        if self.finished:
            return
        if self.job.cancelled.is_set():
            self.finished = self.left = True  # nothing to send
            return
        self.ids.append(token)
        if token in self.job.sampling.stop_token_ids:
            return self.finish("stop")
        text = self.decode(self.ids)
        cut = min((i for i in (text.find(s, max(self.sent - self.hold, 0)) for s in self.job.stop)
                   if i >= 0), default=-1)  # fmt: skip
        if cut >= 0:
            return self.finish("stop", text[:cut])
        if len(self.ids) >= self.job.sampling.max_new_tokens:
            return self.finish("length", text)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        self._send(text[: len(text) - self.hold])

    def finish(self, reason: str, text: str | None = None) -> None:
        if self.finished:
            return
        if text is None:  # the answer so far, without a stop token or what follows a stop string
            ids = self.ids
            if ids and ids[-1] in self.job.sampling.stop_token_ids:
                ids = ids[:-1]
            text = (self.decode(ids) if ids else "").removesuffix("\ufffd")
            text = text[: min([i for i in map(text.find, self.job.stop) if i >= 0] or [len(text)])]
        self._send(text)
        self.finished = True
        self.job.sink(Event("done", finish_reason=reason, completion_tokens=len(self.ids)))

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.job.sink(Event("delta", text=text[self.sent :]))
            self.sent = len(text)


def _batch_size(n: int, max_batch: int) -> int:
    return min(1 << (n - 1).bit_length(), max(max_batch, n))


class JobQueue:
    """The bounded queue of jobs and the thread that serves them (`_loop`, in subclasses).

    Args:
      decode: token ids -> text (the pipeline's `decode`).
      max_batch, max_queue, batch_wait_s, batch_window_s: as in `ServeConfig`.
    """

    def __init__(self, decode, max_batch: int = 8, max_queue: int = 64,
                 batch_wait_s: float = 0.05, batch_window_s: float = 0.0):  # fmt: skip
        self.decode = decode
        self.max_batch, self.max_queue = max_batch, max_queue
        self.batch_wait_s, self.batch_window_s = batch_wait_s, min(batch_window_s, batch_wait_s)
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._arriving = 0
        # `cancelled`: rows stopped early because their client left.
        self.stats = {"batches": 0, "requests": 0, "running": 0, "largest_batch": 0,
                      "cancelled": 0}  # fmt: skip
        self._thread = threading.Thread(target=self._loop, name="llava-jax-scheduler", daemon=True)
        self._thread.start()

    # -- the caller's side -------------------------------------------------------------------

    def arriving(self) -> contextlib.AbstractContextManager:
        """Marks a request being prepared (its body read, its images not yet decoded): it
        counts against `max_queue` from now on, and an idle scheduler waits for it (up to
        `batch_wait_s`) so that it joins the batch about to start.

        Raises:
          QueueFull: `max_queue` requests are waiting or arriving already.
        """
        with self._cond:
            if self._arriving + len(self._pending) >= self.max_queue:
                raise QueueFull(f"{self._arriving + len(self._pending)} requests are waiting "
                                "or arriving already")  # fmt: skip
            self._arriving += 1
        return self._arrived()

    @contextlib.contextmanager
    def _arrived(self):
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify()

    def submit(self, job: Job) -> None:
        """Queues a job; raises `QueueFull` when `max_queue` jobs are waiting."""
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are waiting already")
            self._pending.append(job)
            self._cond.notify()

    @property
    def full(self) -> bool:
        """Whether `arriving` would raise `QueueFull` now."""
        return self._arriving + len(self._pending) >= self.max_queue

    @property
    def queued(self) -> int:
        return len(self._pending)

    def close(self, timeout: float = 30.0) -> None:
        """Stops taking jobs, fails the waiting ones, and ends the thread after its batch."""
        with self._cond:
            self._closing = True
            waiting = list(self._pending)
            self._pending.clear()
            self._cond.notify()
        for job in waiting:
            job.sink(Event("error", error=APIError(503, "the server is shutting down",
                                                   "server_shutting_down")))  # fmt: skip
        self._thread.join(timeout)

    def _loop(self) -> None:
        raise NotImplementedError

    def _gather(self) -> None:
        """Waits, up to `batch_wait_s`, while requests being read or prepared may still join
        the batch about to start (and at least `batch_window_s`); returns early when full."""
        start = time.monotonic()
        while len(self._pending) < self.max_batch and not self._closing:
            elapsed = time.monotonic() - start
            if elapsed >= self.batch_wait_s:
                return
            if not self._arriving and elapsed >= self.batch_window_s:
                return
            until = self.batch_wait_s if self._arriving else self.batch_window_s
            self._cond.wait(until - elapsed)


class Scheduler(JobQueue):
    """Collects jobs from a bounded queue and runs them through `generator` in batches, each
    from start to end (`serve --scheduler batch`).

    Args:
      generator: a `llava_jax.inference.generator.Generator`.
      decode: token ids -> text (the pipeline's `decode`).
      context: the model's context length, in tokens.
      max_batch, max_queue, batch_wait_s, batch_window_s: as in `ServeConfig`.
    """

    def __init__(self, generator, decode, context: int, max_batch: int = 8, max_queue: int = 64,
                 batch_wait_s: float = 0.05, batch_window_s: float = 0.0):  # fmt: skip
        self.generator, self.context = generator, context
        super().__init__(decode, max_batch, max_queue, batch_wait_s, batch_window_s)

    # -- the scheduler thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                self._gather()
                jobs = self._take()
            if jobs:
                self._run(jobs)

    def _take(self) -> list[Job]:
        """The oldest live job and the waiting jobs that can share its batch."""
        while self._pending and self._pending[0].cancelled.is_set():
            self._pending.popleft()
        if not self._pending:
            return []
        jobs, longest, most_new = [], 0, 0
        for job in list(self._pending):
            if len(jobs) == self.max_batch:
                break
            if job.cancelled.is_set():
                self._pending.remove(job)
                continue
            n, new = len(job.prompt.input_ids), job.sampling.max_new_tokens
            if max(longest, n) + max(most_new, new) > self.context:
                continue
            jobs.append(job)
            self._pending.remove(job)
            longest, most_new = max(longest, n), max(most_new, new)
        return jobs

    def _run(self, jobs: list[Job]) -> None:
        size = _batch_size(len(jobs), self.max_batch)
        self.stats["running"] = len(jobs)
        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        streams = [TextStream(job, self.decode) for job in jobs]
        started = [False]

        def on_token(row: int, token: int) -> None:
            started[0] = True
            if row < len(streams):
                streams[row].push(token)
                if all(s.finished for s in streams):
                    raise _BatchDone

        # Padding rows copy the first job; they end when it does.
        pad = size - len(jobs)
        prompts = [job.prompt for job in jobs] + [jobs[0].prompt] * pad
        sampling = [job.sampling for job in jobs] + [jobs[0].sampling] * pad
        try:
            self.generator.generate(prompts, sampling, on_token=on_token)
        except _BatchDone:
            pass
        except Exception as e:  # noqa: BLE001 (a bug or a device error: keep serving)
            log.exception("generation failed for a batch of %d", len(jobs))
            if len(jobs) > 1 and not started[0]:
                self.stats["batches"] -= 1
                self.stats["requests"] -= len(jobs)
                for job in jobs:  # one bad prompt must not fail the others
                    self._run([job])
                return
            for s in streams:
                if not s.finished:
                    s.finished = True
                    s.job.sink(Event("error", error=APIError(500, f"generation failed: {e}",
                                                             "generation_failed")))  # fmt: skip
            return
        finally:
            self.stats["running"] = 0
            self.stats["cancelled"] += sum(s.left for s in streams)
        for s in streams:  # rows the generator ended (a stop string it saw first)
            s.finish("stop")
