"""Real tau during and after training: the speculative loop itself, greedy, on held-out prompts.

tau = mean over responses of each response's mean acceptance length (SPEC section 7).
"""

from __future__ import annotations

import copy
import time

import torch

from blockspec.draft import DraftModel
from blockspec.engine import SamplingParams, SpeculativeDecoder
from blockspec.target import Target


def serving_copy(draft: DraftModel, dtype: torch.dtype, device: torch.device) -> DraftModel:
    """The draft as the engine runs it: a detached copy in the target's dtype, eval mode, no grads."""
    model = copy.deepcopy(draft).to(device=device, dtype=dtype).eval()
    return model.requires_grad_(False)


def measure_tau(decoder: SpeculativeDecoder, prompts: list[list[int]], max_new_tokens: int,
                block_size: int | None = None) -> dict:
    """Greedy generation of every prompt; tau, histogram, token counts and timing."""
    params = SamplingParams(max_new_tokens=max_new_tokens)
    per_response, histogram, tokens, steps = [], None, 0, 0
    tpot = []
    started = time.perf_counter()
    texts = []
    for prompt in prompts:
        result = decoder.generate(list(prompt), params, block_size=block_size)
        s = result.stats
        if s.steps:
            per_response.append(s.mean_acceptance_length)
        hist = s.acceptance_histogram
        histogram = list(hist) if histogram is None else [a + b for a, b in zip(histogram, hist)]
        tokens += s.generated_tokens
        steps += s.steps
        if s.tpot_s:
            tpot.append(s.tpot_s)
        texts.append(result.token_ids)
    seconds = time.perf_counter() - started
    return {"tau": sum(per_response) / len(per_response) if per_response else 0.0, "responses": len(prompts),
            "generated_tokens": tokens, "steps": steps, "histogram": histogram, "seconds": round(seconds, 3),
            "mean_tpot_s": sum(tpot) / len(tpot) if tpot else None, "outputs": texts}


def evaluate_draft(target: Target, draft: DraftModel, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """tau of a (training) draft on `prompts`: runs a serving copy, leaves the draft and every RNG untouched."""
    model = serving_copy(draft, target.dtype, target.device)
    decoder = SpeculativeDecoder(target, model, max_len=max(len(p) for p in prompts) + max_new_tokens + 64)
    result = measure_tau(decoder, prompts, max_new_tokens)
    result.pop("outputs")
    del decoder, model
    return result
