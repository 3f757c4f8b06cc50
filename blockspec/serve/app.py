"""The OpenAI-compatible HTTP application: `create_app(target, draft)` returns a FastAPI app.

Endpoints: GET /health, GET /metrics (Prometheus text), GET /v1/models, POST /v1/chat/completions and
POST /v1/completions (server-sent events with `"stream": true`). The event loop only validates, tokenizes,
queues and formats; generation runs on the worker thread of worker.py, which decodes up to
`max_num_seqs` requests together (continuous batching: they join in arrival order and leave between steps).
A client that disconnects has its generation cancelled between two decoding steps.

Errors are OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 for bad input (malformed
JSON, wrong types, unsupported parameters, a prompt that does not fit the context, an unknown model with
code model_not_found), 401 for a wrong API key, 404 for an unknown path, 503 with Retry-After when the
queue is full.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hmac
import inspect
import json
import math
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from blockspec.draft import DraftModel
from blockspec.engine import BatchDecoder, GenerationResult, GenerationStats, SamplingParams
from blockspec.errors import BlockspecError
from blockspec.serve.metrics import ServerMetrics
from blockspec.serve.schemas import ChatCompletionRequest, CompletionRequest, CommonFields
from blockspec.serve.worker import Job, QueueFull, Worker
from blockspec.target import Target

DEFAULT_MAX_MODEL_LEN = 4096
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left


class APIError(Exception):
    """An error answered as an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def spec_decode_metrics(stats: GenerationStats) -> dict:
    """Per-request speculative metrics, with vLLM's names."""
    return {"mean_acceptance_length": stats.mean_acceptance_length, "num_drafts": stats.steps,
            "num_draft_tokens": stats.num_draft_tokens, "num_accepted_draft_tokens": stats.num_accepted_draft_tokens,
            "acceptance_histogram": stats.acceptance_histogram, "block_size": stats.block_size}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


async def parse_body(request: Request, schema: type[BaseModel]) -> BaseModel:
    """The JSON body as `schema` (whatever the Content-Type says, as curl -d sends form-encoded).

    Malformed JSON and wrong types are 400s naming the first few offending fields."""
    try:
        data = json.loads(await request.body())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:3]]
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        param = ".".join(str(p) for p in errors[0]["loc"]) or None
        raise APIError(400, "invalid request: " + "; ".join(parts) + more, param=param) from None


