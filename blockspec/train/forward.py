"""The TRAINING forward of a draft: every anchor block of a batch in one pass (SPEC section 6).

Queries are the N*B block slots of a sequence; keys are its S context positions (fused target features,
projected like the inference draft projects context) followed by the N*B block slots. Block n (anchor p_n)
sees context positions < p_n strictly and its own B slots (bidirectionally), nothing else; in a causal layer
(a sliding one, DraftConfig.layer_attention) a slot sees its block's slots up to itself, and with a window W
a slot at position p sees positions > p - W only. That is exactly what `DraftModel.forward` computes for one
block at inference time, with the context up to p_n in its cache, so the trained parameters are the inference
draft's parameters, unchanged (the tests check the two forwards agree).

The math here re-expresses `DraftModel`'s modules with plain differentiable torch ops: on CUDA the
inference `RMSNorm` runs a Triton kernel that has no backward pass, so norms are computed here from the
modules' weights with the same fp32 formula. Linear layers, the MLP and the RoPE table are the modules'
own.

Attention: `torch.nn.attention.flex_attention` with a BlockMask on CUDA (compiled once per shape), or a
dense boolean mask everywhere (the reference; `scaled_dot_product_attention` on CUDA).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from blockspec.draft import DraftModel
from blockspec.layers import apply_rope

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """`RMSNorm` math (fp32 statistics, cast back to x's dtype, times the weight in x's dtype)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight.to(x.dtype) * normed.to(x.dtype)


def fuse_context(draft: DraftModel, features: torch.Tensor) -> list[torch.Tensor]:
    """`DraftModel.fuse_context` with differentiable norms: taps [b, S, T*H] -> one context per layer."""
    if draft.config.kind == "dflash":
        ctx = rms_norm(draft.fc(features.to(draft.fc.weight.dtype)), draft.hidden_norm)
        return [ctx] * len(draft.layers)
    b, s, _ = features.shape
    w = draft.layer_fusion_weights
    taps = features.to(w.dtype).view(b, s, w.shape[1], -1)
    fused = torch.einsum("bsth,dt->bsdh", taps, F.softmax(w, dim=-1))
    return [rms_norm(fused[:, :, i], draft.hidden_norm) for i in range(len(draft.layers))]


# ---- the block attention mask --------------------------------------------------------------------------------
def block_mask_mod(anchors: torch.Tensor, context_len: int, block_size: int, causal: bool = False,
                   window: int | None = None) -> Callable[..., torch.Tensor]:
    """mask_mod(b, h, q, kv) for flex_attention: query slot q belongs to block q // B with anchor p; it sees
    context kv < min(S, p) and block slots kv >= S of its own block (causal: those up to itself); with a
    window W, only positions > its own (p + q % B) - W."""

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001 (flex_attention's signature)
        block = q_idx // block_size
        anchor = anchors[b, block]
        slot, kv_slot = q_idx % block_size, (kv_idx - context_len) % block_size
        in_context = kv_idx < context_len
        sees_context = in_context & (kv_idx < anchor)
        sees_block = ~in_context & ((kv_idx - context_len) // block_size == block)
        if causal:
            sees_block = sees_block & (kv_slot <= slot)
        visible = sees_context | sees_block
        if window is not None:
            visible = visible & (anchor + slot - torch.where(in_context, kv_idx, anchor + kv_slot) < window)
        return visible

    return mask_mod


def dense_block_mask(anchors: torch.Tensor, context_len: int, block_size: int, causal: bool = False,
                     window: int | None = None) -> torch.Tensor:
    """The same mask as a dense boolean tensor [b, 1, N*B, S + N*B] (True = may attend)."""
    b, n = anchors.shape
    q = torch.arange(n * block_size, device=anchors.device)
    kv = torch.arange(context_len + n * block_size, device=anchors.device)
    block, slot = q // block_size, q % block_size  # [Q]
    kv_slot = (kv - context_len).remainder(block_size)  # [K]
    anchor = anchors[:, block]  # [b, Q]
    in_context = kv[None, None] < context_len
    sees_context = in_context & (kv[None, None] < anchor[:, :, None])
    sees_block = ~in_context & (
        (kv[None, None] - context_len).div(block_size, rounding_mode="floor") == block[None, :, None])
    if causal:
        sees_block = sees_block & (kv_slot[None, None] <= slot[None, :, None])
    visible = sees_context | sees_block
    if window is not None:
        kv_pos = torch.where(in_context, kv[None, None], anchor[:, :, None] + kv_slot[None, None])  # [b, Q, K]
        visible = visible & ((anchor + slot)[:, :, None] - kv_pos < window)
    return visible[:, None]


_compiled_flex = None


def _flex():
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def make_attention_mask(anchors: torch.Tensor, context_len: int, block_size: int, kind: str, causal: bool = False,
                        window: int | None = None) -> BlockMask | torch.Tensor:
    """A BlockMask (kind 'flex') or a dense boolean mask (kind 'dense') for one batch and one kind of layer."""
    if kind == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        b, n = anchors.shape
        q_len = n * block_size
        return create_block_mask(block_mask_mod(anchors, context_len, block_size, causal, window), b, None, q_len,
                                 context_len + q_len, device=anchors.device)
    return dense_block_mask(anchors, context_len, block_size, causal, window)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask | torch.Tensor, kind: str,
                     compiled: bool = True) -> torch.Tensor:
    """q [b, nH, Q, d], k/v [b, nKV, K, d] -> [b, Q, nH*d]. Softmax in fp32, scale d^-0.5."""
    b, heads, n, d = q.shape
    if kind == "flex":
        if compiled:
            out = _flex()(q, k, v, block_mask=mask, enable_gqa=heads != k.shape[1])
        else:
            from torch.nn.attention.flex_attention import flex_attention

            out = flex_attention(q, k, v, block_mask=mask, enable_gqa=heads != k.shape[1])
    else:
        if k.shape[1] != heads:
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, heads * d)


