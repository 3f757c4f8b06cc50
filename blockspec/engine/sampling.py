"""Sampling settings and the warped distributions both the draft and the target sample from (the draft's q is
warped with the same temperature / top-k / top-p as the target's p; engine/acceptance.py holds the rule)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

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


def warped_probs(logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p, in fp32, over the last axis. A sequence of settings
    gives each entry of the first axis its own (one set of launches for a batch of rows; a row's result does
    not depend on the rows beside it)."""
    rows = [params] if isinstance(params, SamplingParams) else list(params)
    shape = (len(rows),) + (1,) * (logits.dim() - 1)

    def column(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=logits.device).view(shape)

    vocab = logits.shape[-1]
    logits = logits.float() / column([p.temperature for p in rows], torch.float32)
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in rows]  # 0: off
    if max(top_k):
        values = torch.topk(logits, max(top_k), dim=-1).values
        kth = values.gather(-1, column([max(k - 1, 0) for k in top_k], torch.long).expand(*values.shape[:-1], 1))
        kth = kth.masked_fill(column([k == 0 for k in top_k], torch.bool), float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if min(p.top_p for p in rows) < 1:
        top_p = column([p.top_p for p in rows], torch.float32)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop = ((sorted_probs.cumsum(-1) - sorted_probs) >= top_p) & (top_p < 1)
        kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        probs = torch.where(top_p < 1, kept / kept.sum(-1, keepdim=True), probs)
    return probs


def draw(logits: torch.Tensor, params: Sequence[SamplingParams],
         uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's tokens from `logits` [n, ..., V] under its own settings `params` [n]: a greedy row's argmax, a
    sampled row's draw at `uniform` [n, ...] from its warped distribution; and those distributions [n, ..., V]
    (a greedy row's zeros)."""
    tokens = logits.argmax(-1)
    sampled = [row for row, p in enumerate(params) if not p.greedy]
    index = torch.tensor(sampled, device=logits.device)
    probs = warped_probs(logits[index], [params[row] for row in sampled])
    tokens[index] = sample(probs, uniform[index])
    if len(sampled) < len(params):
        probs = torch.zeros_like(logits, dtype=probs.dtype).index_copy_(0, index, probs)
    return tokens, probs


def uniforms(generators: Sequence[torch.Generator | None], slots: Sequence[int], width: int,
             device: torch.device | str) -> torch.Tensor:
    """[n, width, 3] float64 uniforms in [0, 1) for one step: row i's first slots[i] triples come from its own
    generator (zeros for a row without one, and past slots[i]). A block slot's triple is (the draft's draw, the
    acceptance test, the target's draw there): a row consumes the same numbers whatever rows are beside it."""
    out = torch.zeros(len(slots), width, 3, dtype=torch.float64, device=device)
    for row, (generator, count) in enumerate(zip(generators, slots)):
        if generator is not None and count:
            out[row, :count] = torch.rand(count, 3, generator=generator, dtype=torch.float64, device=device)
    return out


def sample(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One draw from each distribution `weights` [..., V] (non-negative, any positive total) at `uniform` [...]
    in [0, 1): the token whose slice of the cumulative sum (float64) holds uniform x total. A token of weight 0
    is never drawn. The caller's uniforms decide every draw, so a batch of rows needs no launch per row."""
    cumulative = weights.double().cumsum(-1)
    point = (uniform * cumulative[..., -1])[..., None]
    # clamped: a row whose weights are not finite is reported by the caller, never indexed out of bounds
    return torch.searchsorted(cumulative, point, right=True)[..., 0].clamp_(0, weights.shape[-1] - 1)


@dataclass
class TokenLogprob:
    """A committed token's log-probability under the target's own (unwarped) distribution at its position, and
    the `top` most likely tokens there, best first, as (token id, log-probability)."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: Sequence[Sequence[int]],
                   tops: Sequence[int]) -> list[list[TokenLogprob]]:
    """Per row i: a TokenLogprob for each of tokens[i], chosen at the first len(tokens[i]) positions of the
    target's logits `logits` [n, s, V] (fp32 log-softmax), with its tops[i] most likely tokens; one host read."""
    ids = torch.tensor([list(row) + [0] * (logits.shape[1] - len(row)) for row in tokens], device=logits.device)
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = max(tops)
    columns = [logp.gather(-1, ids[..., None])]
    if top:
        best = logp.topk(top, dim=-1)
        columns += [best.values, best.indices.float()]  # token ids are exact in fp32 below 2**24
    table = torch.cat(columns, dim=-1).tolist()
    return [[TokenLogprob(token, slot[0], [(int(i), v) for v, i in zip(slot[1:1 + k], slot[1 + top:1 + top + k])])
             for token, slot in zip(chosen, row)]
            for row, chosen, k in zip(table, tokens, tops)]
