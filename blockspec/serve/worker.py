"""The generation thread: one request at a time, first come first served, from a bounded queue.

The model is not thread-safe, so a single thread runs every generation. Requests wait in a FIFO queue of
bounded length (a full queue is the caller's cue to answer 503); a waiting request is never overtaken, so
none starves. A request runs until it finishes or its client goes away: `cancel` removes a waiting request
at once, and stops a running one between two decoding steps (the engine's stream is a Python generator, so
stopping it is just not pulling the next step).

Each job reports to its event loop through an asyncio queue of events, always ending with exactly one
terminal event: the chunk that carries the result, ("error", (status, message)) or ("cancelled", None).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from blockspec.engine import GenerationResult, SamplingParams, SpeculativeDecoder
from blockspec.errors import BlockspecError
from blockspec.serve.metrics import ServerMetrics

log = logging.getLogger("blockspec.serve")


class QueueFull(Exception):
    """No room in the queue: answer 503 with Retry-After."""


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_s: float = field(default_factory=time.perf_counter)

    def emit(self, kind: str, payload: object) -> None:
        """Hand one event to the request's coroutine (from any thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class Worker:
    def __init__(self, decoder: SpeculativeDecoder, metrics: ServerMetrics, max_waiting: int) -> None:
        self.decoder = decoder
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.running: Job | None = None
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="blockspec-generate", daemon=True)

    # ---- called from the event loop ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel everything and end the thread (server shutdown)."""
        with self._cond:
            self._stopping = True
            for job in self._waiting:
                job.emit("error", (503, "the server is shutting down"))
            self._waiting.clear()
            if self.running is not None:
                self.running.cancelled.set()
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping or len(self._waiting) >= self.max_waiting:
                raise QueueFull
            self._waiting.append(job)
            self.metrics.waiting.set(len(self._waiting))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone (or no longer reading): free its place. A finished job is left alone."""
        job.cancelled.set()
        with self._cond:
            if job not in self._waiting:
                return  # running (the thread stops it between steps) or already finished
            self._waiting.remove(job)
            self.metrics.waiting.set(len(self._waiting))
        self.metrics.requests.inc(outcome="cancelled")
        job.emit("cancelled", None)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ---- the generation thread --------------------------------------------------------------------------
    def _next_job(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            self.running = self._waiting.popleft()
            self.metrics.waiting.set(len(self._waiting))
            return self.running

    def _run(self) -> None:
        while (job := self._next_job()) is not None:
            self.metrics.running.set(1)
            self.metrics.queue_time.observe(time.perf_counter() - job.submitted_s)
            try:
                self._generate(job)
            finally:
                with self._cond:
                    self.running = None
                self.metrics.running.set(0)

    def _generate(self, job: Job) -> None:
        m = self.metrics
        if job.cancelled.is_set():  # cancelled just as it left the queue
            m.requests.inc(outcome="cancelled")
            job.emit("cancelled", None)
            return
        stream = self.decoder.stream(job.prompt_ids, job.params)
        generated = 0
        try:
            for chunk in stream:
                generated += len(chunk.token_ids)
                job.emit("chunk", chunk)
                if chunk.result is not None:
                    self._record_finished(job, chunk.result)
                    return
                if job.cancelled.is_set():
                    m.requests.inc(outcome="cancelled")
                    m.prompt_tokens.inc(len(job.prompt_ids))
                    m.generation_tokens.inc(generated)
                    job.emit("cancelled", None)
                    return
        except BlockspecError as exc:  # a request the checks in app.py let through; the engine refused it
            m.requests.inc(outcome="error")
            job.emit("error", (400, str(exc)))
        except Exception as exc:  # a bug: log it, answer 500, keep serving
            log.exception("generation failed")
            m.requests.inc(outcome="error")
            job.emit("error", (500, f"internal error during generation ({type(exc).__name__}: {exc})"))
        finally:
            stream.close()

    def _record_finished(self, job: Job, result: GenerationResult) -> None:
        m, s = self.metrics, result.stats
        m.requests.inc(outcome=result.finish_reason)
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
