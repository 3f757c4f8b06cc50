"""The acceptance rule, for greedy and sampled rows alike (SPEC section 5).

Greedy: the target keeps the longest prefix of drafts equal to its own argmax, plus one bonus token of its own:
output identical to plain greedy decoding.

Sampled: a draft token x drawn from the draft's distribution q is accepted with probability min(1, p(x)/q(x));
at the first rejection the target resamples from norm(max(0, p - q)), and after a fully accepted block from p.
Every committed token is then distributed exactly as the target alone would sample it.

Every row of a step goes through the same tensor ops, its randomness given as uniforms drawn from its own
generator beforehand (sampling.draw_uniforms): no host read and no launch per row.
"""

from __future__ import annotations

import torch

from blockspec.engine.sampling import RowSampling, sample, warp

DRAFT_NOT_FINITE, TARGET_NOT_FINITE = 1, 2  # accept_rows' failure codes (0: the row's step is sound)
FAILURES = {DRAFT_NOT_FINITE: "the draft's probabilities for this request are not finite (NaN or inf)",
            TARGET_NOT_FINITE: "the target's probabilities for this request are not finite (NaN or inf)"}


def greedy_accepted(draft_tokens: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
    """Accepted drafts per row [n]: the longest prefix of `draft_tokens` [n, k] equal to the target's own
    choices `choices` [n, k + 1] at the same slots. On the device, no host read (a CUDA graph can hold it)."""
    return (draft_tokens == choices[:, :-1]).long().cumprod(1).sum(1)


def accept_sampled(draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                   wanted: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative-sampling verification of n rows: (accepted drafts a [n], the token the target commits after
    them [n]).

    Row i verifies its first wanted[i] of draft_tokens [n, k], drawn from draft_probs [n, k, V] (None: point
    masses, as when the draft proposes greedily), against target_probs [n, k + 1, V]. uniforms [n, k + 1, 3]
    (sampling.draw_uniforms): slot j's acceptance test uses [i, j, 1], the target's draw after a accepted drafts
    [i, a, 2], each used once."""
    n, k = draft_tokens.shape
    rows = torch.arange(n, device=draft_tokens.device)
    p_x = target_probs[:, :k].gather(-1, draft_tokens[..., None])[..., 0]
    q_x = draft_probs.gather(-1, draft_tokens[..., None])[..., 0] if draft_probs is not None else torch.ones_like(p_x)
    inside = torch.arange(k, device=draft_tokens.device) < wanted[:, None]
    # accept iff u < p/q, written without division (q_x > 0 for any token the draft sampled)
    accepted = ((uniforms[:, :k, 1] * q_x < p_x) & inside).long().cumprod(1).sum(1)
    p_a = target_probs[rows, accepted]
    rejected = (accepted < wanted)[:, None]
    if draft_probs is not None:
        q_a = draft_probs[rows, accepted.clamp(max=k - 1)] if k else torch.zeros_like(p_a)
        residual = torch.where(rejected, (p_a - q_a).clamp_min(0), p_a)
    else:  # a point mass: the residual is p without the rejected token
        drafted = draft_tokens[rows, accepted.clamp(max=k - 1)] if k else torch.zeros_like(accepted)
        residual = p_a.scatter(-1, drafted[:, None], torch.where(rejected, 0.0, p_a.gather(-1, drafted[:, None])))
    # p == q up to rounding: any rejection then came from rounding alone
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_a)
    return accepted, sample(residual, uniforms[rows, accepted, 2])


def accept_rows(rows: RowSampling, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                target_logits: torch.Tensor, wanted: torch.Tensor,
                uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's acceptance for rows with their own settings `rows` (greedy ones by the greedy rule): (accepted
    drafts [n], the target's token after them [n], failure [n]: 0, or DRAFT_NOT_FINITE / TARGET_NOT_FINITE for a
    sampled row whose distribution is not finite at its slots; its other outputs are then meaningless). Tensor
    ops only (a CUDA graph holds them).

    draft_tokens [n, k], draft_probs [n, k, V] (None: point masses), target_logits [n, k + 1, V] (the verify's at
    each row's block slots), wanted [n]: the drafts each row verifies (<= k), uniforms [n, k + 1, 3]
    (sampling.draw_uniforms)."""
    k = draft_tokens.shape[1]
    choices = target_logits.argmax(-1)
    accepted = torch.minimum(greedy_accepted(draft_tokens, choices), wanted)
    token = choices.gather(1, accepted[:, None])[:, 0]
    probs = warp(target_logits, rows)
    slots = torch.arange(k + 1, device=accepted.device)
    target_ok = (torch.isfinite(probs).all(-1) | (slots > wanted[:, None])).all(-1)
    draft_ok = torch.ones_like(target_ok)
    if draft_probs is not None:
        draft_ok = (torch.isfinite(draft_probs).all(-1) | (slots[:k] >= wanted[:, None])).all(-1)
    sampled_accepted, sampled_token = accept_sampled(draft_tokens, draft_probs, probs, wanted, uniforms)
    failure = torch.where(~draft_ok, DRAFT_NOT_FINITE, torch.where(~target_ok, TARGET_NOT_FINITE, 0))
    greedy = rows.greedy
    return (torch.where(greedy, accepted, sampled_accepted), torch.where(greedy, token, sampled_token),
            failure.masked_fill(greedy, 0))
