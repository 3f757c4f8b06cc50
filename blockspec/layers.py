"""Building blocks shared by the target and the draft networks.

Numerics follow Hugging Face's Llama/Qwen3 code exactly (RMSNorm in fp32, rotate-half RoPE with cos/sin
computed in fp32), so that taps and logits match the reference implementations to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.weak import WeakIdKeyDictionary

from blockspec.kernels import current_settings
from blockspec.kernels.settings import prompt_attention_config


def fused_kernels_apply(*tensors: torch.Tensor) -> bool:
    """The Triton kernels serve CUDA inference (unless KernelSettings.fused_kernels is off); they have no
    backward, so anything needing gradients (draft training) takes the plain torch ops."""
    return tensors[0].is_cuda and current_settings().fused_kernels and not _wants_gradients(*tensors)


def _wants_gradients(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _skinny_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[int, dict] | None:
    """(rows, settings) when x's product with `weight` [n, k] (and `bias`) runs on the Triton skinny GEMM: CUDA
    inference of 16-bit weights of a shape and row count the device's measured table lists (decoding, a verify or
    draft block, a small batch of them: kernels.skinny.skinny_table), or any rows and shape under
    `KernelSettings.batch_invariant`; None: cuBLAS (F.linear)."""
    entry = _table_entry(x, weight, bias)
    return None if entry is None or "cublas_split_k" in entry[1] else entry


def _table_entry(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[int, dict] | None:
    """(rows, settings) of the table's entry for x's product with `weight`: a skinny-GEMM config, or {"cublas_split_k":
    s} (cuBLAS over s K ranges, for a norm that sums them: `linear_add_rms_norm`); None: cuBLAS (F.linear)."""
    params = (weight,) if bias is None else (weight, bias)
    if x.dtype != weight.dtype or weight.element_size() != 2 or not fused_kernels_apply(x, *params):
        return None
    from blockspec.kernels.skinny import invariant_config, skinny_config

    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0:
        return None
    n, k = weight.shape
    if current_settings().batch_invariant:
        return rows, invariant_config(n, k, x.device)
    config = skinny_config(n, k, rows, x.device)
    return (rows, config) if config is not None else None


# Weights packed for oneDNN, per tensor (a view's base: the draft's stacked projections are sliced per call): for
# each view of it (offset, shape, strides), its version when packed and the pack; they go when the tensor goes.
_ONEDNN_PACKS: "WeakIdKeyDictionary[torch.Tensor, dict]" = WeakIdKeyDictionary()


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """F.linear through oneDNN with the weight packed once, for CPU inference in fp32; None where it does not apply
    (another device or dtype, gradients wanted, a torch without oneDNN, KernelSettings.onednn_linear off). On x86
    hosts whose MKL runs a 16-row GEMM at 5-7x one row's time, oneDNN is 1.5-3x faster at 1 to 16 rows (design-notes.md,
    the CPU path)."""
    params = (x, weight) if bias is None else (x, weight, bias)
    if (x.device.type != "cpu" or any(t.dtype != torch.float32 for t in params) or weight.dim() != 2 or not x.numel()
            or not torch.backends.mkldnn.is_available() or not current_settings().onednn_linear
            or _wants_gradients(*params)):
        return None
    base = weight if weight._base is None else weight._base
    version = 0 if weight.is_inference() else weight._version  # an optimizer step or load_state_dict bumps it
    view = (weight.storage_offset(), tuple(weight.shape), weight.stride())
    packs = _ONEDNN_PACKS.setdefault(base, {})
    packed_version, packed = packs.get(view, (None, None))
    if packed_version != version:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        packs[view] = (version, packed)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "").view(*x.shape[:-1], -1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear (on the CPU in fp32 inference, through oneDNN: `_onednn_linear`); on CUDA inference with few rows
    (decoding, a verify or draft block, a small batch) of 16-bit weights the Triton skinny GEMM, which streams the
    weight at close to full bandwidth where cuBLAS's small-M kernels do not (its tile table is measured in bf16:
    fp32 tiles of those sizes overflow shared memory); with `KernelSettings.batch_invariant`, every product of 16-bit
    weights, so that a row's output does not depend on the row count.

    Leading dims are flattened into one matrix of rows first. Given a strided x (the draft's lm_head input, slots
    1.. of each block) and a weight without autograd state (a model built under inference mode, as the benchmarks
    build theirs), F.linear runs a matmul batched over the leading dim that reads the weight once per index: for
    the 4B's lm_head 778 MB a row, most of a batched draft pass."""
    skinny = _skinny_rows(x, weight, bias)
    if skinny is not None:
        from blockspec.kernels.skinny import skinny_linear

        rows, config = skinny
        return skinny_linear(x.reshape(rows, -1), weight, bias, config).view(*x.shape[:-1], -1)
    on_cpu = _onednn_linear(x, weight, bias)
    if on_cpu is not None:
        return on_cpu
    if x.dim() > 2:  # a contiguous x is a view: the same GEMM F.linear folds it into
        return F.linear(x.flatten(0, -2), weight, bias).unflatten(0, x.shape[:-1])
    return F.linear(x, weight, bias)


