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
    """Greedy generation of every prompt: tau, the pooled acceptance histogram, token counts and timing."""
    params = SamplingParams(max_new_tokens=max_new_tokens)
    started = time.perf_counter()
    stats = [decoder.generate(list(prompt), params, block_size=block_size).stats for prompt in prompts]
    seconds = time.perf_counter() - started
    taus = [s.mean_acceptance_length for s in stats if s.steps]
    tpots = [s.tpot_s for s in stats if s.tpot_s]
    return {"tau": sum(taus) / len(taus) if taus else 0.0, "responses": len(prompts),
            "generated_tokens": sum(s.generated_tokens for s in stats), "steps": sum(s.steps for s in stats),
            "histogram": [sum(counts) for counts in zip(*(s.acceptance_histogram for s in stats))],
            "seconds": round(seconds, 3), "mean_tpot_s": sum(tpots) / len(tpots) if tpots else None}


def evaluate_draft(target: Target, draft: DraftModel, prompts: list[list[int]], max_new_tokens: int) -> dict:
    """tau of a (training) draft on `prompts`: runs a serving copy, leaves the draft and every RNG untouched."""
    model = serving_copy(draft, target.dtype, target.device)
    decoder = SpeculativeDecoder(target, model, max_len=max(len(p) for p in prompts) + max_new_tokens + 64)
    result = measure_tau(decoder, prompts, max_new_tokens)
    del decoder, model
    return result
