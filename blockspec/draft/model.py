"""DFlash and DFlare draft networks (SPEC sections 2-3), one module for both.

A draft proposes a block `[last token, MASK x (B-1)]` in one pass, attending (unmasked, bidirectionally)
to the context -- fused features tapped from the target -- and to the block itself. Context K/V go into a
static cache at their positions and stay valid forever; block K/V are never stored. A `sliding_attention` layer
(DraftConfig.layer_attention) is causal inside the block instead and sees the positions within its window of
each query; positions stay absolute.

The two architectures differ only in how target features become per-layer context:
- DFlash: one `ctx = hidden_norm(fc(concat taps))` shared by all layers, projected by k_proj / v_proj.
- DFlare: `ctx_i = hidden_norm(sum_t softmax(W[i])_t * tap_t)` per layer, projected by k_proj_target /
  v_proj_target (k_proj / v_proj serve the block only).

Targets without a spare vocabulary row for the mask token use a learned `mask_embedding` [H] stored in the
draft checkpoint under that name (an extra tensor the published formats do not have).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from blockspec.cache import KVCache
from blockspec.draft.config import DraftConfig
from blockspec.layers import (GatedMLP, RMSNorm, RotaryEmbedding, StackedWeights, attention, linear,
                              linear_add_rms_norm, qkv_rope_store, rope_inv_freq)

MASK_EMBEDDING = "mask_embedding"


class DraftAttention(StackedWeights):
    def __init__(self, cfg: DraftConfig, layer_index: int) -> None:
        super().__init__()
        h, nh, nkv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.layer_index, self.num_heads, self.num_kv_heads, self.head_dim = layer_index, nh, nkv, d
        self.q_width, self.kv_width = nh * d, nkv * d
        self.q_proj = nn.Linear(h, nh * d, bias=bias)
        self.k_proj = nn.Linear(h, nkv * d, bias=bias)
        self.v_proj = nn.Linear(h, nkv * d, bias=bias)
        self.o_proj = nn.Linear(nh * d, h, bias=bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.causal, self.window = cfg.layer_attention(layer_index)
        self.separate_context_proj = cfg.kind == "dflare"
        if self.separate_context_proj:
            self.k_proj_target = nn.Linear(h, nkv * d, bias=bias)
            self.v_proj_target = nn.Linear(h, nkv * d, bias=bias)

    def store_context(self, ctx: torch.Tensor, ctx_rope: tuple, ctx_positions: torch.Tensor, cache: KVCache) -> None:
        """Write the context's K/V at its positions. They depend on the target features alone (never on the
        block), so a prompt's context can be stored without drafting anything."""
        if not ctx.shape[1]:
            return
        k_cache, v_cache = cache.layer(self.layer_index)
        if self.separate_context_proj:
            kv_weight, kv_bias = self.stacked("kv_target", self.k_proj_target, self.v_proj_target)
        else:  # DFlash projects the context with k_proj / v_proj: the k, v rows of the stacked weight
            kv_weight, kv_bias = self.stacked("qkv", self.q_proj, self.k_proj, self.v_proj,
                                              rows=(self.q_width, self.q_width + 2 * self.kv_width))
        k, v = linear(ctx, kv_weight, kv_bias).split([self.kv_width, self.kv_width], dim=-1)
        qkv_rope_store(None, k, v, self.num_heads, self.num_kv_heads, self.head_dim, None, self.k_norm, *ctx_rope,
                       ctx_positions, k_cache, v_cache)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, block_rope: tuple, ctx_rope: tuple,
                block_positions: torch.Tensor, ctx_positions: torch.Tensor, cache: KVCache, kv_len: int,
                limits: torch.Tensor) -> torch.Tensor:
        """x: normed block states [b, B, H]; ctx: fused context [b, c, H] for `ctx_positions` [b, c]. Returns the
        heads' output [b, B, nH * d], what o_proj takes (DraftLayer fuses o_proj with the residual add and norm).

        Context K/V are written at their positions, then the block's at the block positions (overwriting
        anything stale there), and the block attends to every slot up to `limits` (the block's end): the whole
        context and the whole block, unmasked; a causal layer's query to the slots up to its own position, a
        sliding one's to those within its window. The block's slots are rewritten by the next call's context,
        so they never need cropping.
        """
        self.store_context(ctx, ctx_rope, ctx_positions, cache)
        k_cache, v_cache = cache.layer(self.layer_index)
        heads = (self.num_heads, self.num_kv_heads, self.head_dim)
        qkv_weight, qkv_bias = self.stacked("qkv", self.q_proj, self.k_proj, self.v_proj)
        q, k, v = linear(x, qkv_weight, qkv_bias).split([self.q_width, self.kv_width, self.kv_width], dim=-1)
        q = qkv_rope_store(q, k, v, *heads, self.q_norm, self.k_norm, *block_rope, block_positions, k_cache, v_cache)
        return attention(q, k_cache, v_cache, block_positions if self.causal else limits, kv_len, self.window)


