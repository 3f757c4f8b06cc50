"""The OpenAI-compatible HTTP application: `create_app(target, draft)` returns a FastAPI app.

Endpoints: GET (or HEAD) /health, GET /metrics (Prometheus or OpenMetrics text), GET /v1/models,
GET /v1/models/{model}, POST /v1/chat/completions and POST /v1/completions (server-sent events with `"stream": true`;
`logprobs` and `top_logprobs` as OpenAI's, from the target's own distribution at each token). The event loop only
reads, validates, queues and formats (naming log-probability tokens with a tokenizer of its own); tokenizing (and
the chat template) runs on a thread of its own, and generation on the worker thread of worker.py, which decodes up
to `max_num_seqs` requests together (continuous batching: they join in arrival order and leave between steps). A
client that disconnects has its generation cancelled between two decoding steps.

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`, with short messages that never
echo a huge input or a library's internals: 400 for bad input (malformed JSON, wrong types, unsupported
parameters, a prompt that does not fit the context, an unknown model with code model_not_found), 401 for a
wrong API key, 404 for an unknown path or model, 413 for a body over `max_request_bytes`, 500 for a request whose
generation failed (the others in its batch go on), 503 with Retry-After when the queue is full, and 503
while the server shuts down (`DrainingServer`).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hmac
import inspect
import json
import logging
import math
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from blockspec.draft import DraftModel
from blockspec.engine import BatchDecoder, GenerationResult, GenerationStats, SamplingParams
from blockspec.engine.sampling import TokenLogprob
from blockspec.errors import BlockspecError, brief
from blockspec.kernels import KernelSettings, current_settings
from blockspec.serve import DEFAULT_MAX_REQUEST_BYTES
from blockspec.serve.metrics import ServerMetrics
from blockspec.serve.schemas import ChatCompletionRequest, CompletionRequest, CommonFields
from blockspec.serve.worker import Job, QueueFull, Worker
from blockspec.target import Target

DEFAULT_MAX_MODEL_LEN = 4096
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left
MAX_MESSAGE_CHARS = 500  # every error message is cut to this (messages are built short; this is the backstop)
LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for -inf, which JSON cannot carry

log = logging.getLogger("blockspec.serve")


class APIError(Exception):
    """An error answered as an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS - 3] + "..."
    return {"error": {"message": message, "type": kind, "param": param and param[:100], "code": code}}


def spec_decode_metrics(stats: GenerationStats) -> dict:
    """Per-request speculative metrics, with vLLM's names, and the blocks this request's steps drafted with
    (`block_size` is the most it may draft; with --max-step-tokens a step's block shrinks as the batch grows)."""
    return {"mean_acceptance_length": stats.mean_acceptance_length, "num_drafts": stats.steps,
            "num_draft_tokens": stats.num_draft_tokens, "num_accepted_draft_tokens": stats.num_accepted_draft_tokens,
            "acceptance_histogram": stats.acceptance_histogram, "block_size": stats.block_size,
            "block_size_counts": stats.block_size_counts}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 past `limit` bytes: at once from Content-Length, else as soon as the body
    streaming in (chunked, or longer than declared) passes it."""
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_body(raw: bytes, schema: type[BaseModel]) -> BaseModel:
    """The JSON body as `schema` (whatever the Content-Type says, as curl -d sends form-encoded).

    Malformed JSON and wrong types are 400s naming the first few offending fields."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                            f"{exc.colno})") from None
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid JSON (it is not UTF-8 text)") from None
    except ValueError:  # Python refuses to read integers of more than 4,300 digits
        raise APIError(400, "the request body holds a number too long to read") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        parts = [f"{'.'.join(str(p)[:40] for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:3]]
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        param = ".".join(str(p) for p in errors[0]["loc"]) or None
        raise APIError(400, "invalid request: " + "; ".join(parts) + more, param=param) from None


def own_copy(tokenizer: object) -> object:
    """A copy of the tokenizer for one thread (they are not thread-safe), or the same one if it cannot be copied
    (uncopyable tokenizers are rare, and their uses seldom collide)."""
    try:
        return copy.deepcopy(tokenizer)
    except Exception:
        return tokenizer


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2-style byte-level BPE's alphabet, character -> byte: printable Latin-1 bytes stand for themselves, each
    other byte b for chr(256 + its rank among those others)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + rank): b for rank, b in enumerate(others)}


