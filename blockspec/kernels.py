"""Triton kernels for the CUDA path (imported only when a CUDA tensor needs them).

`decode_attention`: attention of a few query tokens (a verify block, a draft block or one AR token) over a
static KV cache, flash-decoding style. Each program owns one (row, KV head, key split) and serves all the
query heads of its GQA group and all query tokens at once, so every cached K/V byte is read exactly once.
The visible length comes from device memory (`limits`), never from the host, which is what lets a whole
speculative step live in one CUDA graph. The keys are cut into a fixed number of splits of the *visible*
length, so every split has work at any context and the result does not depend on the cache's allocated
size (the eager and graphed paths give bit-identical outputs).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Programmatic dependent launch (Hopper and later): every kernel here may be scheduled while the kernel before
# it is still finishing; it waits (griddepcontrol.wait) for that kernel's writes before touching memory, then
# lets the next one start launching. Launch latency and ramp-up then overlap the previous kernel's tail, the
# cost that ~440 small launches a speculative step pay. Measured on the H100 (`benchmarks/engine_limit.py
# --ab`, docs/benchmarks.md): AR and speculative steps 0.998-1.070x, median 1.032x over seven runs, tokens
# unchanged. On by default; BLOCKSPEC_PDL=0 turns it off.
PDL = os.environ.get("BLOCKSPEC_PDL", "1") != "0"
# With PDL, a skinny GEMM's programs are resident while the kernel before them still runs; they ask L2 for
# their first PREFETCH_TILES weight tiles (one prefetch per 128-byte line) before waiting on it, so the weight
# stream starts during that kernel: 1.4-3.1% on top of PDL on the H100 (1 and 2 tiles alike, 4 less; 0: off;
# `benchmarks/engine_limit.py --ab`, docs/benchmarks.md).
PREFETCH_TILES = int(os.environ.get("BLOCKSPEC_PREFETCH_TILES", "2"))


# RoPE's cos/sin tables for a pass's positions in one kernel instead of the ~9 small torch kernels of
# layers.RotaryEmbedding (a verify pass, a draft pass and an AR token each build theirs); BLOCKSPEC_FUSED_ROPE=0
# keeps the torch ops (the `--ab` comparison).
FUSED_ROPE_TABLES = os.environ.get("BLOCKSPEC_FUSED_ROPE", "1") != "0"


@functools.lru_cache(maxsize=None)
def _supports_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Launch with programmatic dependent launch: enabled (`PDL`) and a CUDA device that has it."""
    return PDL and t.is_cuda and _supports_pdl(t.device.index if t.device.index is not None else 0)


def pdl_options(t: torch.Tensor) -> dict:
    """The launch options of a kernel here for tensors on t's device: the kernel's USE_PDL and Triton's."""
    on = use_pdl(t)
    return {"USE_PDL": on, "launch_pdl": on}