class DraftLayer(nn.Module):
    def __init__(self, cfg: DraftConfig, layer_index: int) -> None:
        super().__init__()
        self.self_attn = DraftAttention(cfg, layer_index)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, normed: torch.Tensor, ctx: torch.Tensor, next_norm: RMSNorm,
                *attn_args: object) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the block's residual stream, normed: input_layernorm(x); returns the layer's output and
        next_norm of it (o_proj and down_proj each fused with the residual add and the norm after them, as the
        target's layers run them)."""
        # The context is NOT passed through input_layernorm: it was normed once by hidden_norm.
        o_proj, down = self.self_attn.o_proj, self.mlp.down_proj
        h, h_normed = linear_add_rms_norm(self.self_attn(normed, ctx, *attn_args), o_proj.weight, o_proj.bias, x,
                                          self.post_attention_layernorm)
        return linear_add_rms_norm(self.mlp.hidden(h_normed), down.weight, down.bias, h, next_norm)


class DraftModel(nn.Module):
    def __init__(self, cfg: DraftConfig, mask_embedding: bool = False) -> None:
        super().__init__()
        self.config = cfg
        h, t = cfg.hidden_size, len(cfg.target_layer_ids)
        self.layers = nn.ModuleList(DraftLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        if cfg.kind == "dflare":
            self.layer_fusion_weights = nn.Parameter(torch.zeros(cfg.num_layers, t))
        else:
            self.fc = nn.Linear(t * h, h, bias=False)
        self.mask_embedding = nn.Parameter(torch.zeros(h)) if mask_embedding else None
        inv_freq, scaling = rope_inv_freq(cfg.raw, cfg.head_dim)
        self.rotary = RotaryEmbedding(inv_freq, scaling)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> "DraftModel":
        """Fresh weights for training or an untrained stand-in: N(0, std) projections, unit norms, and the
        DFlare fusion init of SPEC section 3 (each layer starts on one tapped layer, spread over depth)."""
        generator = torch.Generator(device=self.norm.weight.device).manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name == "layer_fusion_weights":
                param.zero_()
                d, t = param.shape
                for i in range(d):
                    param[i, min(t - 1, int(i * t / d))] = 2.0
            else:
                param.normal_(0.0, std, generator=generator)
        return self

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        c = self.config
        w = self.norm.weight
        return KVCache(c.num_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim, w.dtype, w.device)

    def fuse_context(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Tapped target features [b, c, T*H] -> one context [b, c, H] per draft layer."""
        if self.config.kind == "dflash":
            ctx = self.hidden_norm(linear(features.to(self.fc.weight.dtype), self.fc.weight))
            return [ctx] * len(self.layers)
        b, c, _ = features.shape
        w = self.layer_fusion_weights
        if c == 0:
            return [features.new_zeros(b, 0, self.config.hidden_size)] * len(self.layers)
        taps = features.to(w.dtype).view(b, c, w.shape[1], -1)
        fused = torch.einsum("bsth,dt->bsdh", taps, F.softmax(w, dim=-1))
        return [self.hidden_norm(fused[:, :, i]) for i in range(len(self.layers))]

    def embed_block(self, first_tokens: torch.Tensor, embed_tokens: nn.Embedding,
                    block_size: int | None = None) -> torch.Tensor:
        """Embeddings of `[token, MASK x (B-1)]` [b, B, H]; `first_tokens` [b]; B defaults to the trained one."""
        first = embed_tokens(first_tokens)[:, None]
        if self.mask_embedding is not None:
            mask = self.mask_embedding.to(first.dtype)
        else:
            mask = embed_tokens.weight[self.config.mask_token_id]
        block_size = block_size or self.block_size
        return torch.cat([first, mask.expand(first.shape[0], block_size - 1, -1)], dim=1)

    def store_context(self, features: torch.Tensor, ctx_positions: torch.Tensor, cache: KVCache) -> None:
        """Write the context K/V of target `features` [b, c, T*H] at `ctx_positions` [b, c] in every layer,
        without a draft pass (a prompt joining a batch; a step that drafts nothing)."""
        dtype = self.norm.weight.dtype
        ctx_rope = self.rotary(ctx_positions, dtype)
        for layer, ctx in zip(self.layers, self.fuse_context(features)):
            layer.self_attn.store_context(ctx.to(dtype), ctx_rope, ctx_positions, cache)

    def forward(self, block_embeds: torch.Tensor, block_positions: torch.Tensor, features: torch.Tensor,
                ctx_positions: torch.Tensor, cache: KVCache, kv_len: int | None = None) -> torch.Tensor:
        """One draft pass; returns final-normed hidden states [b, B, H] of the block.

        `features` [b, c, T*H] are the new context (target taps at `ctx_positions` [b, c]); earlier context
        is already in `cache`. Row r sees cache slots up to the end of its own block. `kv_len` bounds the slots
        read by the CPU attention (default: the largest block end + 1, a host sync: pass it in hot loops).
        """
        x = block_embeds
        block_end = block_positions[:, -1:]
        if kv_len is None:
            kv_len = int(block_end.max()) + 1
        limits = block_end.expand_as(block_positions)  # every block slot sees up to the block's end
        block_rope = self.rotary(block_positions, x.dtype)
        ctx_rope = self.rotary(ctx_positions, x.dtype)
        contexts = self.fuse_context(features)
        normed = self.layers[0].input_layernorm(x)
        for index, (layer, ctx) in enumerate(zip(self.layers, contexts)):
            next_norm = self.layers[index + 1].input_layernorm if index + 1 < len(self.layers) else self.norm
            x, normed = layer(x, normed, ctx.to(x.dtype), next_norm, block_rope, ctx_rope, block_positions,
                              ctx_positions, cache, kv_len, limits)
        return normed


def new_draft(cfg: DraftConfig, mask_embedding: bool = False) -> DraftModel:
    """A DraftModel with nothing allocated: its parameters are on the meta device, and its RoPE table, which no
    checkpoint stores, is computed for real. Give it weights with `load_state_dict(state, assign=True)`, or
    storage with `to_empty(device=...)` and then `init_weights` (the table survives both)."""
    with torch.device("meta"):
        model = DraftModel(cfg, mask_embedding=mask_embedding)
    model.rotary = RotaryEmbedding(*rope_inv_freq(cfg.raw, cfg.head_dim))
    return model
