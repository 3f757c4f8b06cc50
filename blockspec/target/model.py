"""The target: a Llama / Qwen2 / Qwen3 / Mistral / Qwen3.5 decoder written out in one file.

Weights come from a Hugging Face model (any format transformers reads: safetensors, GGUF); the forward is
ours, so that it can write a static KV cache, return the tapped hidden states the draft needs, and later be
captured in a CUDA graph. Tap id `k` is the OUTPUT of 0-indexed decoder layer `k` (HF's
`hidden_states[k + 1]`), concatenated on the feature axis in the order asked for.

Qwen3.5 is hybrid: most layers mix tokens with a Gated DeltaNet (target/gdn.py, a recurrent state per row in a
HybridCache), every fourth with gated attention (q_proj also gives a gate, output * sigmoid(gate) before o_proj,
RoPE on a quarter of each head); its RMSNorms are zero-centred. Its text positions are 1-D: the multimodal RoPE
sections all see the same position for text, which makes them plain RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from blockspec.cache import DEFAULT_ROLLBACK, HybridCache, KVCache
from blockspec.errors import BlockspecError
from blockspec.kernels import current_settings
from blockspec.layers import (RMSNorm, RotaryEmbedding, attention, fused_kernels_apply, linear, linear_add_rms_norm,
                              linear_argmax, linear_silu_mul, qkv_rope_store, rope_inv_freq, rope_parameters)
from blockspec.target.flow import FlowDecode, flow_decoder
from blockspec.target.gdn import GatedDeltaNet, GDNConfig

# qwen3_5 is the multimodal checkpoint's config: transformers loads its text part as a Qwen3_5ForCausalLM
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "qwen3_5", "qwen3_5_text")
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention")


@dataclass(frozen=True)
class TargetConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qk_norm: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_windows: tuple[int | None, ...]  # per layer; None = full attention
    max_position_embeddings: int
    gdn_layers: tuple[int, ...] = ()  # the Gated DeltaNet ("linear_attention") layers; the others attend
    gdn: GDNConfig | None = None
    attn_output_gate: bool = False  # q_proj also gives a gate per head: out * sigmoid(gate) before o_proj
    zero_centred_norms: bool = False  # RMSNorms scale by (1 + w)
    rotary_dim: int = 0  # dims of each head that RoPE rotates; 0: all of head_dim

    @property
    def hybrid(self) -> bool:
        """Qwen3.5-style layers (Gated DeltaNet, gated attention, zero-centred norms, partial RoPE)."""
        return bool(self.gdn_layers or self.attn_output_gate or self.zero_centred_norms or self.rotary_dim)

    @staticmethod
    def from_hf(hf_config: object, state_dict_keys: set[str]) -> "TargetConfig":
        """Shapes from the HF config; which optional tensors exist (biases, q/k norms) from the weights."""
        c = hf_config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        layer_types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
        unknown = sorted(set(layer_types) - set(LAYER_TYPES))
        if unknown:
            raise BlockspecError(f"target layer type {unknown[0]!r} is not implemented; "
                                 f"supported: {', '.join(LAYER_TYPES)}")
        window = getattr(c, "sliding_window", None)
        if c.model_type == "mistral":
            windows = tuple(window for _ in range(c.num_hidden_layers))
        else:
            windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        gdn_layers = tuple(i for i, t in enumerate(layer_types) if t == "linear_attention")
        first_attention = next((i for i, t in enumerate(layer_types) if t != "linear_attention"), 0)
        qwen35 = c.model_type.startswith("qwen3_5")
        rotary = int(head_dim * rope_parameters(c).get("partial_rotary_factor", 1.0))
        return TargetConfig(
            model_type=c.model_type,
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=c.rms_norm_eps,
            qk_norm=f"model.layers.{first_attention}.self_attn.q_norm.weight" in state_dict_keys,
            qkv_bias=f"model.layers.{first_attention}.self_attn.q_proj.bias" in state_dict_keys,
            o_bias=f"model.layers.{first_attention}.self_attn.o_proj.bias" in state_dict_keys,
            mlp_bias="model.layers.0.mlp.gate_proj.bias" in state_dict_keys,
            tie_word_embeddings="lm_head.weight" not in state_dict_keys
            or bool(getattr(c, "tie_word_embeddings", False)),
            sliding_windows=windows,
            max_position_embeddings=getattr(c, "max_position_embeddings", 4096),
            gdn_layers=gdn_layers,
            gdn=GDNConfig(c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim,
                          c.linear_value_head_dim, c.linear_conv_kernel_dim) if gdn_layers else None,
            attn_output_gate=qwen35,
            zero_centred_norms=qwen35,
            rotary_dim=rotary if rotary < head_dim else 0,
        )


class TargetAttention(nn.Module):
    def __init__(self, cfg: TargetConfig, cache_index: int) -> None:
        super().__init__()
        self.cache_index = cache_index  # among the attention layers: a hybrid cache keeps K/V for those only
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q, k, v (and the output gate) projections fused into one matrix: one weight read, one kernel
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.splits = [q_dim, kv_dim, kv_dim] + ([q_dim] if cfg.attn_output_gate else [])
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.splits), bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.zero_centred_norms)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.zero_centred_norms)
        else:
            self.q_norm = self.k_norm = None

    def heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
              cache: KVCache, kv_len: int, window: int | None) -> torch.Tensor:
        """The heads' output [b, n, heads * d], what o_proj takes (TargetModel.forward applies it with the residual
        add and the next norm)."""
        k_cache, v_cache = cache.layer(self.cache_index)
        q, k, v, *gate = linear(x, self.qkv_proj.weight, self.qkv_proj.bias).split(self.splits, dim=-1)
        q = qkv_rope_store(q, k, v, self.num_heads, self.num_kv_heads, self.head_dim, self.q_norm, self.k_norm,
                           cos, sin, positions, k_cache, v_cache)
        # causal by position: a query sees every slot up to its own position
        return attention(q, k_cache, v_cache, positions, kv_len, window, gate[0] if gate else None)


class TargetMLP(nn.Module):
    """`down(silu(gate(x)) * up(x))` with gate and up fused into one matrix, their rows interleaved."""

    def __init__(self, cfg: TargetConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.hidden(x), self.down_proj.weight, self.down_proj.bias)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate(x)) * up(x), what down_proj takes."""
        return linear_silu_mul(x, self.gate_up_proj.weight, self.gate_up_proj.bias)


