"""Anchors, same-position labels and the gamma-decayed block loss (SPEC section 6).

Per sequence, up to N anchor positions p are drawn without replacement among the assistant tokens with
p <= len - B (so every label of the block exists). Anchor p makes the block `[x_p, MASK x (B-1)]` at
positions p..p+B-1; slot k >= 1 predicts `x[p+k]` with weight `exp(-(k-1)/gamma) * loss_mask[p+k]`, slot 0
has weight 0, and the loss is `sum(CE * w) / sum(w)`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# gamma per block size, from the public recipes
GAMMAS = {16: 7.0, 10: 5.0, 8: 4.0}


def default_gamma(block_size: int) -> float:
    """7 for B=16, 5 for B=10, 4 for B=8 (the published values); linear in B between and beyond them."""
    if block_size in GAMMAS:
        return GAMMAS[block_size]
    if block_size < 10:
        return max(1.0, block_size / 2)
    return 5.0 + (block_size - 10) / 3


def anchor_scores(seed: int, step: int, rows: int, max_len: int) -> torch.Tensor:
    """Uniform scores [rows, max_len] for one optimizer step's GLOBAL batch, from a generator seeded by
    (seed, step) alone: the anchors of a sequence depend on neither the rank that holds it, nor the padding
    of its batch, nor anything that happened earlier in the run (so resumed and multi-GPU runs draw the same)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.rand(rows, max_len, generator=generator)


def sample_anchors(scores: torch.Tensor, loss_mask: torch.Tensor, lengths: torch.Tensor, num_anchors: int,
                   block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors [b, N] (sorted ascending, 0 where unused) and their validity [b, N].

    `scores` [b, >=S] uniform; `loss_mask` [b, S]; `lengths` [b]. A random subset without replacement of the
    eligible positions (loss_mask[p] = 1 and p <= len - B): the N largest scores among them.
    """
    b, s = loss_mask.shape
    positions = torch.arange(s)
    eligible = loss_mask.bool() & (positions[None] <= (lengths[:, None] - block_size))
    keyed = torch.where(eligible, scores[:, :s], torch.full_like(scores[:, :s], -1.0))
    k = min(num_anchors, s)
    values, index = keyed.topk(k, dim=1)
    valid = values >= 0
    # unused anchors sort last, then become position 0 (they see no context, only their own block)
    index = torch.where(valid, index, torch.full_like(index, s))
    index, order = index.sort(dim=1)
    valid = valid.gather(1, order)
    index = torch.where(valid, index, torch.zeros_like(index))
    if k < num_anchors:
        pad = num_anchors - k
        index = torch.cat([index, index.new_zeros(b, pad)], dim=1)
        valid = torch.cat([valid, valid.new_zeros(b, pad)], dim=1)
    return index, valid


def block_labels(input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor, valid: torch.Tensor,
                 block_size: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels [b, N, B] (slot k of block n = x[p_n + k]) and weights [b, N, B] (0 for slot 0)."""
    s = input_ids.shape[1]
    offsets = torch.arange(block_size, device=anchors.device)
    pos = (anchors[:, :, None] + offsets).clamp(max=s - 1)
    b = input_ids.shape[0]
    flat = pos.view(b, -1)
    labels = input_ids.gather(1, flat).view_as(pos)
    mask = loss_mask.to(torch.float32).gather(1, flat).view_as(pos)
    decay = torch.exp(-(offsets.float() - 1) / gamma)
    decay[0] = 0.0
    weights = decay.to(anchors.device) * mask * valid[:, :, None].float()
    return labels, weights


def _chunk_ce(hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor,
              weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = F.linear(hidden, head).float()
    ce = F.cross_entropy(logits, labels, reduction="none")
    return (ce * weights).sum(), logits.argmax(-1)


def block_loss(hidden: torch.Tensor, lm_head: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
               chunk_rows: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of weighted CE over the weighted slots, and top-1 correctness [b, N, B] (False where weight 0).

    `hidden` [b, N*B, H] are the draft's final-normed states; logits are made chunk by chunk and recomputed
    in the backward pass (activation checkpointing), so the [rows, vocab] logits never all live at once.
    """
    b, n, block = labels.shape
    h = hidden.reshape(b * n * block, -1)
    w = weights.reshape(-1)
    rows = torch.nonzero(w > 0).squeeze(1)
    correct = torch.zeros(b * n * block, dtype=torch.bool, device=hidden.device)
    # no weighted slot at all: a zero that still reaches every parameter (backward and DDP need a graph)
    total = hidden.float().sum() * 0.0 if rows.numel() == 0 else hidden.new_zeros((), dtype=torch.float32)
    flat_labels = labels.reshape(-1)
    for start in range(0, rows.numel(), chunk_rows):
        idx = rows[start:start + chunk_rows]
        args = (h[idx], lm_head, flat_labels[idx], w[idx])
        if torch.is_grad_enabled() and hidden.requires_grad:
            part, pred = checkpoint(_chunk_ce, *args, use_reentrant=False)
        else:
            part, pred = _chunk_ce(*args)
        total = total + part
        correct[idx] = pred == flat_labels[idx]
    return total, correct.view(b, n, block)


def block_metrics(correct: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums for logging: per-slot correct / count, and the acceptance length a block would get greedily.

    Returns tensors (summable across ranks): `correct_k` [B], `count_k` [B], `accept_sum`, `accept_blocks`.
    A block counts toward the acceptance estimate only if all its labels are assistant tokens.
    """
    counted = weights > 0
    correct_k = (correct & counted).sum((0, 1)).float()
    count_k = counted.sum((0, 1)).float()
    full = counted[:, :, 1:].all(-1)
    run = correct[:, :, 1:].long().cumprod(-1).sum(-1) + 1  # accepted drafts + the bonus token
    accept_sum = (run * full).sum().float()
    return {"correct_k": correct_k, "count_k": count_k, "accept_sum": accept_sum,
            "accept_blocks": full.sum().float()}


def cosine_with_warmup(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """lr multiplier: linear warmup over `warmup_ratio` of the steps, then cosine to 0 at `total_steps`."""
    warmup = max(1, int(round(total_steps * warmup_ratio))) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