@triton.jit
def _pdl_prologue(USE_PDL: tl.constexpr):
    """Every kernel's first statement (after a skinny GEMM's weight prefetch): the previous kernel's writes
    first, then the next may start launching."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

# Launch settings per query count (n <= 4: AR-like, else a block): key splits per (row, KV head), keys per
# tile, warps. "wide" is the best of 16 settings timed inside graphed DFlash steps on the H100 (`engine_limit.py
# --sweep-attention`, engine_limit-20261123-050943.json): 16 splits of 32-key tiles put 128 programs on the
# cache where 8 splits used 64, so a step at context 4096 took 4.92 ms instead of 5.12; at 512, 4.63 vs 4.65.
ATTENTION_CONFIG = {"narrow": {"splits": 16, "block_n": 64, "num_warps": 4},
                    "wide": {"splits": 16, "block_n": 32, "num_warps": 4}}


# lengths and counts vary per call: specialising on them would recompile for new prompt lengths
@triton.jit(do_not_specialize=["n_q", "window"])
def _attention_splits(Q, K, V, LIM, ACC, ML,
                      sq_b, sq_h, sq_n, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, slim_b, slim_n,
                      sa_b, sa_h, sa_s, sa_n, sm_b, sm_h, sm_s, sm_n,
                      n_q, n_kv_heads, n_splits, window, scale,
                      GROUP: tl.constexpr, NQ: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    _pdl_prologue(USE_PDL)
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // n_kv_heads
    kvh = pid_bh % n_kv_heads
    rows = tl.arange(0, ROWS)
    g = rows // NQ  # query head within the GQA group
    i = rows % NQ  # query token
    valid = (g < GROUP) & (i < n_q)
    head = kvh * GROUP + g
    dims = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + head[:, None] * sq_h + i[:, None] * sq_n + dims[None, :],
                mask=valid[:, None], other=0.0)
    lim = tl.load(LIM + b * slim_b + i * slim_n, mask=valid, other=-1).to(tl.int32)
    total = tl.max(lim, axis=0) + 1
    chunk = tl.cdiv(tl.cdiv(total, n_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, total)
    if window > 0:
        lo = tl.maximum(lo, (tl.min(tl.where(valid, lim, 2147483647), axis=0) - window + 1) // BLOCK_N * BLOCK_N)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
    k_base = K + b * sk_b + kvh * sk_h
    v_base = V + b * sv_b + kvh * sv_h
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        in_range = keys < hi
        k = tl.load(k_base + keys[:, None] * sk_l + dims[None, :], mask=in_range[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = (keys[None, :] <= lim[:, None]) & in_range[None, :]
        if window > 0:
            visible = visible & (keys[None, :] > lim[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * sv_l + dims[None, :], mask=in_range[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = b * sa_b + head[:, None] * sa_h + split * sa_s + i[:, None] * sa_n + dims[None, :]
    tl.store(ACC + out, acc, mask=valid[:, None])
    ml = ML + b * sm_b + head * sm_h + split * sm_s + i * sm_n
    tl.store(ml, m_i, mask=valid)
    tl.store(ml + 1, l_i, mask=valid)


@triton.jit(do_not_specialize=["n_q"])
def _combine_splits(ACC, ML, OUT, sa_b, sa_h, sa_s, sa_n, sm_b, sm_h, sm_s, sm_n, so_b, so_n, so_h,
                    n_q, n_heads, n_splits, SPLITS: tl.constexpr, D: tl.constexpr, USE_PDL: tl.constexpr):
    _pdl_prologue(USE_PDL)
    pid = tl.program_id(0)
    i = pid % n_q
    h = (pid // n_q) % n_heads
    b = pid // (n_q * n_heads)
    s = tl.arange(0, SPLITS)
    ok = s < n_splits
    ml = ML + b * sm_b + h * sm_h + s * sm_s + i * sm_n
    m = tl.load(ml, mask=ok, other=float("-inf"))
    denom = tl.load(ml + 1, mask=ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
    dims = tl.arange(0, D)
    acc = tl.load(ACC + b * sa_b + h * sa_h + s[:, None] * sa_s + i * sa_n + dims[None, :],
                  mask=ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(denom * w, axis=0)
    tl.store(OUT + b * so_b + i * so_n + h * so_h + dims, out.to(OUT.dtype.element_ty))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, limits: torch.Tensor,
                     window: int = 0, config: dict | None = None) -> torch.Tensor:
    """q [b, nH, n, d] over caches [b, nKV, L, d]; query i of row r sees slots j <= limits[r, i]
    (and j > limits - window when window > 0). Returns [b, n, nH*d] in q's dtype."""
    b, n_heads, n_q, d = q.shape
    n_kv = k_cache.shape[1]
    group = n_heads // n_kv
    nq_pow2 = triton.next_power_of_2(n_q)
    rows = max(16, triton.next_power_of_2(group * nq_pow2))
    config = config or ATTENTION_CONFIG["narrow" if n_q <= 4 else "wide"]
    splits = config["splits"]
    if q.stride(-1) != 1:
        q = q.contiguous()
    pdl = pdl_options(q)
    acc = torch.empty(b, n_heads, splits, n_q, d, device=q.device, dtype=torch.float32)
    ml = torch.empty(b, n_heads, splits, n_q, 2, device=q.device, dtype=torch.float32)
    _attention_splits[(b * n_kv, splits)](
        q, k_cache, v_cache, limits, acc, ml,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), limits.stride(0), limits.stride(1),
        acc.stride(0), acc.stride(1), acc.stride(2), acc.stride(3),
        ml.stride(0), ml.stride(1), ml.stride(2), ml.stride(3),
        n_q, n_kv, splits, window, d ** -0.5,
        GROUP=group, NQ=nq_pow2, ROWS=rows, D=d, BLOCK_N=config["block_n"],
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=config["num_warps"], **pdl)
    out = torch.empty(b, n_q, n_heads, d, device=q.device, dtype=q.dtype)
    _combine_splits[(b * n_heads * n_q,)](
        acc, ml, out, acc.stride(0), acc.stride(1), acc.stride(2), acc.stride(3),
        ml.stride(0), ml.stride(1), ml.stride(2), ml.stride(3), out.stride(0), out.stride(1), out.stride(2),
        n_q, n_heads, splits, SPLITS=triton.next_power_of_2(splits), D=d, num_warps=1, **pdl)
    return out.view(b, n_q, n_heads * d)