class TargetLayer(nn.Module):
    """Pre-norm decoder layer whose token mixer is attention (`self_attn`) or a Gated DeltaNet (`linear_attn`).
    TargetModel.forward runs its parts itself so that each residual add fuses with the output projection before it
    and the norm after it (x + o_proj(mixer) -> post_attention_layernorm, h + down(mlp) -> next input norm)."""

    def __init__(self, cfg: TargetConfig, layer_index: int) -> None:
        super().__init__()
        gdn_index = cfg.gdn_layers.index(layer_index) if layer_index in cfg.gdn_layers else None
        attention_index = layer_index - sum(i < layer_index for i in cfg.gdn_layers)
        self.self_attn = TargetAttention(cfg, attention_index) if gdn_index is None else None
        self.linear_attn = (GatedDeltaNet(cfg.gdn, cfg.hidden_size, cfg.rms_norm_eps, gdn_index)
                            if gdn_index is not None else None)
        self.mlp = TargetMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.zero_centred_norms)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.zero_centred_norms)
        self.window = cfg.sliding_windows[layer_index]


def fuse_projections(state: dict[str, torch.Tensor], gate_heads: int = 0) -> dict[str, torch.Tensor]:
    """HF names -> ours: q/k/v_proj concatenated into qkv_proj; gate/up_proj into gate_up_proj, their rows
    interleaved as (gate j, up j) pairs: the flow kernel, which computes silu(gate) * up where gate_up's rows are
    finished, streams one region of rows (read as two, gate then up, the same chain took 10% longer).

    With `gate_heads` (Qwen3.5's gated attention) q_proj holds, per head, the query then the output gate: the
    queries go first and the gates last in qkv_proj. A Gated DeltaNet's in_proj_qkv / z / b / a become in_proj."""
    fused = dict(state)
    for key in [k for k in state if k.endswith("self_attn.q_proj.weight") or k.endswith("self_attn.q_proj.bias")]:
        prefix, kind = key.rsplit(".q_proj.", 1)
        parts = [fused.pop(f"{prefix}.{p}_proj.{kind}") for p in ("q", "k", "v")]
        if gate_heads:
            query, gate = parts[0].unflatten(0, (gate_heads, 2, -1)).unbind(1)
            parts = [query.flatten(0, 1), parts[1], parts[2], gate.flatten(0, 1)]
        fused[f"{prefix}.qkv_proj.{kind}"] = torch.cat(parts)
    for key in [k for k in state if k.endswith("linear_attn.in_proj_qkv.weight")]:
        prefix = key.removesuffix("_qkv.weight")
        fused[f"{prefix}.weight"] = torch.cat([fused.pop(f"{prefix}_{p}.weight") for p in ("qkv", "z", "b", "a")])
    for key in [k for k in state if ".mlp.gate_proj." in k]:
        prefix, kind = key.rsplit(".gate_proj.", 1)
        parts = [fused.pop(f"{prefix}.{p}_proj.{kind}") for p in ("gate", "up")]
        fused[f"{prefix}.gate_up_proj.{kind}"] = torch.stack(parts, dim=1).flatten(0, 1)
    return fused


