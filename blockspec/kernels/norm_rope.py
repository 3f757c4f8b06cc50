"""The elementwise kernels of a layer: RMSNorm (alone, and fused with the residual add before it, which can also sum
the partials of a split-K GEMM's output), silu(gate) * up,
q/k RMSNorm + RoPE + the KV-cache store in one kernel, and RoPE's cos/sin tables. Each reproduces the rounding
points of the eager torch code it replaces (fp32 math, a cast to the activation dtype wherever eager
materialises a tensor), so the CUDA path stays numerically faithful.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blockspec.kernels.launch import pdl_options, pdl_prologue


@triton.jit
def _store_normed(OUT, row, so, x, r, W, cols, ok, ZERO_CENTRED: tl.constexpr):
    """Row `row` of OUT = the normed x * r times the weight, rounded as eager does: w * (x r cast), or zero-centred
    (Qwen3.5) x r (1 + w) in fp32, cast once."""
    if ZERO_CENTRED:
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(OUT + row * so + cols, (x * r * (1.0 + w)).to(OUT.dtype.element_ty), mask=ok)
    else:
        y = (x * r).to(OUT.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(OUT + row * so + cols, (w * y).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _rms_norm(X, W, OUT, sx, so, n, eps, BLOCK: tl.constexpr, ZERO_CENTRED: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(X + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    _store_normed(OUT, row, so, x, r, W, cols, ok, ZERO_CENTRED)


def _norm_dtype(x: torch.Tensor, weight: torch.Tensor, zero_centred: bool) -> torch.dtype:
    """What eager returns: x's dtype when zero-centred (cast after the weight), else x's and the weight's promoted."""
    return x.dtype if zero_centred else torch.promote_types(x.dtype, weight.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centred: bool = False) -> torch.Tensor:
    """RMSNorm of x's rows: weight * (x normed, cast), or with `zero_centred` (x normed * (1 + weight)) cast."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, device=x.device, dtype=_norm_dtype(x, weight, zero_centred))
    _rms_norm[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), n, eps,
                                BLOCK=triton.next_power_of_2(n), ZERO_CENTRED=zero_centred,
                                num_warps=4 if n >= 1024 else 1, **pdl_options(x))
    return out.view(*x.shape[:-1], n)


@triton.jit
def _silu_mul(G, U, OUT, sg, sgc, su, suc, so, n, BLOCK: tl.constexpr, PAIRS: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    if PAIRS:  # (gate j, up j) side by side, a fused gate_up's output: one contiguous load, split in registers
        both = tl.program_id(1) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
        pairs = tl.load(G + row * sg + both, mask=both < 2 * n, other=0.0).to(tl.float32)
        g, u = tl.split(tl.reshape(pairs, [BLOCK, 2]))
    else:  # strided loads of every other element keep the vector units idle: 1.3x the bytes' time at prefill
        g = tl.load(G + row * sg + cols * sgc, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(U + row * su + cols * suc, mask=ok, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + row * so + cols, (s * u).to(OUT.dtype.element_ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate and up [..., I] (any strides: the even and odd columns of a fused gate_up
    projection are fine)."""
    n = gate.shape[-1]
    g, u = gate.reshape(-1, n), up.reshape(-1, n)
    out = torch.empty(g.shape[0], n, device=gate.device, dtype=gate.dtype)
    block = 1024
    pairs = (g.stride() == u.stride() and g.stride(1) == 2
             and u.data_ptr() == g.data_ptr() + g.element_size())  # gate_up[..., 0::2] and gate_up[..., 1::2]
    _silu_mul[(g.shape[0], triton.cdiv(n, block))](g, u, out, g.stride(0), g.stride(1), u.stride(0), u.stride(1),
                                                    out.stride(0), n, BLOCK=block, PAIRS=pairs, **pdl_options(gate))
    return out.view(*gate.shape[:-1], n)