def linear_silu_mul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`silu_mul(linear(x, weight, bias))` for a fused gate_up projection ([..., k] -> [..., n / 2]). Where `linear`
    takes the skinny GEMM and its settings do not split K, the GEMM's epilogue writes silu(gate) * up itself: one
    launch instead of two, bit-identical."""
    skinny = _skinny_rows(x, weight, bias)
    if skinny is not None and skinny[1]["split_k"] == 1:
        from blockspec.kernels.skinny import skinny_linear

        rows, config = skinny
        return skinny_linear(x.reshape(rows, -1), weight, bias, config, silu_mul=True).view(*x.shape[:-1], -1)
    return silu_mul(linear(x, weight, bias))


def linear_argmax(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`linear(x, weight).argmax(-1)` ([..., k] -> [...] int64): a greedy step's tokens. Where `linear` takes the
    skinny GEMM and its settings do not split K, the same GEMM keeps each column block's maximum instead of
    writing the logits (bit-identical choices: the same rounding, the first column on ties); written logits on
    CUDA take `argmax_rows`, the same choices."""
    skinny = _skinny_rows(x, weight)
    if skinny is not None and skinny[1]["split_k"] == 1:
        from blockspec.kernels.skinny import skinny_argmax

        rows, config = skinny
        return skinny_argmax(x.reshape(rows, -1), weight, config).view(x.shape[:-1])
    logits = linear(x, weight)
    if fused_kernels_apply(logits) and logits.numel():
        from blockspec.kernels.skinny import argmax_rows

        return argmax_rows(logits.reshape(-1, logits.shape[-1])).view(logits.shape[:-1])
    return logits.argmax(-1)


class RMSNorm(nn.Module):
    """`x * rsqrt(mean(x^2) + eps)` in fp32, cast back to the input dtype, then times the weight.

    Zero-centred (Qwen3.5): the weight is stored as an offset from 1 and applied as `(1 + w)` in fp32 before the
    cast, as Hugging Face's Qwen3.5 code does."""

    def __init__(self, dim: int, eps: float, zero_centred: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centred else torch.ones(dim))
        self.eps = eps
        self.zero_centred = zero_centred

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_kernels_apply(x, self.weight):
            from blockspec.kernels.norm_rope import rms_norm

            return rms_norm(x, self.weight, self.eps, self.zero_centred)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centred:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


