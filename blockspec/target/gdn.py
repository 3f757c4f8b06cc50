"""The Gated DeltaNet mixer of hybrid targets (Qwen3.5), with its two torch recurrences (SPEC section 9).

Per token t and value head, with the state S [Dk, Dv] in fp32, L2-normalised q_t and k_t, beta_t = sigmoid(b_t)
and the decay g_t = -exp(A_log) * softplus(a_t + dt_bias):

    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - (exp(g_t) S_{t-1})^T k_t))^T,    o_t = S_t^T q_t / sqrt(Dk)

Decode and verify run the per-token form (`delta_rule_step`), so a verify makes the same choices as one-token
decoding; a prefill longer than the cache's verify window runs the chunked form (`delta_rule_chunked`), the same
recurrence folded into a few matrix products per chunk. The depthwise causal convolution in front runs as K
shifted multiply-adds in fp32, the same arithmetic for any number of tokens.

On CUDA a decode or verify runs kernels/gdn.py (two launches a layer, the same per-token arithmetic); a prefill runs
flash-linear-attention's chunked kernels where that package is installed, between the same kernels' inputs and
gated norm (`gdn_prefill`; without them, `prefill_delta_rule` on the torch path's inputs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from blockspec.cache import HybridCache, defers_commits
from blockspec.kernels import current_settings
from blockspec.layers import fused_kernels_apply, linear


@dataclass(frozen=True)
class GDNConfig:
    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: q, k and v."""
        return 2 * self.key_dim + self.value_dim


