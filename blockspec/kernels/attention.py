"""Decode attention: a few query tokens (a verify block, a draft block or one AR token) over a static KV cache,
flash-decoding style. Each program owns one (row, KV head, key split) and serves all the query heads of its GQA
group and all query tokens at once, so every cached K/V byte is read exactly once. The visible length comes from
device memory (`limits`), never from the host, which is what lets a whole speculative step live in one CUDA
graph. The keys are cut into a fixed number of splits of the *visible* length, so every split has work at any
context and the result does not depend on the cache's allocated size (the eager and graphed paths give
bit-identical outputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blockspec.kernels.launch import _pdl_prologue, pdl_options
from blockspec.kernels.settings import current_settings, device_tables


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


def attention_config(n_q: int, device: torch.device, head_dim: int = 128) -> dict:
    """The launch settings for n_q queries (up to 4: "narrow", AR-like; more: "wide", a block): key splits per
    (row, KV head), keys per tile, warps; from the current settings' table, else the device's. A table may give a
    head dim its own ("wide_d256")."""
    table = current_settings().attention_table
    if table is None:
        table = device_tables(device).attention
    kind = "narrow" if n_q <= 4 else "wide"
    return table.get(f"{kind}_d{head_dim}", table[kind])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, limits: torch.Tensor,
                     window: int = 0, config: dict | None = None) -> torch.Tensor:
    """q [b, nH, n, d] over caches [b, nKV, L, d]; query i of row r sees slots j <= limits[r, i]
    (and j > limits - window when window > 0). Returns [b, n, nH*d] in q's dtype."""
    b, n_heads, n_q, d = q.shape
    n_kv = k_cache.shape[1]
    group = n_heads // n_kv
    nq_pow2 = triton.next_power_of_2(n_q)
    rows = max(16, triton.next_power_of_2(group * nq_pow2))
    config = config or attention_config(n_q, q.device, d)
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