class StackedWeights(nn.Module):
    """A module that runs several of its nn.Linear layers as one projection (`stacked`): one weight stream, one GEMM.

    The separate layers stay the parameters, so state_dict keys (the published names) and training are untouched.
    Under autograd the concatenation is rebuilt every call (gradients reach the parts); otherwise it is cached until
    a part changes: an optimizer step or load_state_dict bumps its version (writes through `.data` do not; inference
    tensors have none, and change only in inference mode). A CUDA graph captured earlier keeps reading the
    concatenation it captured: capture again after changing weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self._stacked: dict[str, tuple] = {}

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        # .to() / .half() give the parts new storage: drop concatenations of the old one
        self._stacked = {}
        return super()._apply(fn, recurse)

    def stacked(self, name: str, *layers: nn.Linear, interleave: bool = False,
                rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weights (and biases) of `layers` concatenated along the outputs; `interleave`: output j of each
        layer in turn (the (gate j, up j) pairs that `linear_silu_mul` reads); `rows` (start, stop): those outputs
        of it, a view cached beside it (the same tensor every call: a view of an inference tensor has no `_base`,
        by which the CPU's packed weights would otherwise find it)."""
        parts = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
        cache = not _wants_gradients(*parts)
        if rows is not None:
            weight, bias = self.stacked(name, *layers, interleave=interleave)
            cached = self._stacked.get((name, rows))
            if cached is not None and cached[0] is weight:
                return cached[1]
            view = (weight[rows[0]:rows[1]], None if bias is None else bias[rows[0]:rows[1]])
            if cache:
                self._stacked[(name, rows)] = (weight, view)
            return view
        key = [(p.data_ptr(), 0 if p.is_inference() else p._version) for p in parts]
        cached = self._stacked.get(name)
        if cache and cached is not None and cached[0] == key:
            return cached[1]

        def join(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(tensors, dim=1).flatten(0, 1) if interleave else torch.cat(tensors)

        weight = join([layer.weight for layer in layers])
        bias = join([layer.bias for layer in layers]) if layers[0].bias is not None else None
        if cache:
            self._stacked[name] = (key, (weight, bias))
        return weight, bias


class GatedMLP(StackedWeights):
    """`down(silu(gate(x)) * up(x))`, gate and up run as one interleaved projection."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.hidden(x), self.down_proj.weight, self.down_proj.bias)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate(x)) * up(x), what down_proj takes."""
        gate_up, bias = self.stacked("gate_up", self.gate_proj, self.up_proj, interleave=True)
        return linear_silu_mul(x, gate_up, bias)


def gated(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (one kernel on CUDA instead of two)."""
    if fused_kernels_apply(gate, up):
        from blockspec.kernels.norm_rope import silu_mul as fused

        return fused(gate, up)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, for fused projections [..., 2I] holding (gate j, up j) pairs (see fuse_projections)."""
    if gate_up.is_cuda:
        return gated(gate_up[..., 0::2], gate_up[..., 1::2])
    # on the CPU, silu of every other column takes a scalar loop: over all of them it vectorizes, 1.6-2x faster
    # (and rounds as HF's silu of the separate gate projection does)
    return F.silu(gate_up)[..., 0::2] * gate_up[..., 1::2]


def rope_parameters(config: object) -> dict:
    """The RoPE settings of a Hugging Face config object or a raw config dict, in either layout.

    transformers <= 4.x writes `rope_theta` (+ optional `rope_scaling`) at the top level; 5.x writes a
    `rope_parameters` dict. Returns a dict with at least `rope_type` and `rope_theta`.
    """
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    params = dict(get("rope_parameters") or {})
    scaling = get("rope_scaling") or {}
    if isinstance(scaling, dict):
        for key, value in scaling.items():
            params.setdefault(key, value)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    if params.get("rope_theta") is None:
        params["rope_theta"] = get("rope_theta") or 10000.0
    return params


def rope_inv_freq(config: object, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32, CPU) and the attention scaling factor for a config.

    The plain case is computed here; scaled variants (YaRN, llama3, linear, ...) go through transformers'
    own initialisers so every published scaling rule is honoured exactly.
    """
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (float(params["rope_theta"]) ** exponents), 1.0
    from transformers import PretrainedConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        from blockspec.errors import BlockspecError

        raise BlockspecError(f"unsupported rope type {rope_type!r} in rope_scaling/rope_parameters; "
                             f"supported: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    if isinstance(config, dict):
        from transformers import Qwen3Config

        config = Qwen3Config(**{k: v for k, v in config.items() if k not in ("architectures", "auto_map")})
    assert isinstance(config, PretrainedConfig)
    with torch.device("cpu"):  # callers may be building the model under torch.device("meta")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, computed in fp32 then cast to the activation dtype."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = attention_scaling

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module's signature)
        # `.to(bfloat16)` on the model must not round the frequencies: SPEC keeps them in fp32.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if not inv_freq.is_meta and not self.inv_freq.is_meta:
            self.inv_freq = inv_freq.to(device=self.inv_freq.device, dtype=torch.float32)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.is_cuda and fused_kernels_apply(positions) and current_settings().fused_rope:  # one kernel
            from blockspec.kernels.norm_rope import rope_tables

            cos, sin = rope_tables(positions, self.inv_freq, self.attention_scaling, dtype)
            return cos[:, None], sin[:, None]
        freqs = positions.float()[..., None] * self.inv_freq  # [b, n, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, None], sin[:, None]  # [b, 1, n, d]: broadcast over heads


def qkv_rope_store(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, n_heads: int, n_kv: int,
                   head_dim: int, q_norm: RMSNorm | None, k_norm: RMSNorm | None, cos: torch.Tensor,
                   sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor) -> torch.Tensor | None:
    """Projections q [b, n, nH*d] (None: context only, no queries), k and v [b, n, nKV*d]: RMSNorm q and k
    per head when norms are given (Qwen3), rotate them, store K and V at `positions` in the cache layer
    [b, nKV, max_len, d]; returns q as [b, nH, n, d]. One kernel on CUDA; plain ops elsewhere."""
    norms = [n for n in (q_norm, k_norm) if n is not None]
    if fused_kernels_apply(k, *[t for t in (q, v) if t is not None], *[n.weight for n in norms]):
        from blockspec.kernels.norm_rope import qkv_rope_store as fused

        eps = k_norm.eps if k_norm is not None else 0.0
        return fused(q, k, v, n_heads, n_kv, head_dim, q_norm.weight if q_norm is not None else None,
                     k_norm.weight if k_norm is not None else None, eps, cos, sin, positions, k_cache, v_cache,
                     any(n.zero_centred for n in norms))
    b, n, _ = k.shape
    k = k.reshape(b, n, n_kv, head_dim)
    if k_norm is not None:
        k = k_norm(k)
    rows = torch.arange(b, device=positions.device)[:, None]
    k_cache[rows, :, positions] = apply_rope(k.transpose(1, 2), cos, sin).transpose(1, 2)
    v_cache[rows, :, positions] = v.reshape(b, n, n_kv, head_dim)
    if q is None:
        return None
    q = q.reshape(b, n, n_heads, head_dim)
    if q_norm is not None:
        q = q_norm(q)
    return apply_rope(q.transpose(1, 2), cos, sin)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, norm(x + delta)): the residual update fused with the next norm (one kernel on CUDA)."""
    if fused_kernels_apply(x, delta, norm.weight):
        from blockspec.kernels.norm_rope import add_rms_norm as fused

        return fused(x, delta, norm.weight, norm.eps, norm.zero_centred)
    total = x + delta
    return total, norm(total)


def linear_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
                        norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rms_norm(residual, linear(x, weight, bias), norm)`: a layer's output projection, the residual add and the
    next norm. Where the skinny GEMM splits K, the norm's kernel sums its partials itself: the same bits, one launch
    fewer a projection (a down_proj splits at 1 to 32 rows). Where the table says {"cublas_split_k": s}, cuBLAS
    writes s K ranges' fp32 partials in one batched GEMM and the norm sums those: no reduce launch of cuBLAS's own
    split-K (a verify's o_proj and down_proj at 33-256 rows)."""
    entry = _table_entry(x, weight, bias)
    if entry is None or residual.dtype != x.dtype or not fused_kernels_apply(residual, norm.weight):
        return add_rms_norm(residual, linear(x, weight, bias), norm)
    from blockspec.kernels.norm_rope import add_partials_rms_norm
    from blockspec.kernels.skinny import cublas_partials, skinny_linear_unsummed

    rows, config = entry
    if "cublas_split_k" in config:
        delta = cublas_partials(x.reshape(rows, -1), weight, config["cublas_split_k"])
    else:
        delta = skinny_linear_unsummed(x.reshape(rows, -1), weight, bias, config)
    if delta.dim() == 2:  # one K range: the GEMM wrote its output, bias included
        return add_rms_norm(residual, delta, norm)
    return add_partials_rms_norm(residual, delta, bias, norm.weight, norm.eps, norm.zero_centred)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on `x` of shape [b, heads, n, d]. Partial RoPE (cos/sin narrower than d, Qwen3.5) rotates
    the first cos.shape[-1] dims of each head and passes the rest through."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = rot // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION}  # what a device table's prompt entry may name as "sdpa"
DECODE_QUERIES = 16  # up to this many query tokens, CUDA attention runs the split-K decode kernel


def visible_mask(limits: torch.Tensor, kv_len: int, window: int | None = None) -> torch.Tensor:
    """[b, 1, n, kv_len] bool: query i of row r sees cache slot j iff j <= limits[r, i] (and, with a
    sliding window, j > limits[r, i] - window)."""
    slots = torch.arange(kv_len, device=limits.device)
    lim = limits[:, None, :, None]
    mask = slots <= lim
    return mask if window is None else mask & (slots > lim - window)


def attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, limits: torch.Tensor,
              kv_len: int, window: int | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped-query attention of q [b, nH, n, d] over a static cache layer [b, nKV, max_len, d], [b, n, nH * d];
    with an output `gate` of that shape (Qwen3.5), times sigmoid(gate).

    Query i of row r attends to slots j <= limits[r, i]. On CUDA a Triton split-K kernel reads exactly those
    slots and takes the limits from device memory (so the call can live in a CUDA graph): for up to 16 queries,
    or for any number under `KernelSettings.batch_invariant` (prefills too, so that a prompt's cache does not
    depend on what it is prefilled with). A call with as many queries as slots is a prompt from its start (row r's
    query i at slot i): on CUDA the Triton prompt kernel where the device's table has tiles for it, else SDPA's causal
    flash kernel. Other longer query blocks on CUDA, and any on the CPU, read the slots [0, kv_len) through SDPA with
    an explicit mask.
    """
    if fused_kernels_apply(q) and (q.shape[2] <= DECODE_QUERIES or current_settings().batch_invariant):
        from blockspec.kernels.attention import decode_attention

        return decode_attention(q, k_cache, v_cache, limits, window or 0, gate=gate)
    prompt = q.shape[2] == kv_len and (window is None or window >= kv_len)  # a prompt from its start
    # SDPA's flash kernel unless the device's table names a backend (cuDNN for groups of prompts on an H100; a lone
    # prompt's prefill waits on the host, where a cuDNN call costs more: design notes, "Prefill")
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    if prompt and fused_kernels_apply(q):
        from blockspec.kernels.attention import prompt_attention

        config = prompt_attention_config(q.device, q.shape[-1], kv_len, q.shape[0])
        if config is not None and "sdpa" in config:
            backends.insert(0, SDPA_BACKENDS[config["sdpa"]])
        elif config is not None:
            return prompt_attention(q, k_cache, v_cache, config, gate=gate)
    k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
    if q.is_cuda and prompt:
        # plain causal attention, KV heads shared in place (a mask takes a slower kernel, which needs them repeated)
        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    else:
        mask = visible_mask(limits, kv_len, window)
        if q.is_cuda:  # a prompt after a cached prefix, or past a sliding window: the masked kernel wants K/V per head
            repeat = q.shape[1] // k.shape[1]
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(repeat, dim=1),
                                                 v.repeat_interleave(repeat, dim=1), attn_mask=mask)
        else:  # the CPU's fused kernel takes the KV heads as they are: 3-5x the explicit matmul-softmax-matmul
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
                k, v = k.clone(), v.clone()  # what autograd keeps must not be the cache, which later writes change
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    b, h, n, d = out.shape
    out = out.transpose(1, 2).reshape(b, n, h * d)
    return out * torch.sigmoid(gate) if gate is not None else out