def causal_conv(window: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SiLU of the depthwise causal convolution, in fp32: window [b, C, K-1+n] (the conv state, then n inputs),
    weight [C, 1, K] -> [b, C, n]. Output t is sum_j weight[j] * window[t + j]."""
    kernel = weight.shape[-1]
    n = window.shape[-1] - kernel + 1
    w = weight.float()[:, 0]
    out = window[..., :n].float() * w[:, :1]
    for j in range(1, kernel):
        out = out + window[..., j:j + n].float() * w[:, j:j + 1]
    return F.silu(out)


def decayed(state: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """state [.., Dk, Dv] * decay [..] (= exp(g))."""
    return state * decay[..., None, None]


def rank_one_update(state: torch.Tensor, k: torch.Tensor, innovation: torch.Tensor) -> torch.Tensor:
    """state + k innovation^T (k [.., Dk], innovation [.., Dv]). A step and a replay of it share these two functions,
    so they round alike."""
    return state + k[..., None] * innovation[..., None, :]


def delta_rule_step(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                    beta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One token: state [b, h, Dk, Dv]; q, k [b, h, Dk]; v [b, h, Dv]; g, beta [b, h] (all fp32) ->
    (the new state, the output [b, h, Dv], the decay exp(g) [b, h] and the innovation [b, h, Dv] it applied)."""
    decay = g.exp()
    state = decayed(state, decay)
    seen = (state * q[..., None]).sum(-2)  # the output, S_new^T q, as S^T q + innovation (k . q), as the kernel has it
    innovation = (v - (state * k[..., None]).sum(-2)) * beta[..., None]
    return rank_one_update(state, k, innovation), seen + innovation * (k * q).sum(-1, keepdim=True), decay, innovation


def replay_steps(state: torch.Tensor, tape_k: torch.Tensor, tape_decay: torch.Tensor, tape_u: torch.Tensor,
                 keep: torch.Tensor, n: int) -> torch.Tensor:
    """Each row's state after its first keep[row] tokens of a forward of n, from the state before it
    [L, b, h, Dk, Dv] and the forward's updates (tape_k [L, b, T, h, Dk], tape_decay [L, b, T, h], tape_u
    [L, b, T, h, Dv]): bit for bit the state that forward reached after that token."""
    for t in range(n):
        stepped = rank_one_update(decayed(state, tape_decay[:, :, t]), tape_k[:, :, t], tape_u[:, :, t])
        state = torch.where((t < keep)[None, :, None, None, None], stepped, state)
    return state


def delta_rule_chunked(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                       beta: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """n tokens at once: q, k [b, h, n, Dk]; v [b, h, n, Dv]; g, beta [b, h, n] -> (the final state, outputs
    [b, h, n, Dv]).

    Within a chunk, with G_t the cumulative decay since the chunk start and S_0 the state before it, the
    innovations u_t = beta_t (v_t - (exp(g_t) S_{t-1})^T k_t) solve the unit lower-triangular system
    u_t + beta_t sum_{s<t} e^(G_t-G_s) (k_t.k_s) u_s = beta_t (v_t - e^(G_t) S_0^T k_t); then
    o_t = e^(G_t) S_0^T q_t + sum_{s<=t} e^(G_t-G_s) (q_t.k_s) u_s and S_C = e^(G_C) S_0 + sum_s e^(G_C-G_s) k_s u_s^T.
    Padding tokens (g = beta = 0, k = 0) leave the state unchanged.
    """
    n = k.shape[2]
    pad = -n % chunk
    q, k, v = (F.pad(t, (0, 0, 0, pad)).unflatten(2, (-1, chunk)) for t in (q, k, v))  # [b, h, m, C, d]
    g, beta = (F.pad(t, (0, pad)).unflatten(2, (-1, chunk)) for t in (g, beta))  # [b, h, m, C]
    cum = g.cumsum(-1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [.., t, s]
    system = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    rhs = torch.cat([beta[..., None] * v, (beta * cum.exp())[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    from_values, from_state = solved.split([v.shape[-1], k.shape[-1]], dim=-1)  # u = from_values - from_state @ S_0
    scores = (q @ k.transpose(-1, -2)) * decay
    q_decayed = q * cum.exp()[..., None]
    k_to_end = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]
    outputs = []
    for i in range(q.shape[2]):
        innovations = from_values[:, :, i] - from_state[:, :, i] @ state
        outputs.append(q_decayed[:, :, i] @ state + scores[:, :, i] @ innovations)
        state = state * chunk_decay[:, :, i] + k_to_end[:, :, i].transpose(-1, -2) @ innovations
    return state, torch.cat(outputs, dim=2)[:, :, :n]


@functools.cache
def _fla_chunked() -> Callable | None:
    """flash-linear-attention's chunked gated delta rule where that package is installed (an optional dependency)."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return None
    return chunk_gated_delta_rule


def chunked_kernel(x: torch.Tensor) -> Callable | None:
    """flash-linear-attention's chunked recurrence for a prefill on x's device: where it is installed, x is on CUDA and
    KernelSettings.fla_prefill allows (its dots in tf32: a prefill need not round as decoding does)."""
    return _fla_chunked() if x.is_cuda and current_settings().fla_prefill else None


def prefill_delta_rule(state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                       beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt's recurrence, as `delta_rule_chunked` takes and returns it: through `chunked_kernel` where there is
    one, else the torch chunked form."""
    fla = chunked_kernel(q)
    if fla is None:
        return delta_rule_chunked(state, q, k, v, g, beta)
    out, state = fla(*(t.transpose(1, 2) for t in (q, k, v, g, beta)), scale=1.0, initial_state=state,
                     output_final_state=True)  # q comes scaled; fla takes [b, n, h, ...]
    return state, out.transpose(1, 2)


def l2_normalise(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class GatedRMSNorm(nn.Module):
    """RMSNorm(x) * silu(gate) per value head: plain (not zero-centred) weight; the rounding points of Hugging
    Face's Qwen3.5 code (normed in fp32, cast, times the weight, times silu(gate) in fp32, cast)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (self.weight * normed * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """The token mixer of a linear-attention layer. Its projections in_proj_qkv, in_proj_z, in_proj_b and in_proj_a
    are fused into one `in_proj` (one weight read); `conv1d` keeps Hugging Face's name and weight [C, 1, K]."""

    def __init__(self, cfg: GDNConfig, hidden_size: int, eps: float, gdn_index: int) -> None:
        super().__init__()
        self.cfg, self.gdn_index = cfg, gdn_index
        heads = cfg.num_value_heads
        self.splits = [cfg.conv_dim, cfg.value_dim, heads, heads]  # qkv, z, b, a
        self.in_proj = nn.Linear(hidden_size, sum(self.splits), bias=False)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.conv_kernel, groups=cfg.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(heads))
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.norm = GatedRMSNorm(cfg.value_head_dim, eps)
        self.out_proj = nn.Linear(cfg.value_dim, hidden_size, bias=False)

    def mix(self, x: torch.Tensor, positions: torch.Tensor, cache: HybridCache,
            lengths: torch.Tensor | None = None, commit_follows: bool = False) -> torch.Tensor:
        """The gated norm's output [b, n, V] for x [b, n, H] at positions [b, n] (out_proj, the residual add and
        the next norm follow in TargetModel.forward). A row whose first position is 0 starts from an empty state (a
        new sequence in a reused row), decided on the device. Updates the row states in `cache` (with
        `commit_follows`, a verify: the recurrent state waits for `cache.commit`). With `lengths` [b] a row's tokens
        past its length are padding: zero inputs (q, k, v, beta and the log-decay g), which leave the recurrent
        state as it was, bit for bit, and the conv state is the one after the row's last token."""
        c, n = self.cfg, x.shape[1]
        # decode or verify: token by token, keeping what commit() needs
        keeps_steps, deferred = cache.keeps_steps(n, commit_follows)
        layer = cache.gdn_layer(self.gdn_index)
        projected = linear(x, self.in_proj.weight)
        chunked = chunked_kernel(projected)
        fused = self._fused(projected) and (keeps_steps or chunked is not None)
        if not (fused and keeps_steps and defers_commits(cache.pending, x.shape[0])):
            self._settle(cache, positions)  # (a deferring kernel applies what a deferred commit left pending itself)
        if fused:
            from blockspec.kernels.gdn import gdn_prefill, gdn_steps

            args = (projected, positions, self.conv1d.weight, self.A_log, self.dt_bias, self.norm.weight,
                    self.norm.eps, layer, lengths)
            return gdn_steps(*args, deferred) if keeps_steps else gdn_prefill(*args, chunked)
        fresh = (positions[:, 0] == 0)[:, None, None]
        qkv, z, beta, a = projected.split(self.splits, dim=-1)
        window = torch.cat([torch.where(fresh, 0, layer.conv), qkv.transpose(1, 2)], dim=-1)  # [b, C, K-1+n]
        mixed = causal_conv(window, self.conv1d.weight).to(x.dtype).transpose(1, 2)
        q, k, v = mixed.split([c.key_dim, c.key_dim, c.value_dim], dim=-1)
        repeat = c.num_value_heads // c.num_key_heads  # each q/k head serves this many consecutive value heads
        q, k = (l2_normalise(t.float().unflatten(-1, (c.num_key_heads, c.key_head_dim)))
                .repeat_interleave(repeat, dim=2).transpose(1, 2) for t in (q, k))  # [b, h, n, Dk]
        q = q * c.key_head_dim ** -0.5
        v = v.float().unflatten(-1, (c.num_value_heads, c.value_head_dim)).transpose(1, 2)
        g = (-self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())).transpose(1, 2)  # [b, h, n]
        beta = beta.sigmoid().float().transpose(1, 2)
        if lengths is not None:
            real = torch.arange(n, device=x.device) < lengths[:, None]  # [b, n]
            q, k, v = (t * real[:, None, :, None] for t in (q, k, v))
            g, beta = g * real[:, None], beta * real[:, None]
        initial = current = torch.where(fresh[..., None], 0, layer.recurrent)
        if keeps_steps:
            layer.windows[:, :window.shape[-1]] = window.transpose(1, 2)
            outputs = []
            for t in range(n):
                current, out, decay, innovation = delta_rule_step(current, q[:, :, t], k[:, :, t], v[:, :, t],
                                                                  g[:, :, t], beta[:, :, t])
                layer.keep(t, current, k[:, :, t], decay, innovation)
                outputs.append(out)
            out = torch.stack(outputs, dim=2)
        else:  # a prefill
            current, out = prefill_delta_rule(current, q, k, v, g, beta)
        layer.take_conv_state(qkv, lengths, fresh.view(-1))
        layer.recurrent.copy_(initial if deferred else current)
        out = self.norm(out.transpose(1, 2).to(x.dtype), z.unflatten(-1, (c.num_value_heads, c.value_head_dim)))
        return out.flatten(2)

    def hold_conv_taps_major(self) -> None:
        """Keep the conv weight's values and shape [C, 1, K] but store each tap's channels contiguously (strides (1, C,
        C)): the CUDA inputs kernel then reads a tap's weights as vectors in its tiles' layout (offline for sm_90, 15%
        fewer instructions a program and 25 barriers instead of 59 than with the weights' channels K apart)."""
        weight = self.conv1d.weight
        with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, as the flow kernel's stacks are
            taps_major = weight.permute(2, 1, 0).contiguous().permute(2, 1, 0)
            self.conv1d.weight = nn.Parameter(taps_major, requires_grad=weight.requires_grad)

    def _settle(self, cache: HybridCache, positions: torch.Tensor) -> None:
        """Before the first Gated DeltaNet layer of a forward that reads the states as they stand (a prefill, the
        torch ops, a step of too few rows to defer) the cache settles every layer's at once: the forward's other
        layers take the same path."""
        if self.gdn_index == 0:
            cache.settle(positions)

    def _fused(self, projected: torch.Tensor) -> bool:
        """Whether a decode or verify runs the Triton kernels: CUDA inference with KernelSettings.fused_gdn on, head
        dims that are powers of two."""
        c = self.cfg
        return (fused_kernels_apply(projected, self.conv1d.weight) and current_settings().fused_gdn
                and all(d & (d - 1) == 0 for d in (c.key_head_dim, c.value_head_dim)))