class TokenTexts:
    """A token's text and UTF-8 bytes for log-probability entries: the token decoded alone, special tokens included
    (as vLLM shows them), cached. A token holding part of a character decodes to U+FFFD; its bytes then come from
    its vocabulary entry where the tokenizer is byte-level or has byte-fallback pieces `<0xNN>`, else they are
    None. Without a tokenizer a token reads `token_id:N`."""

    def __init__(self, tokenizer: object | None) -> None:
        self.tokenizer = tokenizer
        self.alphabet = byte_level_alphabet()
        self.cache: dict[int, tuple[str, list[int] | None]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int] | None]:
        if token_id not in self.cache:
            self.cache[token_id] = self._lookup(token_id)
        return self.cache[token_id]

    def _lookup(self, token_id: int) -> tuple[str, list[int] | None]:
        if self.tokenizer is None:
            return f"token_id:{token_id}", None
        text = self.tokenizer.decode([token_id])
        if "\ufffd" not in text:
            return text, list(text.encode())
        piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
        if re.fullmatch("<0x[0-9A-Fa-f]{2}>", piece):
            return text, [int(piece[3:5], 16)]
        if piece and all(c in self.alphabet for c in piece):
            return text, [self.alphabet[c] for c in piece]
        return text, None


def floored(logprob: float) -> float:
    """A log-probability JSON can carry: -inf (and NaN) become LOGPROB_FLOOR."""
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


