"""The target's batch-1 decode token in one launch: every decoder layer through the flow kernel
(blockspec/kernels/flow.py) instead of ~10 kernels per layer, where the target's shape allows it (Qwen3-style: q/k
norms, 4 q heads per kv head of 128 dims, no biases or sliding windows, bf16 on CUDA) and the device has measured
launch settings for it (blockspec/kernels/tables).

The kernel reads each projection's weights as one tensor [layers, N, K], so building it stacks every layer's
weights and makes the layers' parameters views into the stacks (the per-op kernels of the verify and prefill
passes read the same storage; nothing is held twice). Its RMSNorm rounds once after the GEMV rather than before
it, so its tokens may differ from the per-op kernels' where two logits are within bf16 rounding; every run of the
engine's batch-1 greedy decode, eager or graphed, takes it alike.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from blockspec.cache import KVCache
from blockspec.kernels import device_tables

if TYPE_CHECKING:
    from blockspec.target.model import TargetConfig

log = logging.getLogger(__name__)

# stacked together, each group's weights of every layer: [layers, N, K] per projection, [layers, 2, dim] per norm pair
WEIGHT_GROUPS = (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",),
                 ("input_layernorm", "post_attention_layernorm"), ("self_attn.q_norm", "self_attn.k_norm"))


def shape_unsupported(c: TargetConfig, rope_scaling: float = 1.0) -> str | None:
    """Why the flow kernel cannot take a target of this shape (None: it can)."""
    q_dim = c.num_heads * c.head_dim
    reasons = [(not c.hybrid, "Qwen3.5-style layers"), (c.qk_norm, "no q/k norms"),
               (not (c.qkv_bias or c.o_bias or c.mlp_bias), "biases"),
               (all(w is None for w in c.sliding_windows), "sliding-window layers"),
               (c.head_dim == 128, f"head_dim {c.head_dim}, not 128"),
               (c.num_heads == 4 * c.num_kv_heads, f"{c.num_heads} q heads over {c.num_kv_heads} kv heads, not 4 each"),
               (all(n % 512 == 0 for n in (c.hidden_size, c.intermediate_size, q_dim)),
                "hidden, intermediate or q size not a multiple of 512"),
               (rope_scaling == 1.0, "scaled RoPE attention")]
    return next((reason for ok, reason in reasons if not ok), None)


def flow_unsupported(model: nn.Module) -> str | None:
    """Why the flow kernel cannot run this target's decode token (None: it can)."""
    weight = model.embed_tokens.weight
    if not weight.is_cuda or weight.dtype != torch.bfloat16:
        return "not bf16 on CUDA"
    if torch.cuda.get_device_capability(weight.device) < (9, 0):
        return "not a Hopper or newer GPU"
    if device_tables(weight.device).flow is None:
        return f"no flow-kernel settings measured for {torch.cuda.get_device_name(weight.device)}"
    reason = shape_unsupported(model.config, model.rotary.attention_scaling)
    if reason is None:
        try:
            import blockspec.kernels.flow  # noqa: F401  (Triton's Gluon dialect, Triton >= 3.6)
        except ImportError as exc:
            reason = f"no Gluon ({exc})"
    return reason


def stack_layer_weights(layers: nn.ModuleList) -> list[torch.Tensor]:
    """Each of WEIGHT_GROUPS stacked over the layers, the layers' parameters made views into the stacks (each
    group's old storage is freed as it is replaced, so the peak is one group's copy). Returns the stacks: qkv,
    o_proj, gate_up, down [layers, N, K]; the layer norms [layers, 2, hidden]; the q/k norms [layers, 2, head_dim]."""
    stacks = []
    # ordinary tensors even when built during an inference-mode decode: a later training step may save them
    with torch.inference_mode(False), torch.no_grad():
        for paths in WEIGHT_GROUPS:
            modules = [[layer.get_submodule(path) for path in paths] for layer in layers]
            whole = torch.stack([torch.stack([m.weight for m in row]) for row in modules])
            for index, row in enumerate(modules):
                for part, module in enumerate(row):
                    module.weight = nn.Parameter(whole[index, part], requires_grad=False)
            stacks.append(whole[:, 0] if len(paths) == 1 else whole)
    return stacks


class FlowDecode:
    """The flow kernel bound to one target: call it with the token's embedding, its position and the batch-1 KV
    cache; it returns the residual stream after the last layer, the new k and v written to the cache."""

    def __init__(self, model: nn.Module) -> None:
        from blockspec.kernels.flow import layer_decoder

        *projections, norms, qk_norms = stack_layer_weights(model.layers)
        self.rotary = model.rotary
        self.run, self.failed = layer_decoder(projections, norms, qk_norms, model.config.rms_norm_eps,
                                              device_tables(projections[0].device).flow)

    def __call__(self, embedding: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        cos, sin = self.rotary(positions, embedding.dtype)
        half = cos.shape[-1] // 2
        rope = torch.stack([cos.view(-1)[:half], sin.view(-1)[:half]]).float()  # rounded to bf16 as the kernels'
        return self.run(embedding.view(-1), positions.view(-1), rope, cache.k, cache.v)

    def all_resident(self, model: nn.Module) -> bool:
        """Run once on a one-position scratch cache: False if a program gave up waiting for another (the programs
        were not all resident on the GPU at once, so the kernel's results cannot be trusted here)."""
        c, device = model.config, model.embed_tokens.weight.device
        scratch = KVCache(c.num_layers, 1, c.num_kv_heads, 1, c.head_dim, torch.bfloat16, device)
        ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self(model.embed_tokens(ids), ids, scratch)
        return not bool(self.failed.item())


def flow_decoder(model: nn.Module) -> FlowDecode | None:
    """The target's FlowDecode (call it outside CUDA-graph capture: building runs the kernel and synchronizes);
    None where it does not apply (logged)."""
    reason = flow_unsupported(model)
    if reason is None:
        flow = FlowDecode(model)
        if flow.all_resident(model):
            return flow
        reason = "its programs were not all resident on the GPU at once"
    log.info("batch-1 decode runs the per-op kernels: the flow kernel does not apply (%s)", reason)
    return None
