"""The least a decoding pass must cost: the bytes it must move through device memory and the FLOPs it must do,
for rows at given contexts. Its floor is the larger of bytes over the measured copy bandwidth and FLOPs over
the measured dense bf16 rate (`Cost.seconds`).

Bytes: every weight once (a tied embedding once, as the lm_head; an untied embedding only for the few rows a
step looks up), the lm_head again for the draft's logits, each row's visible K/V (a sliding layer's window, not
the whole context), and for a Gated DeltaNet layer each row's recurrent and conv state read once and written once
a pass (a verify's commit can set the kept prefix's state from the one before it: no rollback must write more)
and its inputs. FLOPs: two per weight per token, four per visible key per query per head dimension (scores and
values), six per recurrent-state entry per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blockspec.draft import DraftModel
from blockspec.target import TargetModel


@dataclass(frozen=True)
class Cost:
    bytes: float
    flops: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.bytes + other.bytes, self.flops + other.flops)

    def seconds(self, bandwidth: float, flop_rate: float) -> float:
        """The floor: bytes over the bandwidth (bytes/s) or FLOPs over the rate (FLOP/s), whichever is longer."""
        return max(self.bytes / bandwidth, self.flops / flop_rate)


def param_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    return layers * 2 * kv_heads * head_dim * itemsize


def _attention(contexts: list[int], block: int, window: int | None, heads: int, kv_heads: int, head_dim: int,
               itemsize: int) -> Cost:
    """One attention layer of `block` queries per row: the visible K/V read, scores and values computed."""
    visible = sum((ctx if window is None else min(ctx, window)) + block for ctx in contexts)
    return Cost(2 * kv_heads * head_dim * itemsize * visible, 4 * heads * head_dim * visible * block)


def target_pass(model: TargetModel, contexts: list[int], block: int) -> Cost:
    """The target's forward of `block` tokens on each row (its committed length in `contexts`), with the lm_head."""
    cfg, item = model.config, model.embed_tokens.weight.element_size()
    tokens = len(contexts) * block
    weights = param_bytes(model)
    if model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr():
        weights -= model.embed_tokens.weight.numel() * item  # untied: only a few embedding rows are read
    layer_params = sum(p.numel() for p in model.layers.parameters())
    cost = Cost(weights, 2 * tokens * (layer_params + model.lm_head.weight.numel()))
    for i, window in enumerate(cfg.sliding_windows):
        if i not in cfg.gdn_layers:
            cost += _attention(contexts, block, window, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, item)
    if cfg.gdn_layers:
        g = cfg.gdn
        state = g.num_value_heads * g.key_head_dim * g.value_head_dim
        conv = g.conv_dim * (g.conv_kernel - 1) * item
        per_row = state * 4 * 2 + 2 * conv + g.conv_dim * block * item
        cost += Cost(len(cfg.gdn_layers) * len(contexts) * per_row, len(cfg.gdn_layers) * 6 * state * tokens)
    return cost


def draft_pass(draft: DraftModel, model: TargetModel, contexts: list[int], block: int) -> Cost:
    """The draft's pass over `block` slots on each row, with the target's lm_head for its block - 1 drafts."""
    dc, item = draft.config, model.embed_tokens.weight.element_size()
    lm_head = model.lm_head.weight.numel()
    params = sum(p.numel() for p in draft.parameters())
    cost = Cost(param_bytes(draft) + lm_head * item,
                2 * len(contexts) * (block * params + (block - 1) * lm_head))
    for i in range(dc.num_layers):
        window = dc.layer_attention(i)[1]
        cost += _attention(contexts, block, window, dc.num_attention_heads, dc.num_key_value_heads, dc.head_dim, item)
    return cost


def step(model: TargetModel, draft: DraftModel | None, contexts: list[int], block: int) -> Cost:
    """One engine step: the draft's pass (when drafting), then the target's over the block."""
    cost = target_pass(model, contexts, block)
    return cost + draft_pass(draft, model, contexts, block) if draft is not None else cost