class Reply:
    """One request's answer as OpenAI objects (chat or text completion): whole, or as SSE chunks."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int, include_usage: bool, texts: TokenTexts) -> None:
        self.chat, self.model, self.prompt_tokens, self.include_usage = chat, model, prompt_tokens, include_usage
        self.texts = texts
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text_offset = 0  # completions' text_offset of the next token: the lengths of the tokens before it

    def _object(self, kind: str, choices: list[dict], **extra: object) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def usage(self, result: GenerationResult) -> dict:
        n = len(result.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        """OpenAI's logprobs object for these tokens (None when not asked for): chat's `content` entries, or the
        completions' parallel lists, whose top_logprobs hold the chosen token and the top k, as OpenAI's do, and
        whose text_offset continues from the tokens formatted before (a stream's earlier chunks)."""
        if entries is None:
            return None
        if self.chat:
            return {"content": [{**self._entry(lp.token_id, lp.logprob),
                                 "top_logprobs": [self._entry(t, v) for t, v in lp.top]} for lp in entries]}
        tokens = [self.texts(lp.token_id)[0] for lp in entries]
        offsets = []
        for token in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": [floored(lp.logprob) for lp in entries],
                "top_logprobs": [{self.texts(t)[0]: floored(v) for t, v in [(lp.token_id, lp.logprob), *lp.top]}
                                 for lp in entries],
                "text_offset": offsets}

    def _entry(self, token_id: int, logprob: float) -> dict:
        text, raw = self.texts(token_id)
        return {"token": text, "logprob": floored(logprob), "bytes": raw}

    def whole(self, result: GenerationResult) -> dict:
        choice: dict = {"index": 0, "logprobs": self.logprobs(result.logprobs), "finish_reason": result.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        return self._object("chat.completion" if self.chat else "text_completion", [choice],
                            usage=self.usage(result), spec_decode_metrics=spec_decode_metrics(result.stats))

    def chunk(self, text: str = "", finish_reason: str | None = None, first: bool = False,
              logprobs: list[TokenLogprob] | None = None, **extra: object) -> str:
        choice: dict = {"index": 0, "logprobs": self.logprobs(logprobs), "finish_reason": finish_reason}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        else:
            choice["text"] = text
        return sse(self._object("chat.completion.chunk" if self.chat else "text_completion", [choice], **extra))

    def last_chunks(self, result: GenerationResult) -> list[str]:
        """The chunk with finish_reason (and the metrics), then the usage chunk if asked for."""
        metrics = spec_decode_metrics(result.stats)
        out = [self.chunk(finish_reason=result.finish_reason, spec_decode_metrics=metrics)]
        if self.include_usage:  # OpenAI's stream_options.include_usage: one more chunk, no choices
            out.append(sse(self._object("chat.completion.chunk" if self.chat else "text_completion", [],
                                        usage=self.usage(result), spec_decode_metrics=metrics)))
        return out


class Service:
    """Request handling shared by the routes: validation, tokenization, queueing, answering, draining."""

    def __init__(self, target: Target, decoder: BatchDecoder, name: str, max_model_len: int, max_queue: int,
                 api_key: str | None, max_request_bytes: int, kernel_settings: KernelSettings) -> None:
        self.name, self.max_model_len, self.api_key = name, max_model_len, api_key
        self.max_request_bytes = max_request_bytes
        self.max_block = decoder.max_block
        self.vocab_size = target.model.config.vocab_size
        self.eos_token_ids = tuple(target.eos_token_ids)
        self.metrics = ServerMetrics(decoder.block_size)
        self.worker = Worker(decoder, self.metrics, max_queue, kernel_settings)
        self.draining = False  # shutting down: new requests get 503
        # Tokenizing a long prompt takes a while: one thread of its own keeps the event loop answering. The
        # worker thread decodes with target.tokenizer, this thread encodes with its own copy and the event loop
        # names log-probability tokens with a third, so the (not thread-safe) tokenizer object is never used by
        # two threads at once.
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="blockspec-tokenize")
        tokenizer = own_copy(target.tokenizer)
        self.encoder = dataclasses.replace(target, tokenizer=tokenizer)
        self.token_texts = TokenTexts(own_copy(target.tokenizer))
        # No token spans more characters than the vocabulary's longest entry, so a prompt of more characters
        # than max_model_len such entries cannot fit: refused without tokenizing it.
        longest = max(map(len, tokenizer.get_vocab()), default=1) if tokenizer is not None else 1
        self.max_prompt_chars = max_model_len * longest
        # chat_template_kwargs are template variables: they may not set apply_chat_template's own arguments
        # nor the variables it sets itself
        own_args = inspect.signature(tokenizer.apply_chat_template).parameters if tokenizer is not None else {}
        self.reserved_template_args = set(own_args) - {"kwargs"} | {"messages"}

    # ---- errors -----------------------------------------------------------------------------------------
    def error_response(self, status: int, message: str, param: str | None = None, code: str | None = None,
                       headers: dict[str, str] | None = None) -> JSONResponse:
        if 400 <= status < 500:
            self.metrics.requests.labels(outcome="invalid").inc()
        return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)

    def api_key_ok(self, scope: dict) -> bool:
        if self.api_key is None or not scope["path"].startswith("/v1"):
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, f"Bearer {self.api_key}".encode())

    # ---- request -> prompt ids and sampling parameters --------------------------------------------------
    def check_common(self, body: CommonFields) -> None:
        if body.model is not None and body.model != self.name:
            raise APIError(400, f"model {brief(body.model)} is not served here; this server serves {self.name!r}",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, f"n must be 1 (one completion per request), got {brief(body.n)}", param="n")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream: true (drop it, or stream the answer)",
                           param="stream_options")
        unsupported = body.unsupported()
        if unsupported:
            raise APIError(400, f"unsupported parameter(s): {', '.join(unsupported)}", param=unsupported[0])

    async def encode(self, prompt: str | list[dict], chat: bool, template_kwargs: dict | None = None) -> list[int]:
        """Token ids, computed on the tokenizing thread; a prompt too long to fit is refused before."""
        param = "messages" if chat else "prompt"
        chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
        if chars > self.max_prompt_chars:
            raise APIError(400, f"the prompt has {chars} characters, more than this model's maximum context "
                                f"length of {self.max_model_len} tokens can hold: shorten the prompt",
                           param=param, code="context_length_exceeded")
        # JSON may escape half a surrogate pair ("\ud800"): Python reads it into a str that no tokenizer encodes
        texts = [prompt] if isinstance(prompt, str) else [t for m in prompt for t in (m["role"], m["content"])]
        try:
            for text in texts:
                text.encode()
        except UnicodeEncodeError:
            raise APIError(400, f"the text of {param} is not valid Unicode: it holds an unpaired UTF-16 surrogate "
                                f"(an escape in \\ud800-\\udfff without its pair)", param=param) from None
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, self._encode, prompt, chat,
                                                                template_kwargs)

    def _encode(self, prompt: str | list[dict], chat: bool, template_kwargs: dict | None) -> list[int]:
        try:
            return self.encoder.encode(prompt, chat=chat, template_kwargs=template_kwargs)
        except BlockspecError as exc:
            raise APIError(400, str(exc)) from None
        except Exception as exc:
            from jinja2 import TemplateError

            if isinstance(exc, TemplateError):  # the template refused the conversation: its words are for users
                raise APIError(400, f"the chat template refused these messages: {exc}", param="messages") from None
            # the template or tokenizer tripped over this input; its internals are no business of the client's
            log.warning("tokenizing a request failed", exc_info=True)
            if not chat:  # no template involved: the tokenizer refused the text
                raise APIError(400, "the tokenizer cannot encode this prompt", param="prompt") from None
            raise APIError(400, "the chat template cannot render these messages with these "
                                "chat_template_kwargs", param="messages") from None

    def sampling_params(self, body: CommonFields, n_prompt: int, max_tokens: int | None) -> SamplingParams:
        prompt_param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty", param=prompt_param)
        room = self.max_model_len - n_prompt
        if room < 1 or (max_tokens is not None and max_tokens > room):
            # the limit's name as the client sent it (chat's max_completion_tokens wins over max_tokens)
            field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
            asked = "" if max_tokens is None else f" and {field} is {brief(max_tokens)}"
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens, but the prompt "
                                f"has {n_prompt} tokens{asked}: shorten the prompt or lower {field}",
                           param=field if room >= 1 else prompt_param, code="context_length_exceeded")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        stop_ids = None  # the target's EOS ids
        if body.stop_token_ids:
            if any(not 0 <= t < self.vocab_size for t in body.stop_token_ids):
                raise APIError(400, f"stop_token_ids must be token ids in 0..{self.vocab_size - 1}",
                               param="stop_token_ids")
            # vLLM's stop ids end the answer besides EOS (unless ignore_eos); SamplingParams' replace EOS
            stop_ids = tuple(body.stop_token_ids) + (() if body.ignore_eos else self.eos_token_ids)
        params = SamplingParams(max_new_tokens=room if max_tokens is None else max_tokens,
                                temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                                seed=body.seed, stop_token_ids=stop_ids, stop_strings=stop,
                                ignore_eos=body.ignore_eos, logprobs=body.num_logprobs)
        try:
            return params.validate()
        except BlockspecError as exc:
            raise APIError(400, str(exc)) from None

    # ---- queue and answer -------------------------------------------------------------------------------
    def retry_after_s(self) -> int:
        """A guess at when a place frees up: mean request latency so far times the batches of requests ahead."""
        mean = self.metrics.mean_latency_s() or 1.0
        batches_ahead = math.ceil((self.worker.num_waiting + 1) / self.worker.decoder.max_batch)
        return int(min(60, max(1, math.ceil(mean * batches_ahead))))

    async def answer(self, request: Request, body: CommonFields, prompt_ids: list[int], max_tokens: int | None,
                     chat: bool) -> StreamingResponse | JSONResponse:
        params = self.sampling_params(body, len(prompt_ids), max_tokens)
        if body.block_size is not None and body.block_size > self.max_block:
            raise APIError(400, f"block_size {brief(body.block_size)} exceeds the draft's trained block size "
                                f"{self.max_block}", param="block_size")
        if self.draining:
            self.metrics.requests.labels(outcome="rejected").inc()
            raise APIError(503, "the server is shutting down: retry on another server or later",
                           code="shutting_down")
        job = Job(prompt_ids, params, asyncio.get_running_loop(), body.block_size)
        try:
            self.worker.submit(job)
        except QueueFull:
            self.metrics.requests.labels(outcome="rejected").inc()
            running = self.worker.num_jobs - self.worker.num_waiting
            raise APIError(503, f"the server is busy ({running} requests running, {self.worker.num_waiting} "
                                f"waiting): retry later", code="queue_full",
                           headers={"Retry-After": str(self.retry_after_s())}) from None
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        reply = Reply(chat, self.name, len(prompt_ids), include_usage, self.token_texts)
        if body.stream:
            return StreamingResponse(self.stream(job, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self.collect(request, job, reply)

    async def stream(self, job: Job, reply: Reply) -> AsyncIterator[str]:
        """SSE body. Starlette cancels this generator when the client disconnects; `finally` frees the slot.
        The events waiting when it wakes go out in one write (a client that reads slower than the steps come
        costs one send, not one per step)."""
        try:
            if reply.chat:
                yield reply.chunk(first=True)
            done = False
            while not done:
                events = [await job.events.get()]
                while not job.events.empty():
                    events.append(job.events.get_nowait())
                out = []
                for kind, payload in events:
                    done = self._format_event(kind, payload, reply, out)
                    if done:
                        break
                if out:  # nothing when a step's text is all held back
                    yield "".join(out)
        finally:
            self.worker.cancel(job)

    @staticmethod
    def _format_event(kind: str, payload: object, reply: Reply, out: list[str]) -> bool:
        """Append one worker event's SSE chunks to `out`; True after the last one ([DONE] included)."""
        if kind == "chunk":
            # a step's tokens bring their log-probabilities even while their text is held back (a possible
            # stop string), as vLLM's chunks do: one entry per token, in the chunk of its step
            if payload.text or payload.logprobs:
                out.append(reply.chunk(text=payload.text, logprobs=payload.logprobs))
            if payload.result is None:
                return False
            out += reply.last_chunks(payload.result)
        else:  # an error, or cancelled by a server shutdown
            status, message = payload if kind == "error" else (503, "the server is shutting down")
            out.append(sse(error_body(status, message)))
        out.append(sse("[DONE]"))
        return True

    async def collect(self, request: Request, job: Job, reply: Reply) -> JSONResponse:
        watcher = asyncio.create_task(self._cancel_on_disconnect(request, job))
        try:
            while True:
                kind, payload = await job.events.get()
                if kind == "chunk" and payload.result is not None:
                    return JSONResponse(reply.whole(payload.result))
                if kind == "error":
                    raise APIError(*payload)
                if kind == "cancelled":  # by the disconnect watcher (nobody reads this) or a shutdown
                    raise APIError(503, "the server is shutting down")
        finally:
            watcher.cancel()
            self.worker.cancel(job)

    async def _cancel_on_disconnect(self, request: Request, job: Job) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        self.worker.cancel(job)

    async def drain(self, timeout_s: float) -> None:
        """Shut down gently: new requests get 503 from now on, the admitted ones have `timeout_s` seconds to
        finish, then the rest are ended (a 503, or an SSE error event then [DONE])."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.worker.num_jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self.worker.stop)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM or SIGINT drains the service (`Service.drain`) before
    uvicorn shuts down, so that no stream is cut off mid-chunk. A second signal is uvicorn's own: it stops
    without waiting."""

    def __init__(self, config: uvicorn.Config, service: Service, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.service, self.shutdown_timeout_s = service, shutdown_timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig, frame) -> None:
        if self.loop is None or self.service.draining or self.should_exit:
            super().handle_exit(sig, frame)
        else:  # a signal handler may not touch the loop's tasks: hand the start over to the loop
            self.service.draining = True
            self.loop.call_soon_threadsafe(self._start_draining)

    def _start_draining(self) -> None:
        log.info("draining: new requests get 503; running ones have %.0f s to finish", self.shutdown_timeout_s)
        self._drain_task = asyncio.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.service.drain(self.shutdown_timeout_s)
        finally:
            self.should_exit = True


class _APIKeyCheck:
    """ASGI middleware: /v1 paths need `Authorization: Bearer KEY` (checked before the body is parsed)."""

    def __init__(self, app, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not self.service.api_key_ok(scope):
            response = self.service.error_response(401, "invalid or missing API key: send the header "
                                                        "'Authorization: Bearer <key>'", code="invalid_api_key")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(target: Target, draft: DraftModel | None = None, *, served_model_name: str | None = None,
               api_key: str | None = None, max_queue: int = 64, max_model_len: int | None = None,
               block_size: int | None = None, max_num_seqs: int = 8,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_step_tokens: int | None = None,
               kernel_settings: KernelSettings | None = None) -> FastAPI:
    """The server for one target (and draft; None = plain decoding). `max_num_seqs`: requests decoded
    together. `max_queue`: requests allowed to wait beside the `max_num_seqs` running ones before new ones
    get 503. `max_model_len`: prompt + max_tokens limit; by default the target's context, at most
    DEFAULT_MAX_MODEL_LEN (every one of the `max_num_seqs` cache rows holds that many positions).
    `block_size`: the default block (requests may ask for a smaller one). `max_request_bytes`: larger
    bodies get 413. `max_step_tokens`: each step drafts the largest power-of-two block whose rows x block fits
    it (None: always the requests' own blocks; `blockspec serve` picks it by device). `kernel_settings`: what the
    generation thread decodes under (default: the settings current here), e.g.
    KernelSettings(batch_invariant=True) for `--exact`."""
    context = target.model.config.max_position_embeddings
    if max_model_len is None:
        max_model_len = min(context, DEFAULT_MAX_MODEL_LEN)
    elif not 1 <= max_model_len <= context:
        raise BlockspecError(f"max model length {max_model_len} must be between 1 and the target's context "
                             f"({context} tokens)")
    if max_queue < 1:
        raise BlockspecError(f"the queue must hold at least 1 request, got {max_queue}")
    if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
        raise BlockspecError(f"max_num_seqs must be a positive integer, got {max_num_seqs!r}")
    if max_request_bytes < 1:
        raise BlockspecError(f"the request size limit must be at least 1 byte, got {max_request_bytes}")
    max_block = draft.block_size if draft is not None else 1
    decoder = BatchDecoder(target, draft, max_batch=max_num_seqs, max_len=max_model_len + 2 * max_block,
                           block_size=block_size, max_step_tokens=max_step_tokens)
    service = Service(target, decoder, served_model_name or target.name, max_model_len, max_queue, api_key,
                      max_request_bytes, kernel_settings or current_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.worker.start()
        try:
            yield
        finally:
            service.worker.stop()
            service.tokenizing.shutdown(wait=False, cancel_futures=True)

    started = int(time.time())
    app = FastAPI(title="blockspec", summary="OpenAI-compatible speculative decoding server", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(_APIKeyCheck, service=service)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return service.error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return service.error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        service.metrics.requests.labels(outcome="error").inc()
        return service.error_response(500, "internal error (the server log has the details)")

    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers often probe with HEAD
    async def health() -> JSONResponse:
        if service.draining:  # load balancers: send new requests elsewhere
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = service.metrics.exposition(request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    served = {"id": service.name, "object": "model", "created": started, "owned_by": "blockspec",
              "max_model_len": service.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [served]}

    @app.get("/v1/models/{model:path}")  # :path: model ids often hold a slash (org/name)
    async def model(model: str) -> dict:
        if model != service.name:
            raise APIError(404, f"the model {brief(model)} does not exist; this server serves {service.name!r}",
                           param="model", code="model_not_found")
        return served

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_body(await read_body(request, service.max_request_bytes), ChatCompletionRequest)
        service.check_common(body)
        template_kwargs = body.chat_template_kwargs or {}
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        reserved = sorted(set(template_kwargs) & service.reserved_template_args)
        if reserved:
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}",
                           param="chat_template_kwargs")
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        prompt_ids = await service.encode(messages, chat=True, template_kwargs=template_kwargs)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await service.answer(request, body, prompt_ids, max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_body(await read_body(request, service.max_request_bytes), CompletionRequest)
        service.check_common(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):  # a batch of prompts
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request, got a list of {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = await service.encode(prompt, chat=False)
        else:
            prompt_ids = list(prompt)
            if any(not 0 <= t < service.vocab_size for t in prompt_ids):
                raise APIError(400, f"prompt token ids must be in 0..{service.vocab_size - 1}", param="prompt")
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        return await service.answer(request, body, prompt_ids, max_tokens, chat=False)

    return app
