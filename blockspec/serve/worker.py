"""The generation thread: continuous batching over one BatchDecoder, first come first served.

The model is not thread-safe, so a single thread runs every decoding step, under the server's kernel settings
(they live in a context variable, which a new thread would otherwise start from the defaults). Requests wait in a
FIFO queue and
enter the batch in arrival order as soon as it has a free row, so a waiting request is never overtaken and
none starves; requests join and leave the batch between steps. The server holds at most `max_batch` running
plus `max_waiting` waiting requests (one more is QueueFull: the caller's cue to answer 503). `cancel` removes
a waiting request at once, and a running one before the next step (its row goes to the next request). A
request whose step fails alone (StreamChunk.error) is answered 500; the others go on.

Each job reports to its event loop through an asyncio queue of events, always ending with exactly one
terminal event: the chunk that carries the result, ("error", (status, message)) or ("cancelled", None). A step's
events reach the loop in one hand-over (`emit_all`): one wake-up per step, not one per request, each of which
would make the generation thread and the event loop trade the GIL.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from blockspec.engine import BatchDecoder, GenerationResult, SamplingParams
from blockspec.errors import BlockspecError
from blockspec.kernels import KernelSettings, use_settings
from blockspec.serve.metrics import ServerMetrics

log = logging.getLogger("blockspec.serve")


class QueueFull(Exception):
    """No room in the queue: answer 503 with Retry-After."""


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    block_size: int | None = None  # None: the server's default
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_s: float = field(default_factory=time.perf_counter)
    generated: int = 0  # tokens streamed so far

    def emit(self, kind: str, payload: object) -> None:
        """Hand one event to the request's coroutine (from any thread)."""
        emit_all([(self, kind, payload)])