# ---- fused elementwise kernels ------------------------------------------------------------------------------
# Each reproduces the rounding points of the eager torch code it replaces (fp32 math, a cast to the
# activation dtype wherever eager materialises a tensor), so the CUDA path stays numerically faithful.


@triton.jit
def _rms_norm(X, W, OUT, sx, so, n, eps, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    _pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(X + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
    y = (x * r).to(OUT.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * so + cols, (w * y).to(OUT.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    _rms_norm[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), n, eps,
                                BLOCK=triton.next_power_of_2(n), num_warps=4 if n >= 1024 else 1, **pdl_options(x))
    return out.view(*x.shape[:-1], n)


@triton.jit
def _silu_mul(G, U, OUT, sg, sgc, su, suc, so, n, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    _pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
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
    _silu_mul[(g.shape[0], triton.cdiv(n, block))](g, u, out, g.stride(0), g.stride(1), u.stride(0), u.stride(1),
                                                    out.stride(0), n, BLOCK=block, **pdl_options(gate))
    return out.view(*gate.shape[:-1], n)


@triton.jit(do_not_specialize=["n_q"])
def _qkv_rope_store(Q_SRC, K_SRC, V_SRC, QN, KN, COS, SIN, POS, QOUT, KC, VC,
                    s_q, s_k, s_v, s_cos, s_qo_b, s_qo_h, s_qo_n, s_kc_b, s_kc_h, s_kc_l, s_vc_b, s_vc_h, s_vc_l,
                    n_q, n_heads, n_kv, eps, HAS_NORM: tl.constexpr, D: tl.constexpr, USE_PDL: tl.constexpr):
    _pdl_prologue(USE_PDL)
    t = tl.program_id(0)  # token (row b = t // n_q, query i = t % n_q)
    h = tl.program_id(1)  # head among q heads, then k heads, then v heads
    b = t // n_q
    i = t % n_q
    dims = tl.arange(0, D)
    pos = tl.load(POS + t)
    if h < n_heads + n_kv:
        if h < n_heads:
            src = Q_SRC + t * s_q + h * D
            w_ptr = QN
        else:
            src = K_SRC + t * s_k + (h - n_heads) * D
            w_ptr = KN
        partner = (dims + D // 2) % D
        x = tl.load(src + dims).to(tl.float32)
        xp = tl.load(src + partner).to(tl.float32)
        if HAS_NORM:
            r = tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)
            x = (tl.load(w_ptr + dims).to(tl.float32)
                 * (x * r).to(KC.dtype.element_ty).to(tl.float32)).to(KC.dtype.element_ty).to(tl.float32)
            xp = (tl.load(w_ptr + partner).to(tl.float32)
                  * (xp * r).to(KC.dtype.element_ty).to(tl.float32)).to(KC.dtype.element_ty).to(tl.float32)
        rotated = tl.where(dims < D // 2, -xp, xp)
        cos = tl.load(COS + t * s_cos + dims).to(tl.float32)
        sin = tl.load(SIN + t * s_cos + dims).to(tl.float32)
        a = (x * cos).to(KC.dtype.element_ty).to(tl.float32)
        c = (rotated * sin).to(KC.dtype.element_ty).to(tl.float32)
        y = (a + c).to(KC.dtype.element_ty)
        if h < n_heads:
            tl.store(QOUT + b * s_qo_b + h * s_qo_h + i * s_qo_n + dims, y)
        else:
            tl.store(KC + b * s_kc_b + (h - n_heads) * s_kc_h + pos * s_kc_l + dims, y)
    else:
        v = tl.load(V_SRC + t * s_v + (h - n_heads - n_kv) * D + dims)
        tl.store(VC + b * s_vc_b + (h - n_heads - n_kv) * s_vc_h + pos * s_vc_l + dims, v)


def qkv_rope_store(q: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor, n_heads: int, n_kv: int,
                   head_dim: int, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor) -> torch.Tensor | None:
    """Projections q [b, n, nH*d] (or None: context only), k and v [b, n, nKV*d], each with unit stride on
    the last axis (views into one fused projection are fine): q/k RMSNorm (optional), RoPE, K and V stored
    into the cache layer at `positions`; returns q as [b, nH, n, d]."""
    b, n, _ = k.shape
    heads = n_heads if q is not None else 0
    rows = [x.reshape(b * n, -1) if x is not None else None for x in (q, k, v)]
    cos = cos.reshape(b * n, head_dim)
    sin = sin.reshape(b * n, head_dim)
    q_out = torch.empty(b, heads, n, head_dim, device=k.device, dtype=k.dtype)
    q_rows = rows[0] if rows[0] is not None else rows[1]
    norm = q_norm is not None
    _qkv_rope_store[(b * n, heads + 2 * n_kv)](
        q_rows, rows[1], rows[2], q_norm if norm else k_norm if k_norm is not None else rows[1],
        k_norm if k_norm is not None else rows[1], cos, sin, positions.reshape(-1), q_out, k_cache, v_cache,
        q_rows.stride(0), rows[1].stride(0), rows[2].stride(0), cos.stride(0),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), n, heads, n_kv, eps,
        HAS_NORM=k_norm is not None, D=head_dim, num_warps=1, **pdl_options(k))
    return q_out if q is not None else None


@triton.jit
def _add_rms_norm(X, DELTA, W, SUM, OUT, sx, sd, ss, so, n, eps, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    _pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(X + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
    d = tl.load(DELTA + row * sd + cols, mask=ok, other=0.0).to(tl.float32)
    s = (x + d).to(SUM.dtype.element_ty)
    tl.store(SUM + row * ss + cols, s, mask=ok)
    s32 = s.to(tl.float32)
    r = tl.rsqrt(tl.sum(s32 * s32, axis=0) / n + eps)
    y = (s32 * r).to(OUT.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * so + cols, (w * y).to(OUT.dtype.element_ty), mask=ok)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)) in one pass."""
    n = x.shape[-1]
    xr, dr = x.reshape(-1, n), delta.reshape(-1, n)
    total = torch.empty(xr.shape, device=x.device, dtype=x.dtype)
    out = torch.empty(xr.shape, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    _add_rms_norm[(xr.shape[0],)](xr, dr, weight, total, out, xr.stride(0), dr.stride(0), total.stride(0),
                                  out.stride(0), n, eps, BLOCK=triton.next_power_of_2(n),
                                  num_warps=4 if n >= 1024 else 1, **pdl_options(x))
    return total.view(x.shape), out.view(x.shape)


@triton.jit
def _rope_tables(POS, INV_FREQ, COS, SIN, scaling, half, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    _pdl_prologue(USE_PDL)
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


# ---- skinny GEMMs ----------------------------------------------------------------------------------------
# A decode-time projection multiplies a few rows (1 token, or a 16-token block) by a large weight [N, K]: the
# cost is streaming the weight once. Each program owns BLOCK_N output features and one K range and reads that
# slab of the weight as row-contiguous [BLOCK_N, BLOCK_K] tiles. Split-K partials go to an fp32 buffer that a
# second kernel sums in split order: never atomics, so results are bit-identical run to run (the engine
# checks CUDA-graph replays against eager steps).

# Launch settings per weight shape (N, K), then per row bucket (1: one token; 16: 2..16 rows). rows = 16 is a
# tensor-core dot with the rows padded to 16 (its weight tiles pipelined through shared memory), rows = 1 a
# multiply-and-sum on the CUDA cores for a single row; split_k is the number of K ranges. None: cuBLAS is
# faster for that shape, and `layers.linear` keeps F.linear. Filled from measurements only: paste the table
# that `benchmarks/gemm_shapes.py --skinny` prints (this one: H100, 2026-11-22, docs/benchmarks.md); shapes
# not listed stay on cuBLAS (a direct skinny_linear call without a config takes default_skinny_config).
SKINNY_CONFIG: dict[tuple[int, int], dict[int, dict | None]] = {
    (6144, 2560): {  # qkv
        1: {'rows': 16, 'block_n': 64, 'block_k': 256, 'split_k': 1, 'num_warps': 4, 'num_stages': 3},
        16: {'rows': 16, 'block_n': 64, 'block_k': 256, 'split_k': 1, 'num_warps': 4, 'num_stages': 4},
    },
    (2560, 4096): {  # o_proj
        1: {'rows': 16, 'block_n': 64, 'block_k': 256, 'split_k': 1, 'num_warps': 4, 'num_stages': 4},
        16: {'rows': 16, 'block_n': 64, 'block_k': 256, 'split_k': 1, 'num_warps': 4, 'num_stages': 4},
    },
    (19456, 2560): {  # gate_up
        1: {'rows': 16, 'block_n': 32, 'block_k': 128, 'split_k': 1, 'num_warps': 4, 'num_stages': 4},
        16: {'rows': 16, 'block_n': 32, 'block_k': 256, 'split_k': 1, 'num_warps': 4, 'num_stages': 4},
    },
    (2560, 9728): {  # down
        1: {'rows': 16, 'block_n': 64, 'block_k': 128, 'split_k': 4, 'num_warps': 4, 'num_stages': 4},
        16: {'rows': 16, 'block_n': 64, 'block_k': 128, 'split_k': 4, 'num_warps': 4, 'num_stages': 4},
    },
    (9728, 2560): {  # draft_gate
        1: {'rows': 16, 'block_n': 64, 'block_k': 128, 'split_k': 1, 'num_warps': 4, 'num_stages': 4},
        16: {'rows': 16, 'block_n': 64, 'block_k': 128, 'split_k': 1, 'num_warps': 4, 'num_stages': 4},
    },
    (2048, 2560): {  # ctx_kv
        1: None,
        16: None,
    },
    (2560, 12800): {  # fc
        1: {'rows': 16, 'block_n': 64, 'block_k': 256, 'split_k': 2, 'num_warps': 4, 'num_stages': 4},
        16: {'rows': 16, 'block_n': 64, 'block_k': 256, 'split_k': 2, 'num_warps': 4, 'num_stages': 4},
    },
    (151936, 2560): {  # lm_head: 250 vs cuBLAS's 272 us alone, steps 1.007-1.009x (engine_limit-20261122-204305)
        1: {'rows': 16, 'block_n': 64, 'block_k': 256, 'split_k': 1, 'num_warps': 4, 'num_stages': 4},
        16: {'rows': 16, 'block_n': 64, 'block_k': 256, 'split_k': 1, 'num_warps': 4, 'num_stages': 4},
    },
}
SKINNY_ROWS = 16  # the most rows skinny_linear takes (one verify block)
FILL_PROGRAMS = 264  # the default split-K aims for this many programs: two per SM of an H100 (132 SMs)


def default_skinny_config(n: int, k: int) -> dict:
    """Settings for a shape the table does not list: split K until the grid fills the GPU, keeping at least
    two tiles per K range (shorter loops leave the load pipeline no time to fill)."""
    block_n, block_k = 64, 128
    blocks_n, blocks_k = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    split = 1
    while blocks_n * split < FILL_PROGRAMS and blocks_k >= 4 * split:
        split *= 2
    return {"rows": 16, "block_n": block_n, "block_k": block_k, "split_k": split, "num_warps": 4, "num_stages": 4}


def skinny_config(n: int, k: int, m: int) -> dict | None:
    """The table's settings for an [m, k] x [n, k]^T product; None (use cuBLAS) when the table says so or
    does not list the shape: the kernel runs only where a measurement showed it faster."""
    table = SKINNY_CONFIG.get((n, k))
    return table[1 if m == 1 else SKINNY_ROWS] if table is not None else None


# m varies per call (1..16 rows share a binary); specialising on it would also compile m == 1 apart
@triton.jit(do_not_specialize=["m"])
def _skinny_linear(X, W, BIAS, OUT, IDX, m, n, k, k_split, sx, sw, so_split, so_m,
                   ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, PREFETCH: tl.constexpr, ARGMAX: tl.constexpr,
                   USE_PDL: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    rows = tl.arange(0, ROWS)
    lo = split * k_split
    hi = tl.minimum(lo + k_split, k)
    if PREFETCH > 0:  # weights never depend on the kernel before: start their stream before waiting on it
        line: tl.constexpr = 1024 // W.dtype.element_ty.primitive_bitwidth  # elements per 128-byte line
        offs = tl.arange(0, PREFETCH * BLOCK_K // line) * line
        ok = (cols[:, None] < n) & (offs[None, :] < hi - lo)
        first = W + cols[:, None].to(tl.int64) * sw + lo + offs[None, :]
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l",
                                  [tl.where(ok, first, W).to(tl.int64)], dtype=tl.int32, is_pure=False, pack=1)
    _pdl_prologue(USE_PDL)
    ks = lo + tl.arange(0, BLOCK_K)
    col_ok = cols[:, None] < n
    w_ptrs = W + cols[:, None].to(tl.int64) * sw + ks[None, :]
    x_ptrs = X + rows[:, None] * sx + ks[None, :]
    # EVEN_K (K a multiple of BLOCK_K, so every range holds whole tiles): no K mask, which keeps the weight
    # loads 16-byte vectors
    if ROWS == 1:  # one row: multiply-and-sum, reduced across K once after the loop
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for start in range(lo, hi, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs, mask=col_ok, other=0.0)
                x = tl.load(x_ptrs)
            else:
                k_ok = ks[None, :] + (start - lo) < hi
                w = tl.load(w_ptrs, mask=col_ok & k_ok, other=0.0)
                x = tl.load(x_ptrs, mask=k_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        out = tl.sum(acc, axis=1)[:, None]
    else:  # W tile [BLOCK_N, BLOCK_K] times x^T [BLOCK_K, ROWS]: the weight is the dot's wide operand
        out = tl.zeros([BLOCK_N, ROWS], tl.float32)
        row_ok = rows[:, None] < m
        for start in range(lo, hi, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs, mask=col_ok, other=0.0)
                x = tl.load(x_ptrs, mask=row_ok, other=0.0)
            else:
                k_ok = ks[None, :] + (start - lo) < hi
                w = tl.load(w_ptrs, mask=col_ok & k_ok, other=0.0)
                x = tl.load(x_ptrs, mask=row_ok & k_ok, other=0.0)
            out = tl.dot(w, tl.trans(x), out, input_precision=PRECISION)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
    if HAS_BIAS:
        out += tl.load(BIAS + cols, mask=cols < n, other=0.0).to(tl.float32)[:, None]
    if ARGMAX:  # per row, this column block's largest output as rounded to x's dtype, and its first column
        values = tl.where(col_ok, out.to(X.dtype.element_ty).to(tl.float32), float("-inf"))
        first = tl.program_id(0) * BLOCK_N + tl.argmax(values, axis=0, tie_break_left=True)
        slot = tl.program_id(0) * so_split + rows
        tl.store(OUT + slot, tl.max(values, axis=0), mask=rows < m)
        tl.store(IDX + slot, first, mask=rows < m)
    else:
        tl.store(OUT + split * so_split + rows[None, :] * so_m + cols[:, None], out.to(OUT.dtype.element_ty),
                 mask=col_ok & (rows[None, :] < m))


@triton.jit
def _sum_splits(PART, BIAS, OUT, total, n, splits, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
                USE_PDL: tl.constexpr):
    _pdl_prologue(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.load(PART + offs, mask=ok, other=0.0)
    for s in range(1, splits):  # fixed order: deterministic
        acc += tl.load(PART + s * total + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs % n, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _argmax_blocks(VALUES, IDX, OUT, blocks, m, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """Row r's column blocks' maxima reduced: the first block holding the largest value gives its first column."""
    _pdl_prologue(USE_PDL)
    row = tl.program_id(0)
    b = tl.arange(0, BLOCK)
    ok = b < blocks
    values = tl.load(VALUES + b * m + row, mask=ok, other=float("-inf"))
    cols = tl.load(IDX + b * m + row, mask=ok, other=0)
    best = tl.argmax(values, axis=0, tie_break_left=True)
    tl.store(OUT + row, tl.sum(tl.where(b == best, cols, 0), axis=0).to(tl.int64))


def skinny_argmax(x: torch.Tensor, weight: torch.Tensor, config: dict) -> torch.Tensor:
    """argmax over the columns of x [m, k] @ weight [n, k]^T per row, as torch's argmax of the logits
    `skinny_linear` would write (the same rounding to x's dtype, the first column on ties), without writing them:
    each GEMM program keeps its column block's maximum per row, and a second kernel reduces those. [m] int64.
    For a greedy step's lm_head; `config` must not split K."""
    m, k = x.shape
    n = weight.shape[0]
    assert 0 < m <= config["rows"] and config["split_k"] == 1 and weight.shape[1] == k and weight.stride(1) == 1
    if x.stride(1) != 1:
        x = x.contiguous()
    blocks = triton.cdiv(n, config["block_n"])
    values = torch.empty(blocks, m, device=x.device, dtype=torch.float32)
    cols = torch.empty(blocks, m, device=x.device, dtype=torch.int32)
    pdl = pdl_options(x)
    _skinny_linear[(blocks, 1)](
        x, weight, weight, values, cols, m, n, k, triton.cdiv(k, config["block_k"]) * config["block_k"], x.stride(0),
        weight.stride(0), values.stride(0), 0, ROWS=config["rows"], BLOCK_N=config["block_n"],
        BLOCK_K=config["block_k"], EVEN_K=k % config["block_k"] == 0, HAS_BIAS=False,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", PREFETCH=PREFETCH_TILES if pdl["launch_pdl"] else 0,
        ARGMAX=True, num_warps=config["num_warps"], num_stages=config["num_stages"], **pdl)
    out = torch.empty(m, device=x.device, dtype=torch.long)
    _argmax_blocks[(m,)](values, cols, out, blocks, m, BLOCK=triton.next_power_of_2(blocks), num_warps=4, **pdl)
    return out


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """F.linear for x [m, k] with m <= 16 rows: weight [n, k] (unit stride on k), optional bias [n]; returns
    [m, n] in x's dtype, accumulated in fp32. `config` defaults to the table (or the default where the
    table prefers cuBLAS)."""
    m, k = x.shape
    n = weight.shape[0]
    assert 0 < m <= SKINNY_ROWS and weight.shape[1] == k and weight.stride(1) == 1
    config = config or skinny_config(n, k, m) or default_skinny_config(n, k)
    rows, block_n, block_k = config["rows"], config["block_n"], config["block_k"]
    assert m <= rows, "rows = 1 settings serve one row only"
    if x.stride(1) != 1:
        x = x.contiguous()
    split = config["split_k"]
    k_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k  # whole tiles per K range
    split = triton.cdiv(k, k_split)  # no empty trailing ranges
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    part = out if split == 1 else torch.empty(split, m, n, device=x.device, dtype=torch.float32)
    pdl = pdl_options(x)
    _skinny_linear[(triton.cdiv(n, block_n), split)](
        x, weight, bias if bias is not None else weight, part, part, m, n, k, k_split, x.stride(0), weight.stride(0),
        part.stride(0) if split > 1 else 0, part.stride(-2),
        ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0,
        HAS_BIAS=bias is not None and split == 1, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        PREFETCH=PREFETCH_TILES if pdl["launch_pdl"] else 0, ARGMAX=False, num_warps=config["num_warps"],
        num_stages=config["num_stages"], **pdl)
    if split > 1:
        block = 1024
        _sum_splits[(triton.cdiv(m * n, block),)](part, bias if bias is not None else part, out, m * n, n, split,
                                                  HAS_BIAS=bias is not None, BLOCK=block, num_warps=4, **pdl)
    return out
