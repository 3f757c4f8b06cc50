"""The acceptance rule, for greedy and sampled rows alike (SPEC section 5).

Greedy: the target keeps the longest prefix of drafts equal to its own argmax, plus one bonus token of its own:
output identical to plain greedy decoding.

Sampled: a draft token x drawn from the draft's distribution q is accepted with probability min(1, p(x)/q(x));
at the first rejection the target resamples from norm(max(0, p - q)), and after a fully accepted block from p.
Every committed token is then distributed exactly as the target alone would sample it.
"""

from __future__ import annotations

import torch

from blockspec.engine.sampling import SamplingParams, sample, warped_probs


class RowFailure(Exception):
    """This row's step cannot be computed (a distribution that is not finite); the other rows are unaffected."""


def check_finite(probs: torch.Tensor, model: str) -> None:
    """RowFailure unless every probability of this row is finite (torch.multinomial would raise for the batch)."""
    if not bool(torch.isfinite(probs).all()):
        raise RowFailure(f"the {model}'s probabilities for this request are not finite (NaN or inf)")


def greedy_accepted(draft_tokens: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
    """Accepted drafts per row [n]: the longest prefix of `draft_tokens` [n, k] equal to the target's own
    choices `choices` [n, k + 1] at the same slots. On the device, no host read (a CUDA graph can hold it)."""
    return (draft_tokens == choices[:, :-1]).long().cumprod(1).sum(1)


def accept_sampled(draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                   generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative-sampling verification of one row.

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


def accept_row(params: SamplingParams, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
               target_logits: torch.Tensor, generator: torch.Generator | None) -> tuple[int, list[int]]:
    """One row of a step: (accepted drafts, the tokens it commits: the accepted drafts and the target's own).

    draft_tokens [k], target_logits [k + 1, V] (the verify's logits at the row's block slots 0..k). Raises
    RowFailure when the row's target distribution is not finite."""
    if params.greedy:
        choices = target_logits.argmax(-1)
        accepted = int(greedy_accepted(draft_tokens[None], choices[None])[0])
        return accepted, choices[:accepted + 1].tolist()
    target_probs = warped_probs(target_logits, params)
    check_finite(target_probs, "target")
    accepted, token = accept_sampled(draft_tokens, draft_probs, target_probs, generator)
    return accepted, draft_tokens[:accepted].tolist() + [token]
