"""Sampling settings and the lossless acceptance rules.

Greedy: the draft proposes argmax tokens; the target keeps the longest prefix equal to its own argmax plus
one bonus token -- output identical to plain greedy decoding.

Sampling: the draft samples from its own distribution q (warped with the same temperature / top-k / top-p as
the target's p) and the standard speculative rule accepts draft token x with probability min(1, p(x)/q(x)),
resampling from norm(max(0, p - q)) at the first rejection and from p after a fully accepted block. Every
committed token is then distributed exactly as the target alone would sample it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from blockspec.errors import BlockspecError, brief


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the target's EOS ids
    stop_strings: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def validate(self) -> "SamplingParams":
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise BlockspecError(f"max_new_tokens must be a positive integer, got {brief(self.max_new_tokens)}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise BlockspecError(f"temperature must be a finite number >= 0, got {brief(self.temperature)}")
        if self.seed is not None and not (isinstance(self.seed, int) and -2**63 <= self.seed < 2**64):
            raise BlockspecError(f"seed must be an integer in [-2**63, 2**64), got {brief(self.seed)}")
        if not 0 < self.top_p <= 1:
            raise BlockspecError(f"top_p must be in (0, 1], got {brief(self.top_p)}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise BlockspecError(f"top_k must be a non-negative integer (0 = off), got {brief(self.top_k)}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise BlockspecError("stop strings must be non-empty strings")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def warped_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p, in fp32, over the last axis."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of `probs` [n, V] -> [n]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def accept_greedy(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Greedy verification of one sequence on the device.

    draft_tokens [k], target_logits [k+1, V] -> int64 tensor [1 + k + 1]: the number of accepted drafts `a`,
    then the target's choice at every position (position a is the bonus token). One small tensor so the host
    needs a single read per step.
    """
    choices = target_logits.argmax(-1)
    accepted = (draft_tokens == choices[:-1]).long().cumprod(0).sum().view(1)
    return torch.cat([accepted, choices])


def accept_sampled(draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                   generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative-sampling verification of one sequence.

    draft_tokens [k] drawn from draft_probs [k, V] (None: the draft is a point mass on its tokens, as when it
    proposes greedily); target_probs [k+1, V]. Returns (accepted count a, next token): the token the target
    commits after the a accepted drafts.
    """
    k = draft_tokens.shape[0]
    accepted = 0
    if k:
        rows = torch.arange(k, device=draft_tokens.device)
        p_x = target_probs[rows, draft_tokens]
        q_x = draft_probs[rows, draft_tokens] if draft_probs is not None else torch.ones_like(p_x)
        u = torch.rand(k, generator=generator, device=draft_tokens.device)
        # accept iff u < p/q, written without division (q_x > 0 for any token the draft sampled)
        accepted = int((u * q_x < p_x).long().cumprod(0).sum())
    if accepted == k:
        return accepted, int(sample(target_probs[k:k + 1], generator))
    if draft_probs is not None:
        residual = (target_probs[accepted] - draft_probs[accepted]).clamp_min(0)
    else:
        residual = target_probs[accepted].clone()
        residual[draft_tokens[accepted]] = 0
    if float(residual.sum()) <= 0:  # p == q up to rounding: any rejection then came from rounding alone
        residual = target_probs[accepted]
    return accepted, int(sample((residual / residual.sum())[None], generator))
