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
        # the bound: top_k becomes an int64 tensor in the step, where a larger one fails the whole batch
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < 2**63:
            raise BlockspecError(f"top_k must be an integer in [0, 2**63) (0 = off), got {brief(self.top_k)}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise BlockspecError("stop strings must be non-empty strings")
        if self.logprobs is not None and not (isinstance(self.logprobs, int)
                                              and 0 <= self.logprobs <= self.MAX_LOGPROBS):
            raise BlockspecError(f"logprobs must be an integer in 0..{self.MAX_LOGPROBS}, got {self.logprobs!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RowSampling:
    """Rows' sampling settings as tensors [n] on the device, so that one set of launches (or one CUDA graph)
    serves rows with different settings: temperature (0: greedy), top_k (0: off), top_p (1: off). `truncate`
    says whether a sampling row has a top-k or top-p (`truncates`): only then does warping sort the vocabulary."""
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    truncate: bool

    @staticmethod
    def of(params: Sequence[SamplingParams], device: torch.device | str) -> "RowSampling":
        return RowSampling(torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
                           torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
                           torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
                           truncates(params))

    @property
    def greedy(self) -> torch.Tensor:
        return self.temperature == 0


def truncates(params: Sequence[SamplingParams]) -> bool:
    """Whether any of these requests samples with a top-k or a top-p."""
    return any(not p.greedy and (p.top_k > 0 or p.top_p < 1) for p in params)


def warp(logits: torch.Tensor, rows: RowSampling) -> torch.Tensor:
    """Probabilities after each row's temperature, top-k and top-p, in fp32, over the last axis of `logits`
    [n, ..., V] (a greedy row's at temperature 1; the caller takes its argmax). Tensor ops only: a CUDA graph
    holds them, and a row's result does not depend on the rows beside it."""
    shape = (-1,) + (1,) * (logits.dim() - 1)
    temperature = torch.where(rows.greedy, 1.0, rows.temperature).view(shape)
    logits = logits.float() / temperature
    probs = torch.softmax(logits, dim=-1)
    if not rows.truncate:
        return probs
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    top_k = rows.top_k.view(shape).expand(*logits.shape[:-1], 1)
    kth = sorted_logits.gather(-1, (top_k - 1).clamp(0, logits.shape[-1] - 1))
    sorted_logits = sorted_logits.masked_fill((sorted_logits < kth) & (top_k > 0), float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
    top_p = rows.top_p.view(shape)
    drop = ((sorted_probs.cumsum(-1) - sorted_probs) >= top_p) & (top_p < 1)
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    sorted_probs = torch.where(top_p < 1, sorted_probs / sorted_probs.sum(-1, keepdim=True), sorted_probs)
    # a row that truncates nothing keeps the plain softmax: its result must not depend on its neighbours' settings
    truncating = (rows.top_k.view(shape) > 0) | (top_p < 1)
    return torch.where(truncating, torch.zeros_like(probs).scatter(-1, order, sorted_probs), probs)


def draw(logits: torch.Tensor, rows: RowSampling, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's tokens from `logits` [n, ..., V]: a greedy row's argmax, another's draw at `uniform` [n, ...]
    from its warped distribution; and those distributions [n, ..., V]."""
    probs = warp(logits, rows)
    greedy = rows.greedy.view((-1,) + (1,) * (logits.dim() - 2))
    return torch.where(greedy, logits.argmax(-1), sample(probs, uniform)), probs


def draw_uniforms(out: torch.Tensor, generators: Sequence[torch.Generator | None],
                  slots: Sequence[int]) -> torch.Tensor:
    """Fill out [n, width, 3] (float64) for one step: row i's first slots[i] triples from its own generator
    (a row without one, and the slots after, keep what they held). A block slot's triple is (the draft's draw,
    the acceptance test, the target's draw there): a row consumes the same numbers whatever rows are beside it."""
    for row, (generator, count) in enumerate(zip(generators, slots)):
        if generator is not None and count:
            torch.rand(count, 3, generator=generator, out=out[row, :count])
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
