"""Sampling settings and the warped distributions both the draft and the target sample from (the draft's q is
warped with the same temperature / top-k / top-p as the target's p; engine/acceptance.py holds the rule)."""

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
    logprobs: int | None = None  # None: off; k: each token's log-probability under the target and its top k

    MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs

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
        if self.logprobs is not None and not (isinstance(self.logprobs, int)
                                              and 0 <= self.logprobs <= self.MAX_LOGPROBS):
            raise BlockspecError(f"logprobs must be an integer in 0..{self.MAX_LOGPROBS}, got {self.logprobs!r}")
        return self

    @property
    def needs_logits(self) -> bool:
        """A step must write this request's logits: it samples, or returns log-probabilities."""
        return not self.greedy or self.logprobs is not None

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


@dataclass
class TokenLogprob:
    """A committed token's log-probability under the target's own (unwarped) distribution at its position, and
    the `top` most likely tokens there, best first, as (token id, log-probability)."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """TokenLogprob for `tokens` [m] chosen at positions whose target logits are `logits` [m, V] (fp32 log-softmax)."""
    logp = torch.log_softmax(logits[:len(tokens)].float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    best = logp.topk(top, dim=-1) if top else None
    out = []
    for i, (token, value) in enumerate(zip(tokens, chosen)):
        pairs = list(zip(best.indices[i].tolist(), best.values[i].tolist())) if best is not None else []
        out.append(TokenLogprob(token, value, pairs))
    return out