@triton.jit(do_not_specialize=["n_q"])
def _qkv_rope_store(Q_SRC, K_SRC, V_SRC, QN, KN, COS, SIN, POS, QOUT, KC, VC,
                    s_q, s_k, s_v, s_cos, s_qo_b, s_qo_h, s_qo_n, s_kc_b, s_kc_h, s_kc_l, s_vc_b, s_vc_h, s_vc_l,
                    n_q, n_heads, n_kv, eps, HAS_NORM: tl.constexpr, D: tl.constexpr, ZERO_CENTRED: tl.constexpr,
                    ROT: tl.constexpr, HEADS: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    t = tl.program_id(0)  # token (row b = t // n_q, query i = t % n_q)
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)[:, None]  # heads: q heads, then k heads, then v heads
    b = t // n_q
    i = t % n_q
    dims = tl.arange(0, D)[None, :]
    pos = tl.load(POS + t)
    is_q = h < n_heads
    is_k = (h >= n_heads) & (h < n_heads + n_kv)
    is_v = (h >= n_heads + n_kv) & (h < n_heads + 2 * n_kv)
    if ROT:  # partial RoPE (Qwen3.5): the first ROT dims rotate among themselves, the others pass through
        partner = tl.where(dims < ROT, (dims + ROT // 2) % ROT, dims)
    else:
        partner = (dims + D // 2) % D
    src = tl.where(is_q, Q_SRC + t * s_q + h * D, tl.where(is_k, K_SRC + t * s_k + (h - n_heads) * D,
                                                            V_SRC + t * s_v + (h - n_heads - n_kv) * D))
    used = is_q | is_k | is_v
    raw = tl.load(src + dims, mask=used, other=0.0)
    x = raw.to(tl.float32)
    xp = tl.load(src + partner, mask=used & ~is_v, other=0.0).to(tl.float32)
    if HAS_NORM:
        r = tl.rsqrt(tl.sum(x * x, axis=1)[:, None] / D + eps)
        w = tl.where(is_q, tl.load(QN + dims), tl.load(KN + dims)).to(tl.float32)
        wp = tl.where(is_q, tl.load(QN + partner), tl.load(KN + partner)).to(tl.float32)
        if ZERO_CENTRED:  # x r (1 + w) in fp32, cast once
            x = (x * r * (1.0 + w)).to(KC.dtype.element_ty).to(tl.float32)
            xp = (xp * r * (1.0 + wp)).to(KC.dtype.element_ty).to(tl.float32)
        else:
            x = (w * (x * r).to(KC.dtype.element_ty).to(tl.float32)).to(KC.dtype.element_ty).to(tl.float32)
            xp = (wp * (xp * r).to(KC.dtype.element_ty).to(tl.float32)).to(KC.dtype.element_ty).to(tl.float32)
    if ROT:  # cos 1 and sin 0 past the rotary dims: x * 1 + anything * 0 is x
        rotated = tl.where(dims < ROT // 2, -xp, xp)
        cos = tl.load(COS + t * s_cos + dims, mask=dims < ROT, other=1.0).to(tl.float32)
        sin = tl.load(SIN + t * s_cos + dims, mask=dims < ROT, other=0.0).to(tl.float32)
    else:
        rotated = tl.where(dims < D // 2, -xp, xp)
        cos = tl.load(COS + t * s_cos + dims).to(tl.float32)
        sin = tl.load(SIN + t * s_cos + dims).to(tl.float32)
    a = (x * cos).to(KC.dtype.element_ty).to(tl.float32)
    c = (rotated * sin).to(KC.dtype.element_ty).to(tl.float32)
    y = (a + c).to(KC.dtype.element_ty)
    tl.store(QOUT + b * s_qo_b + h * s_qo_h + i * s_qo_n + dims, y, mask=is_q)
    tl.store(KC + b * s_kc_b + (h - n_heads) * s_kc_h + pos * s_kc_l + dims, y, mask=is_k)
    tl.store(VC + b * s_vc_b + (h - n_heads - n_kv) * s_vc_h + pos * s_vc_l + dims, raw, mask=is_v)


def qkv_rope_store(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, n_heads: int, n_kv: int,
                   head_dim: int, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, zero_centred: bool = False) -> torch.Tensor | None:
    """Projections q [b, n, nH*d] (or None: context only), k and v [b, n, nKV*d], each with unit stride on
    the last axis (views into one fused projection are fine): q/k RMSNorm (optional; `zero_centred`: x̂ (1 + w)),
    RoPE (on the first cos.shape[-1] dims of each head: partial where that is less than d), K and V stored into the
    cache layer at `positions`; returns q as [b, nH, n, d]. A program takes a token's heads by groups of up to
    1024 values (one head a program left most of a verify's programs waiting for a free slot on the SMs)."""
    b, n, _ = k.shape
    heads = n_heads if q is not None else 0
    rows = [x.reshape(b * n, -1) if x is not None else None for x in (q, k, v)]
    rotary = cos.shape[-1]
    cos = cos.reshape(b * n, rotary)
    sin = sin.reshape(b * n, rotary)
    # q in [b, n, heads, d] memory, returned as a [b, heads, n, d] view: SDPA writes its output in q's memory order,
    # which is then the [b, n, heads * d] that o_proj reads, without a copy per layer
    q_out = torch.empty(b, n, heads, head_dim, device=k.device, dtype=k.dtype).transpose(1, 2)
    q_rows = rows[0] if rows[0] is not None else rows[1]
    norm = q_norm is not None
    group = min(triton.next_power_of_2(heads + 2 * n_kv), max(1, 1024 // head_dim))
    _qkv_rope_store[(b * n, triton.cdiv(heads + 2 * n_kv, group))](
        q_rows, rows[1], rows[2], q_norm if norm else k_norm if k_norm is not None else rows[1],
        k_norm if k_norm is not None else rows[1], cos, sin, positions.reshape(-1), q_out, k_cache, v_cache,
        q_rows.stride(0), rows[1].stride(0), rows[2].stride(0), cos.stride(0),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), n, heads, n_kv, eps,
        HAS_NORM=k_norm is not None, D=head_dim, ZERO_CENTRED=zero_centred, ROT=rotary if rotary < head_dim else 0,
        HEADS=group, num_warps=4 if group * head_dim >= 1024 else 2, **pdl_options(k))
    return q_out if q is not None else None


@triton.jit
def _add_rms_norm(X, DELTA, BIAS, W, SUM, OUT, sx, sd, sd_split, ss, so, n, splits, eps, BLOCK: tl.constexpr,
                  PARTIALS: tl.constexpr, HAS_BIAS: tl.constexpr, ZERO_CENTRED: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(X + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
    d = tl.load(DELTA + row * sd + cols, mask=ok, other=0.0).to(tl.float32)
    if PARTIALS:  # a split-K GEMM's fp32 partial sums: summed and rounded as skinny's _sum_splits writes its output
        for split in range(1, splits):
            d += tl.load(DELTA + split * sd_split + row * sd + cols, mask=ok, other=0.0)
        if HAS_BIAS:
            d += tl.load(BIAS + cols, mask=ok, other=0.0).to(tl.float32)
        d = d.to(X.dtype.element_ty).to(tl.float32)
    s = (x + d).to(SUM.dtype.element_ty)
    tl.store(SUM + row * ss + cols, s, mask=ok)
    s32 = s.to(tl.float32)
    r = tl.rsqrt(tl.sum(s32 * s32, axis=0) / n + eps)
    _store_normed(OUT, row, so, s32, r, W, cols, ok, ZERO_CENTRED)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 zero_centred: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)) in one pass."""
    n = x.shape[-1]
    return _add_rms_norm_launch(x, delta.reshape(1, -1, n), None, weight, eps, zero_centred, partials=False)


def add_partials_rms_norm(x: torch.Tensor, partials: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor,
                          eps: float, zero_centred: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm(x, delta, ...) where delta is what skinny_linear makes of a split-K GEMM's fp32 partial sums
    `partials` [splits, rows, n] and `bias` (summed in split order, rounded to x's dtype): the same bits, without
    the launch that sums them."""
    return _add_rms_norm_launch(x, partials, bias, weight, eps, zero_centred, partials=True)


def _add_rms_norm_launch(x: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor,
                         eps: float, zero_centred: bool, partials: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    xr = x.reshape(-1, n)
    assert delta.shape == (delta.shape[0], *xr.shape) and (not partials or delta.is_contiguous())
    total = torch.empty(xr.shape, device=x.device, dtype=x.dtype)
    out = torch.empty(xr.shape, device=x.device, dtype=_norm_dtype(x, weight, zero_centred))
    _add_rms_norm[(xr.shape[0],)](xr, delta, bias if bias is not None else delta, weight, total, out, xr.stride(0),
                                  delta.stride(1), delta.stride(0), total.stride(0), out.stride(0), n, delta.shape[0],
                                  eps, BLOCK=triton.next_power_of_2(n), PARTIALS=partials, HAS_BIAS=bias is not None,
                                  ZERO_CENTRED=zero_centred, num_warps=4 if n >= 1024 else 1, **pdl_options(x))
    return total.view(x.shape), out.view(x.shape)


@triton.jit
def _rope_tables(POS, INV_FREQ, COS, SIN, scaling, half, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    t = tl.program_id(0)
    j = tl.arange(0, BLOCK)
    ok = j < 2 * half
    freq = tl.load(POS + t).to(tl.float32) * tl.load(INV_FREQ + j % half, mask=ok, other=0.0)
    # libdevice's accurate cosf / sinf: what torch's elementwise cos / sin compute (not the fast approximations)
    cos = tl.extra.cuda.libdevice.cos(freq) * scaling
    sin = tl.extra.cuda.libdevice.sin(freq) * scaling
    tl.store(COS + t * 2 * half + j, cos.to(COS.dtype.element_ty), mask=ok)
    tl.store(SIN + t * 2 * half + j, sin.to(SIN.dtype.element_ty), mask=ok)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., d] for `positions` [...] (d = 2 * len(inv_freq)), as layers.RotaryEmbedding computes them:
    the angle in fp32, cos/sin in fp32, times `scaling`, rounded to `dtype`; one kernel."""
    half = inv_freq.shape[0]
    flat = positions.reshape(-1)
    cos = torch.empty(flat.shape[0], 2 * half, device=positions.device, dtype=dtype)
    sin = torch.empty_like(cos)
    _rope_tables[(flat.shape[0],)](flat, inv_freq, cos, sin, scaling, half, BLOCK=triton.next_power_of_2(2 * half),
                                   num_warps=1, **pdl_options(positions))
    return cos.view(*positions.shape, 2 * half), sin.view(*positions.shape, 2 * half)