class Reply:
    """One request's answer as OpenAI objects (chat or text completion): whole, or as SSE chunks."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int, include_usage: bool) -> None:
        self.chat, self.model, self.prompt_tokens, self.include_usage = chat, model, prompt_tokens, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _object(self, kind: str, choices: list[dict], **extra: object) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def usage(self, result: GenerationResult) -> dict:
        n = len(result.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def whole(self, result: GenerationResult) -> dict:
        choice: dict = {"index": 0, "logprobs": None, "finish_reason": result.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        return self._object("chat.completion" if self.chat else "text_completion", [choice],
                            usage=self.usage(result), spec_decode_metrics=spec_decode_metrics(result.stats))

    def chunk(self, text: str = "", finish_reason: str | None = None, first: bool = False, **extra: object) -> str:
        choice: dict = {"index": 0, "logprobs": None, "finish_reason": finish_reason}
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
    """Request handling shared by the routes: validation, tokenization, queueing, answering."""

    def __init__(self, target: Target, decoder: BatchDecoder, name: str, max_model_len: int, max_queue: int,
                 api_key: str | None) -> None:
        self.name, self.max_model_len, self.api_key = name, max_model_len, api_key
        self.max_block = decoder.max_block
        self.vocab_size = target.model.config.vocab_size
        self.metrics = ServerMetrics(decoder.block_size)
        self.worker = Worker(decoder, self.metrics, max_queue)
        # The worker thread decodes with target.tokenizer; the event loop encodes with its own copy, so the
        # (not thread-safe) tokenizer object is never used by two threads at once.
        tokenizer = target.tokenizer
        try:
            tokenizer = copy.deepcopy(tokenizer)
        except Exception:  # an uncopyable tokenizer: share it (encode and decode rarely collide)
            pass
        self.encoder = dataclasses.replace(target, tokenizer=tokenizer)
        # chat_template_kwargs are template variables: they may not set apply_chat_template's own arguments
        own_args = inspect.signature(tokenizer.apply_chat_template).parameters if tokenizer is not None else {}
        self.reserved_template_args = set(own_args) - {"kwargs"}

    # ---- errors -----------------------------------------------------------------------------------------
    def error_response(self, status: int, message: str, param: str | None = None, code: str | None = None,
                       headers: dict[str, str] | None = None) -> JSONResponse:
        if 400 <= status < 500:
            self.metrics.requests.inc(outcome="invalid")
        return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)

    def api_key_ok(self, scope: dict) -> bool:
        if self.api_key is None or not scope["path"].startswith("/v1"):
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, f"Bearer {self.api_key}".encode())

    # ---- request -> prompt ids and sampling parameters --------------------------------------------------
    def check_common(self, body: CommonFields) -> None:
        if body.model is not None and body.model != self.name:
            raise APIError(400, f"model {body.model!r} is not served here; this server serves {self.name!r}",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, f"n must be 1 (one completion per request), got {body.n}", param="n")
        unsupported = body.unsupported()
        if unsupported:
            raise APIError(400, f"unsupported parameter(s): {', '.join(unsupported)}", param=unsupported[0])

    def encode(self, prompt: str | list[dict], chat: bool, template_kwargs: dict | None = None) -> list[int]:
        try:
            return self.encoder.encode(prompt, chat=chat, template_kwargs=template_kwargs)
        except BlockspecError as exc:
            raise APIError(400, str(exc)) from None
        except Exception as exc:  # the chat template refused the conversation (roles, missing variables...)
            raise APIError(400, f"the chat template failed: {type(exc).__name__}: {exc}", param="messages") from None

    def sampling_params(self, body: CommonFields, n_prompt: int, max_tokens: int | None) -> SamplingParams:
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        room = self.max_model_len - n_prompt
        if room < 1 or (max_tokens is not None and max_tokens > room):
            asked = "" if max_tokens is None else f" and max_tokens is {max_tokens}"
            raise APIError(400, f"this model's maximum context length is {self.max_model_len} tokens, but the prompt "
                                f"has {n_prompt} tokens{asked}: shorten the prompt or lower max_tokens",
                           param="max_tokens" if room >= 1 else "messages", code="context_length_exceeded")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        params = SamplingParams(max_new_tokens=room if max_tokens is None else max_tokens,
                                temperature=body.temperature, top_p=body.top_p, top_k=max(body.top_k, 0),
                                seed=body.seed, stop_strings=stop, ignore_eos=body.ignore_eos)
        try:
            return params.validate()
        except BlockspecError as exc:
            raise APIError(400, str(exc)) from None

    # ---- queue and answer -------------------------------------------------------------------------------
    def retry_after_s(self) -> int:
        """A guess at when a place frees up: mean request latency so far times the batches of requests ahead."""
        e2e = self.metrics.e2e
        mean = e2e.sum / e2e.count if e2e.count else 1.0
        batches_ahead = math.ceil((self.worker.num_waiting + 1) / self.worker.decoder.max_batch)
        return int(min(60, max(1, math.ceil(mean * batches_ahead))))

    async def answer(self, request: Request, body: CommonFields, prompt_ids: list[int], max_tokens: int | None,
                     chat: bool):
        params = self.sampling_params(body, len(prompt_ids), max_tokens)
        if body.block_size is not None and body.block_size > self.max_block:
            raise APIError(400, f"block_size {body.block_size} exceeds the draft's trained block size "
                                f"{self.max_block}", param="block_size")
        job = Job(prompt_ids, params, asyncio.get_running_loop(), body.block_size)
        try:
            self.worker.submit(job)
        except QueueFull:
            self.metrics.requests.inc(outcome="rejected")
            raise APIError(503, f"the server is busy ({self.worker.max_waiting} requests waiting): retry later",
                           code="queue_full", headers={"Retry-After": str(self.retry_after_s())}) from None
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        reply = Reply(chat, self.name, len(prompt_ids), include_usage)
        if body.stream:
            return StreamingResponse(self.stream(job, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self.collect(request, job, reply)

    async def stream(self, job: Job, reply: Reply):
        """SSE body. Starlette cancels this generator when the client disconnects; `finally` frees the slot."""
        try:
            if reply.chat:
                yield reply.chunk(first=True)
            while True:
                kind, payload = await job.events.get()
                if kind == "chunk":
                    if payload.text:
                        yield reply.chunk(text=payload.text)
                    if payload.result is not None:
                        for chunk in reply.last_chunks(payload.result):
                            yield chunk
                        break
                else:  # an error, or cancelled by a server shutdown
                    status, message = payload if kind == "error" else (503, "the server is shutting down")
                    yield sse(error_body(status, message))
                    break
            yield sse("[DONE]")
        finally:
            self.worker.cancel(job)

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
                    raise APIError(503, "the request was cancelled")
        finally:
            watcher.cancel()
            self.worker.cancel(job)

    async def _cancel_on_disconnect(self, request: Request, job: Job) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        self.worker.cancel(job)


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
               block_size: int | None = None, max_num_seqs: int = 8) -> FastAPI:
    """The server for one target (and draft; None = plain decoding). `max_num_seqs`: requests decoded
    together. `max_queue`: requests allowed to wait (the running ones not counted) before new ones get 503.
    `max_model_len`: prompt + max_tokens limit; by default the target's context, at most
    DEFAULT_MAX_MODEL_LEN (every one of the `max_num_seqs` cache rows holds that many positions).
    `block_size`: the default block (requests may ask for a smaller one)."""
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
    max_block = draft.block_size if draft is not None else 1
    decoder = BatchDecoder(target, draft, max_batch=max_num_seqs, max_len=max_model_len + 2 * max_block,
                           block_size=block_size)
    service = Service(target, decoder, served_model_name or target.name, max_model_len, max_queue, api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.worker.start()
        try:
            yield
        finally:
            service.worker.stop()

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
        service.metrics.requests.inc(outcome="error")
        return service.error_response(500, f"internal error ({type(exc).__name__}: {exc})")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": started,
                                            "owned_by": "blockspec", "max_model_len": service.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest)
        service.check_common(body)
        template_kwargs = body.chat_template_kwargs or {}
        reserved = sorted(set(template_kwargs) & service.reserved_template_args)
        if reserved:
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}",
                           param="chat_template_kwargs")
        messages = [{"role": m.role, "content": m.text} for m in body.messages]
        prompt_ids = service.encode(messages, chat=True, template_kwargs=template_kwargs)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await service.answer(request, body, prompt_ids, max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        service.check_common(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, f"one prompt per request, got a list of {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = service.encode(prompt, chat=False)
        else:
            prompt_ids = list(prompt)
            if any(not 0 <= t < service.vocab_size for t in prompt_ids):
                raise APIError(400, f"prompt token ids must be in 0..{service.vocab_size - 1}", param="prompt")
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        return await service.answer(request, body, prompt_ids, max_tokens, chat=False)

    return app