# ---- the forward ---------------------------------------------------------------------------------------------
def embed_blocks(draft: DraftModel, embed_weight: torch.Tensor, first_tokens: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    """`DraftModel.embed_block` for [b, N] anchors at once -> [b, N*B, H]."""
    first = F.embedding(first_tokens, embed_weight)  # [b, N, H]
    if draft.mask_embedding is not None:
        mask = draft.mask_embedding.to(first.dtype)
    else:
        mask = embed_weight[draft.config.mask_token_id]
    b, n, h = first.shape
    blocks = torch.cat([first[:, :, None], mask.expand(b, n, block_size - 1, h)], dim=2)
    return blocks.reshape(b, n * block_size, h)


class BlockTrainer(nn.Module):
    """Wraps a DraftModel (its only submodule, so DDP/FSDP see exactly the draft's parameters).

    forward(features [b, S, T*H], input_ids [b, S], anchors [b, N]) -> final-normed hidden states of all
    block slots [b, N*B, H]; the target's embedding weight is passed in (frozen, never a parameter here).
    """

    def __init__(self, draft: DraftModel, attention: str = "dense", compiled_flex: bool = True) -> None:
        super().__init__()
        if attention not in ("dense", "flex"):
            raise ValueError(f"attention must be 'dense' or 'flex', got {attention!r}")
        self.draft = draft
        self.attention = attention
        self.compiled_flex = compiled_flex

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, anchors: torch.Tensor,
                embed_weight: torch.Tensor, block_size: int | None = None) -> torch.Tensor:
        draft = self.draft
        block = block_size or draft.block_size
        b, s = input_ids.shape
        n = anchors.shape[1]
        x = embed_blocks(draft, embed_weight, input_ids.gather(1, anchors), block)
        offsets = torch.arange(block, device=anchors.device)
        block_pos = (anchors[:, :, None] + offsets).reshape(b, n * block)
        ctx_pos = torch.arange(s, device=anchors.device)[None].expand(b, s)
        block_rope = draft.rotary(block_pos, x.dtype)
        ctx_rope = draft.rotary(ctx_pos, x.dtype)
        kinds = {(layer.self_attn.causal, layer.self_attn.window) for layer in draft.layers}
        masks = {kind: make_attention_mask(anchors, s, block, self.attention, *kind) for kind in kinds}
        contexts = fuse_context(draft, features)
        for layer, ctx in zip(draft.layers, contexts):
            mask = masks[layer.self_attn.causal, layer.self_attn.window]
            x = self._layer(layer, x, ctx.to(x.dtype), block_rope, ctx_rope, mask)
        return rms_norm(x, draft.norm)

    def _layer(self, layer: nn.Module, x: torch.Tensor, ctx: torch.Tensor, block_rope: tuple, ctx_rope: tuple,
               mask) -> torch.Tensor:
        attn = layer.self_attn
        nh, nkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
        hn = rms_norm(x, layer.input_layernorm)
        b, q_len, _ = hn.shape
        s = ctx.shape[1]
        q = apply_rope(rms_norm(attn.q_proj(hn).view(b, q_len, nh, d), attn.q_norm).transpose(1, 2), *block_rope)
        k_proj, v_proj = ((attn.k_proj_target, attn.v_proj_target) if attn.separate_context_proj
                          else (attn.k_proj, attn.v_proj))
        k_ctx = apply_rope(rms_norm(k_proj(ctx).view(b, s, nkv, d), attn.k_norm).transpose(1, 2), *ctx_rope)
        v_ctx = v_proj(ctx).view(b, s, nkv, d).transpose(1, 2)
        k_blk = apply_rope(rms_norm(attn.k_proj(hn).view(b, q_len, nkv, d), attn.k_norm).transpose(1, 2),
                           *block_rope)
        v_blk = attn.v_proj(hn).view(b, q_len, nkv, d).transpose(1, 2)
        k = torch.cat([k_ctx, k_blk], dim=2)
        v = torch.cat([v_ctx, v_blk], dim=2)
        out = masked_attention(q, k, v, mask, self.attention, self.compiled_flex)
        h = x + attn.o_proj(out)
        return h + layer.mlp(rms_norm(h, layer.post_attention_layernorm))
