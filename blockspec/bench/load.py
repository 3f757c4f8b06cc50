"""A bounded load test of an OpenAI-compatible server, driven by the official `openai` client.

Each request is first sent alone (one after another: the reference answers), then all of them at once from
`concurrency` client threads, streaming. The report says whether every concurrent answer equals its
single-request answer (greedy decoding: batching must not change a token), counts errors, and gives latency
percentiles (end-to-end and time to first token) and the output throughput under load. Every call has a
timeout, and the whole test a deadline.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass


@dataclass
class LoadRequest:
    prompt: str
    max_tokens: int


@dataclass
class Answer:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float = 0.0
    error: str | None = None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def _ask(client: object, model: str, request: LoadRequest, stream: bool, timeout_s: float) -> Answer:
    started = time.perf_counter()
    kwargs = dict(model=model, messages=[{"role": "user", "content": request.prompt}], temperature=0,
                  max_tokens=request.max_tokens, timeout=timeout_s)
    answer = Answer()
    try:
        if not stream:
            reply = client.chat.completions.create(**kwargs)
            answer.text, answer.finish_reason = reply.choices[0].message.content, reply.choices[0].finish_reason
            answer.completion_tokens = reply.usage.completion_tokens
        else:
            parts = []
            for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                        **kwargs):
                if chunk.usage is not None:
                    answer.completion_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta.content:
                        if not parts:
                            answer.ttft_s = time.perf_counter() - started
                        parts.append(choice.delta.content)
                    answer.finish_reason = choice.finish_reason or answer.finish_reason
            answer.text = "".join(parts)
    except Exception as exc:  # any failure is a result of the load test, not a crash of it
        answer.error = f"{type(exc).__name__}: {exc}"
    answer.latency_s = time.perf_counter() - started
    return answer


def new_client(base_url: str, api_key: str = "none", timeout_s: float = 300.0) -> object:
    import openai

    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)


def stream_all(client: object, model: str, requests: list[LoadRequest], concurrency: int,
               timeout_s: float = 300.0) -> tuple[list[Answer], float]:
    """All requests from `concurrency` streaming client threads: the answers, in order, and the wall time."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(_ask, client, model, r, True, timeout_s) for r in requests]
        loaded = [f.result(timeout=timeout_s) for f in futures]
    return loaded, time.perf_counter() - started


def run_load(base_url: str, model: str, requests: list[LoadRequest], concurrency: int, api_key: str = "none",
             timeout_s: float = 300.0) -> dict:
    """Reference answers one at a time, then all requests from `concurrency` streaming clients."""
    client = new_client(base_url, api_key, timeout_s)
    reference = [_ask(client, model, r, stream=False, timeout_s=timeout_s) for r in requests]
    loaded, wall_s = stream_all(client, model, requests, concurrency, timeout_s)
    ok = [a for a in loaded if a.error is None]
    mismatches = [i for i, (a, b) in enumerate(zip(loaded, reference))
                  if a.error is None and (a.text, a.completion_tokens) != (b.text, b.completion_tokens)]
    latencies, ttfts = [a.latency_s for a in ok], [a.ttft_s for a in ok if a.ttft_s]
    tokens = sum(a.completion_tokens for a in ok)
    summary = {
        "requests": len(requests), "concurrency": concurrency, "errors": len(loaded) - len(ok),
        "reference_errors": sum(a.error is not None for a in reference), "mismatches": mismatches,
        "all_equal_to_single_request": not mismatches and len(ok) == len(requests),
        "wall_s": wall_s, "completion_tokens": tokens, "output_tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "single_request_mean_latency_s": sum(a.latency_s for a in reference) / len(reference),
    }
    for name, values in (("latency", latencies), ("ttft", ttfts)):
        if values:
            summary.update({f"{name}_p50_s": percentile(values, 50), f"{name}_p99_s": percentile(values, 99),
                            f"{name}_max_s": max(values)})
    return {"summary": summary, "answers": [asdict(a) for a in loaded], "reference": [asdict(a) for a in reference]}