class TargetModel(nn.Module):
    def __init__(self, cfg: TargetConfig, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(TargetLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.zero_centred_norms)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(inv_freq, attention_scaling)
        self._flow: FlowDecode | None = None
        self._prepared = False

    @staticmethod
    def from_hf(hf_model: nn.Module) -> "TargetModel":
        """Build from a loaded transformers causal LM, sharing (not copying) its weight storage."""
        state = hf_model.state_dict()
        cfg = TargetConfig.from_hf(hf_model.config, set(state))
        inv_freq, scaling = rope_inv_freq(hf_model.config, cfg.rotary_dim or cfg.head_dim)
        with torch.device("meta"):
            model = TargetModel(cfg, inv_freq, scaling)
        ours = fuse_projections({name.removeprefix("model."): tensor for name, tensor in state.items()
                                 if not name.endswith("rotary_emb.inv_freq")},
                                cfg.num_heads if cfg.attn_output_gate else 0)
        if cfg.tie_word_embeddings:
            ours.pop("lm_head.weight", None)
        model.load_state_dict(ours, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.rotary = RotaryEmbedding(inv_freq.to(hf_model.device), scaling)
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(f"target weights missing after conversion: {missing[:4]}")
        return model.eval()

    @staticmethod
    @torch.no_grad()
    def random(cfg: TargetConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0, std: float = 0.02, rope_theta: float = 1e6) -> "TargetModel":
        """A target of the given shape with random N(0, std) weights and identity norms, built directly on `device`
        (benchmarks of large shapes: timing does not depend on weight values)."""
        rotary_dim = cfg.rotary_dim or cfg.head_dim
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        with torch.device("meta"):
            model = TargetModel(cfg, 1.0 / (rope_theta ** exponents))
        model = model.to_empty(device=device).to(dtype)
        if cfg.tie_word_embeddings:  # to_empty gives every parameter its own storage
            model.lm_head.weight = model.embed_tokens.weight
        model.rotary = RotaryEmbedding((1.0 / (rope_theta ** exponents)).to(device))
        generator = torch.Generator(device=device).manual_seed(seed)
        for param in model.parameters():
            param.normal_(0.0, std, generator=generator)
        for name, module in model.named_modules():
            if name.endswith("norm"):
                module.weight.fill_(0.0 if getattr(module, "zero_centred", False) else 1.0)
        return model.eval()

    def new_cache(self, batch_size: int, max_len: int, verify_tokens: int = 1,
                  rollback: str = DEFAULT_ROLLBACK) -> KVCache:
        """A cache for `batch_size` rows of `max_len` positions. A hybrid target's cache keeps what `commit` needs to
        roll back after a verify of up to `verify_tokens` tokens (pass the block size when verifying), by `rollback`
        "states" or "replay" (HybridCache); other targets roll back for free and ignore both."""
        c = self.config
        weight = self.embed_tokens.weight
        if not c.gdn_layers:
            return KVCache(c.num_layers, batch_size, c.num_kv_heads, max_len, c.head_dim, weight.dtype, weight.device)
        g = c.gdn
        return HybridCache(c.num_layers - len(c.gdn_layers), len(c.gdn_layers), batch_size, c.num_kv_heads, max_len,
                           c.head_dim, (g.conv_dim, g.conv_kernel), (g.num_value_heads, g.key_head_dim,
                           g.value_head_dim), verify_tokens, weight.dtype, weight.device, rollback)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                tap_layer_ids: tuple[int, ...] = (), kv_len: int | None = None, lengths: torch.Tensor | None = None,
                commit_follows: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run `input_ids` [b, n] at `positions` [b, n], writing their K/V (and recurrent states) into `cache`.

        Returns the final-normed hidden states [b, n, H] (feed them to `logits`) and the tapped features
        [b, n, len(tap_layer_ids) * H] (None when no taps are asked for). `kv_len` bounds the cache slots
        read by the CPU attention; by default max(positions) + 1 (a host sync: pass it in hot loops).
        `lengths` [b]: right-padded rows (prompts prefilled together) hold this many real tokens; a recurrent
        state then stops at each row's last (padding K/V sits past it, rewritten before any query reads it).
        `commit_follows`: a verify whose `cache.commit(keep)` comes next, which sets a recurrent state only once.
        """
        flow = self._flow_for(input_ids, cache, tap_layer_ids)
        if flow is not None:
            return self.norm(flow(self.embed_tokens(input_ids), positions, cache).view(1, 1, -1)), None
        if kv_len is None:
            kv_len = int(positions.max()) + 1
        residual = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, residual.dtype)
        normed = self.layers[0].input_layernorm(residual)
        taps: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers):
            if layer.linear_attn is not None:
                mixed = layer.linear_attn.mix(normed, positions, cache, lengths, commit_follows)
                out_proj = layer.linear_attn.out_proj
            else:
                mixed = layer.self_attn.heads(normed, cos, sin, positions, cache, kv_len, layer.window)
                out_proj = layer.self_attn.o_proj
            residual, normed = linear_add_rms_norm(mixed, out_proj.weight, out_proj.bias, residual,
                                                   layer.post_attention_layernorm)
            next_norm = self.layers[index + 1].input_layernorm if index + 1 < len(self.layers) else self.norm
            down = layer.mlp.down_proj
            residual, normed = linear_add_rms_norm(layer.mlp.hidden(normed), down.weight, down.bias, residual,
                                                   next_norm)
            if index in tap_layer_ids:
                taps[index] = residual  # the layer's output, before the next layer's norm
        features = torch.cat([taps[i] for i in tap_layer_ids], dim=-1) if tap_layer_ids else None
        return normed, features

    def prepare_fast_path(self) -> None:
        """Build the CUDA fast path now, before any CUDA graph is captured: the flow kernel for batch-1 decode
        tokens where it applies (it stacks the layers' weights into the layout it streams and makes the layers'
        parameters views into the stacks, so the per-op kernels read the same storage), and a Gated DeltaNet's conv
        weights held taps-major for its inputs kernel. Idempotent; the engine calls it on CUDA. Building runs the
        kernel once and synchronizes."""
        if not self._prepared:
            for layer in self.layers:
                if layer.linear_attn is not None:
                    layer.linear_attn.hold_conv_taps_major()
            self._flow = flow_decoder(self)
            self._prepared = True

    def _flow_for(self, input_ids: torch.Tensor, cache: KVCache, tap_layer_ids: tuple[int, ...]) -> FlowDecode | None:
        """The flow kernel for this call, or None: it takes one token of one sequence, without taps, on a cache of
        one row, once `prepare_fast_path` has built it; never under `KernelSettings.batch_invariant` (its RMSNorm
        rounds where the per-op kernels of a verify block do not)."""
        settings = current_settings()
        if self._flow is None or not settings.flow_decode or settings.batch_invariant:
            return None
        if not (input_ids.shape == (1, 1) and not tap_layer_ids and cache.k.shape[1] == 1 and cache.k.is_contiguous()
                and fused_kernels_apply(self.embed_tokens.weight)):
            return None
        return self._flow

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head.weight)  # the skinny GEMM where the device's table lists the shape

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """`logits(hidden).argmax(-1)`, without writing the logits where the lm_head runs on the skinny GEMM."""
        return linear_argmax(hidden, self.lm_head.weight)