def emit_all(events: list[tuple[Job, str, object]]) -> None:
    """Hand events to their requests' coroutines (from any thread), in order: one call into each event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple[str, object]]]] = {}
    for job, kind, payload in events:
        by_loop.setdefault(job.loop, []).append((job.events, (kind, payload)))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _put_all(batch: list[tuple[asyncio.Queue, tuple[str, object]]]) -> None:
    for queue, event in batch:
        queue.put_nowait(event)


class Worker:
    def __init__(self, decoder: BatchDecoder, metrics: ServerMetrics, max_waiting: int,
                 kernel_settings: KernelSettings) -> None:
        self.decoder = decoder
        self.kernel_settings = kernel_settings
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.running: dict[int, Job] = {}  # the decoder's request id -> job (touched by the thread only)
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._num_running = 0  # running jobs, plus those just taken from the queue for the batch (under _cond)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="blockspec-generate", daemon=True)

    # ---- called from the event loop ---------------------------------------------------------------------
    def start(self) -> None:
        """Capture the decoder's CUDA graphs (under the server's settings, which a graph keeps), then serve."""
        started = time.perf_counter()
        with use_settings(self.kernel_settings):
            graphs = self.decoder.capture_graphs()
        if graphs:
            log.info("captured %d CUDA graphs in %.1f s", graphs, time.perf_counter() - started)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel everything and end the thread (server shutdown)."""
        with self._cond:
            self._stopping = True
            for job in self._waiting:
                job.emit("error", (503, "the server is shutting down"))
            self._waiting.clear()
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping or self.num_jobs >= self.decoder.max_batch + self.max_waiting:
                raise QueueFull
            self._waiting.append(job)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone (or no longer reading): free its place. A finished job is left alone."""
        job.cancelled.set()
        with self._cond:
            if job not in self._waiting:
                return  # running (the thread drops it before the next step) or already finished
            self._waiting.remove(job)
            self.metrics.waiting.set(len(self._waiting))
        self.metrics.requests.labels(outcome="cancelled").inc()
        job.emit("cancelled", None)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_jobs(self) -> int:
        """Requests running or waiting."""
        return self._num_running + len(self._waiting)

    # ---- the generation thread --------------------------------------------------------------------------
    def _admit(self) -> list[Job] | None:
        """Wait for work; take waiting jobs for the batch's free rows, in arrival order (None: stop)."""
        with self._cond:
            self._num_running = len(self.running)
            while not self._waiting and not self.running and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            free = self.decoder.max_batch - len(self.running)
            admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            self._num_running += len(admitted)
            self.metrics.waiting.set(len(self._waiting))
            return admitted

    def _run(self) -> None:
        with use_settings(self.kernel_settings):  # the steps, and the CUDA graphs they capture
            self._serve()

    def _serve(self) -> None:
        while (admitted := self._admit()) is not None:
            for job in admitted:
                self._start(job)
            self._drop_cancelled()
            if self.running:
                self._step()
            self.metrics.running.set(len(self.running))
        for seq_id, job in self.running.items():  # shutting down
            self.decoder.cancel(seq_id)
            job.emit("cancelled", None)
        self.running.clear()
        self.metrics.running.set(0)

    def _start(self, job: Job) -> None:
        if job.cancelled.is_set():  # cancelled just as it left the queue
            self.metrics.requests.labels(outcome="cancelled").inc()
            job.emit("cancelled", None)
            return
        self.metrics.queue_time.observe(time.perf_counter() - job.submitted_s)
        try:
            seq_id = self.decoder.add(job.prompt_ids, job.params, job.block_size)
        except BlockspecError as exc:  # a request the checks in app.py let through; the engine refused it
            self.metrics.requests.labels(outcome="error").inc()
            job.emit("error", (400, str(exc)))
            return
        self.running[seq_id] = job

    def _drop_cancelled(self) -> None:
        for seq_id, job in list(self.running.items()):
            if job.cancelled.is_set():
                self.decoder.cancel(seq_id)
                del self.running[seq_id]
                self.metrics.requests.labels(outcome="cancelled").inc()
                self.metrics.prompt_tokens.inc(len(job.prompt_ids))
                self.metrics.generation_tokens.inc(job.generated)
                job.emit("cancelled", None)

    def _step(self) -> None:
        try:
            outputs = self.decoder.step()
        except Exception:  # a bug: log it, answer 500 to the batch, keep serving
            log.exception("generation failed")
            for seq_id, job in self.running.items():
                self.decoder.cancel(seq_id)
                self.metrics.requests.labels(outcome="error").inc()
                job.emit("error", (500, "internal error during generation (the server log has the details)"))
            self.running.clear()
            return
        events = []
        for seq_id, chunk in outputs:
            job = self.running[seq_id]
            if chunk.error is not None:  # this request alone failed and left the batch
                log.error("request %d failed: %s", seq_id, chunk.error)
                del self.running[seq_id]
                self.metrics.requests.labels(outcome="error").inc()
                events.append((job, "error", (500, f"generation failed: {chunk.error}")))
                continue
            job.generated += len(chunk.token_ids)
            if chunk.result is not None:
                del self.running[seq_id]
                self._record_finished(job, chunk.result)
            events.append((job, "chunk", chunk))
        # the metrics first: a client that reads /metrics once answered finds its request counted
        self.metrics.running.set(len(self.running))
        emit_all(events)

    def _record_finished(self, job: Job, result: GenerationResult) -> None:
        m, s = self.metrics, result.stats
        m.requests.labels(outcome=result.finish_reason).inc()
        m.prompt_tokens.inc(s.prompt_tokens)
        m.generation_tokens.inc(s.generated_tokens)
        m.num_drafts.inc(s.steps)
        m.num_draft_tokens.inc(s.num_draft_tokens)
        m.num_accepted_tokens.inc(s.num_accepted_draft_tokens)
        for n in s.acceptance_lengths:
            m.acceptance_length.observe(n)
        m.ttft.observe(s.ttft_s)
        if s.generated_tokens > 1:
            m.tpot.observe(s.tpot_s)
        m.e2e.observe(time.perf_counter() - job.submitted_s)
