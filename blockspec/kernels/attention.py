"""Decode attention: a few query tokens (a verify block, a draft block or one AR token) over a static KV cache,
flash-decoding style. Each program owns one (row, KV head, key split) and serves all the query heads of its GQA
group and all query tokens at once, so every cached K/V byte is read exactly once. The visible length comes from
device memory (`limits`), never from the host, which is what lets a whole speculative step live in one CUDA
graph. The keys are cut into a number of splits of the *visible* length (the table's for one row, fewer for a
batch of rows, which fills the GPU on its own), so every split has work at any context and the result does not
depend on the cache's allocated size (the eager and graphed paths give bit-identical outputs). With one split (as
many rows as the table's splits, or more) the kernel writes the output itself; with a few more, the last program
of a (row, KV head) group to finish (an atomic counter per group) combines the group's splits, one launch for all.

With `KernelSettings.batch_invariant` a query's result must not depend on the queries beside it, yet the cut
above follows the block's largest limit: there, split s holds keys [s * CHUNK, (s + 1) * CHUNK) whatever the
block (a grid of splits covering the cache, those past every limit idle), every call has tiles of 16 queries,
the splits a query sees are summed one after another in order, and any number of queries (a prefill) runs as
such tiles.

A prompt prefilled from its start (one or a batch of them) takes `prompt_attention` where the device's table lists
tiles for it: causal flash attention over the cache's K/V in place, on Hopper's warpgroup MMA (1.3x SDPA's flash
kernel for 8 x 512 tokens on an H100, 1.7x for 4096).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blockspec.kernels.launch import max_shared_bytes, pdl_options, pdl_prologue, prefetch_l2, prefetch_tiles
from blockspec.kernels.settings import (attention_keys_per_tile, attention_rows, attention_table,
                                       batch_attention_config, current_settings)

# batch_invariant: keys per split (a multiple of every block_n). Shorter splits spread a short context over more
# programs; longer ones keep the partial sums' scratch small (it grows with the cache length, not the context).
INVARIANT_CHUNK = 256
INVARIANT_QUERIES = 16  # queries per tile, for one token as for a block
SCRATCH_BYTES = 256 << 20  # a prefill's queries run in launches whose partial sums fit this
COMBINE_FLOATS_PER_THREAD = 64  # partial sums a combine holds in registers a thread (more spilled)
ARRIVAL_SLOTS = 1 << 15  # per device: counters of the (row, KV head, query tile) groups of a splits launch
_ARRIVALS: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _gated(out, gate, mask, OUT, GATED: tl.constexpr):
    """out rounded to OUT's dtype; GATED: then times sigmoid(gate), each rounded as torch's `out * sigmoid(gate)`
    rounds them (Qwen3.5's attention output gate, one launch instead of two after the attention)."""
    out = out.to(OUT.dtype.element_ty)
    if GATED:
        g = tl.load(gate, mask=mask, other=0.0).to(tl.float32)
        out = (out.to(tl.float32) * (1.0 / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32))
        out = out.to(OUT.dtype.element_ty)
    return out


@triton.jit
def _combined(acc, ml, mask, n_splits, sa_s, sm_s, SPLITS: tl.constexpr):
    """Queries' outputs [R, D] from their splits' partial sums (`acc` [R, D] pointers at split 0) and (max, sum) pairs
    (`ml` [R] pointers), the splits summed one after another in order, so either kernel that runs it gets the same
    bits; unrolled over SPLITS (>= n_splits), so that the loads go out together and nothing is reduced across
    threads. The loads skip L1: in the splits kernel they read what other programs wrote."""
    m_max = tl.load(ml, mask=mask, other=float("-inf"), cache_modifier=".cg")
    for split in tl.static_range(1, SPLITS):
        m = tl.load(ml + split * sm_s, mask=mask & (split < n_splits), other=float("-inf"), cache_modifier=".cg")
        m_max = tl.maximum(m_max, m)
    num = tl.zeros(acc.shape, tl.float32)
    denom = tl.zeros(m_max.shape, tl.float32)
    for split in tl.static_range(SPLITS):
        ok = mask & (split < n_splits)
        m = tl.load(ml + split * sm_s, mask=ok, other=float("-inf"), cache_modifier=".cg")
        w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
        num += tl.load(acc + split * sa_s, mask=ok[:, None], other=0.0, cache_modifier=".cg") * w[:, None]
        denom += tl.load(ml + split * sm_s + 1, mask=ok, other=0.0, cache_modifier=".cg") * w
    return num / denom[:, None]


# lengths and counts vary per call: specialising on them would recompile for new prompt lengths
@triton.jit(do_not_specialize=["n_q", "window"])
def _attention_splits(Q, K, V, LIM, ACC, ML, OUT, GATE, ARRIVED,
                      sq_b, sq_h, sq_n, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, slim_b, slim_n,
                      sa_b, sa_h, sa_s, sa_n, sm_b, sm_h, sm_s, sm_n, so_b, so_n, so_h, sg_b, sg_n,
                      n_q, n_kv_heads, n_splits, window, scale,
                      GROUP: tl.constexpr, NQ: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr,
                      BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr,
                      GATED: tl.constexpr, COMBINE: tl.constexpr, SPLITS: tl.constexpr, PREFETCH: tl.constexpr,
                      USE_PDL: tl.constexpr):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // n_kv_heads
    kvh = pid_bh % n_kv_heads
    rows = tl.arange(0, ROWS)
    g = rows // NQ  # query head within the GQA group
    i = tl.program_id(2) * NQ + rows % NQ  # query token
    valid = (g < GROUP) & (i < n_q)
    head = kvh * GROUP + g
    dims = tl.arange(0, D)
    # the limits come from before the kernel ahead of this one (decode_attention), so they are read before the wait
    lim = tl.load(LIM + b * slim_b + i * slim_n, mask=valid, other=-1).to(tl.int32)
    total = tl.max(lim, axis=0) + 1
    if CHUNK > 0:  # fixed offsets: the tiles a query's keys fall into do not depend on the other queries
        chunk = CHUNK
    else:
        chunk = tl.cdiv(tl.cdiv(total, n_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, total)
    stored = valid
    if CHUNK > 0:  # a split past every limit: no query's combine reads it
        stored = valid & (lo < total)
    if window > 0:
        lo = tl.maximum(lo, (tl.min(tl.where(valid, lim, 2147483647), axis=0) - window + 1) // BLOCK_N * BLOCK_N)
    k_base = K + b * sk_b + kvh * sk_h
    v_base = V + b * sv_b + kvh * sv_h
    if PREFETCH > 0:  # the cache store ahead writes one slot a query; the rest is there: ask L2 for the first tiles
        line: tl.constexpr = 1024 // K.dtype.element_ty.primitive_bitwidth  # elements per 128-byte line
        first = lo + tl.arange(0, PREFETCH * BLOCK_N)[:, None]
        offs = (tl.arange(0, D // line) * line)[None, :]
        prefetch_l2(tl.where(first < hi, k_base + first * sk_l + offs, k_base))
        prefetch_l2(tl.where(first < hi, v_base + first * sv_l + offs, v_base))
    pdl_prologue(USE_PDL)
    q = tl.load(Q + b * sq_b + head[:, None] * sq_h + i[:, None] * sq_n + dims[None, :],
                mask=valid[:, None], other=0.0)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D], tl.float32)
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
    out = OUT + b * so_b + i[:, None] * so_n + head[:, None] * so_h + dims[None, :]
    gate = GATE + b * sg_b + i[:, None] * sg_n + head[:, None] * D + dims[None, :]
    if DIRECT:  # the only split: what the combine would compute from it (acc / l, bit for bit), without its launch
        tl.store(out, _gated(acc / l_i[:, None], gate, valid[:, None], OUT, GATED), mask=valid[:, None])
    else:
        parts = ACC + b * sa_b + head[:, None] * sa_h + i[:, None] * sa_n + dims[None, :]
        tl.store(parts + split * sa_s, acc, mask=stored[:, None])
        ml = ML + b * sm_b + head * sm_h + i * sm_n
        tl.store(ml + split * sm_s, m_i, mask=stored)
        tl.store(ml + split * sm_s + 1, l_i, mask=stored)
        if COMBINE:  # the group's last program to arrive combines its splits: no second launch to wait for
            tl.debug_barrier()  # every thread's partial sums stored before the release below
            group = ARRIVED + pid_bh * tl.num_programs(2) + tl.program_id(2)
            if tl.atomic_add(group, 1, sem="acq_rel", scope="gpu") == n_splits - 1:
                tl.store(group, 0)  # zero again for the next launch
                out_value = _combined(parts, ml, valid, n_splits, sa_s, sm_s, SPLITS)
                tl.store(out, _gated(out_value, gate, valid[:, None], OUT, GATED), mask=valid[:, None])


@triton.jit(do_not_specialize=["n_q", "window"])
def _combine_splits(ACC, ML, LIM, OUT, GATE, sa_b, sa_h, sa_s, sa_n, sm_b, sm_h, sm_s, sm_n, slim_b, slim_n,
                    so_b, so_n, so_h, sg_b, sg_n, n_q, n_heads, n_splits, window, SPLITS: tl.constexpr,
                    D: tl.constexpr, CHUNK: tl.constexpr, GATED: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    pid = tl.program_id(0)
    i = pid % n_q
    h = (pid // n_q) % n_heads
    b = pid // (n_q * n_heads)
    dims = tl.arange(0, D)
    ml = ML + b * sm_b + h * sm_h + i * sm_n
    acc = ACC + b * sa_b + h * sa_h + i * sa_n + dims
    if CHUNK > 0:  # the splits this query sees, summed in order: the same sums as for this query alone
        lim = tl.load(LIM + b * slim_b + i * slim_n).to(tl.int32)
        first = tl.where(window > 0, tl.maximum(lim - window + 1, 0) // CHUNK, 0)
        last = lim // CHUNK
        m_max = tl.load(ml + first * sm_s)
        for s in range(first + 1, last + 1):
            m_max = tl.maximum(m_max, tl.load(ml + s * sm_s))
        num = tl.zeros([D], tl.float32)
        denom = 0.0
        for s in range(first, last + 1):
            m = tl.load(ml + s * sm_s)
            w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
            num += tl.load(acc + s * sa_s) * w
            denom += tl.load(ml + s * sm_s + 1) * w
        out = num / denom
    else:  # as the splits kernel's last program combines them
        one = tl.arange(0, 1)
        out = tl.reshape(_combined(acc[None, :], ml + one, one == 0, n_splits, sa_s, sm_s, SPLITS), [D])
    tl.store(OUT + b * so_b + i * so_n + h * so_h + dims,
             _gated(out, GATE + b * sg_b + i * sg_n + h * D + dims, True, OUT, GATED))


# batch_invariant: the same kernels, one binary for any number of queries. Triton specialises integer arguments
# on their divisibility by 16, and the strides that follow the query count would then pick vector widths, and so
# register layouts and reduction orders, per call.
_attention_splits_any_count = triton.jit(do_not_specialize=[
    "n_q", "window", "sq_b", "sq_h", "slim_b", "sa_b", "sa_h", "sa_s", "sm_b", "sm_h", "sm_s", "so_b", "sg_b"]
)(_attention_splits.fn)
_combine_splits_any_count = triton.jit(do_not_specialize=[
    "n_q", "window", "sa_b", "sa_h", "sa_s", "sm_b", "sm_h", "sm_s", "slim_b", "so_b", "sg_b"])(_combine_splits.fn)


@triton.jit
def _prompt_keys(q, k_base, v_base, sk_l, sv_l, start_n, rows, n, acc, m_i, l_i, qk_scale, D: tl.constexpr,
                 BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, DIAGONAL: tl.constexpr):
    """One tile of keys into a prompt program's online softmax; DIAGONAL: masked causally and at the prompt's end."""
    keys = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D)
    k_at, v_at = k_base + keys[:, None] * sk_l + dims[None, :], v_base + keys[:, None] * sv_l + dims[None, :]
    if DIAGONAL:
        k = tl.load(k_at, mask=keys[:, None] < n, other=0.0)
        v = tl.load(v_at, mask=keys[:, None] < n, other=0.0)
    else:
        k = tl.load(k_at)
        v = tl.load(v_at)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if DIAGONAL:
        s = tl.where((keys[None, :] <= rows[:, None]) & (keys[None, :] < n), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i * alpha + tl.sum(p, axis=1)


# the prompt's length varies per call: specialising on it would recompile for every new length
@triton.jit(do_not_specialize=["n"])
def _prompt_attention(Q, K, V, OUT, GATE, sq_b, sq_h, sq_n, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_n,
                      sg_b, sg_n, n, scale, HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, GATED: tl.constexpr,
                      USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    # every head's last query block first: the longest programs start first, so fewer SMs idle at the end
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    b = (tl.program_id(0) // HEADS).to(tl.int64)  # 64-bit: b x a cache's row stride may pass 2^31
    h = tl.program_id(0) % HEADS
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + dims[None, :], mask=rows[:, None] < n, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    k_base = K + b * sk_b + (h // GROUP) * sk_h
    v_base = V + b * sv_b + (h // GROUP) * sv_h
    qk_scale = scale * 1.4426950408889634  # exp2(x log2 e) = exp(x)
    # keys before the block's first query need no mask (BLOCK_M is a multiple of BLOCK_N); the diagonal's do
    for start_n in range(0, start_m, BLOCK_N):
        acc, m_i, l_i = _prompt_keys(q, k_base, v_base, sk_l, sv_l, start_n, rows, n, acc, m_i, l_i, qk_scale, D,
                                     BLOCK_N, PRECISION, False)
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, n), BLOCK_N):
        acc, m_i, l_i = _prompt_keys(q, k_base, v_base, sk_l, sv_l, start_n, rows, n, acc, m_i, l_i, qk_scale, D,
                                     BLOCK_N, PRECISION, True)
    mask = rows[:, None] < n
    gate = GATE + b * sg_b + rows[:, None] * sg_n + h * D + dims[None, :]
    out = OUT + b * so_b + rows[:, None] * so_n + h * D + dims[None, :]
    tl.store(out, _gated(acc / l_i[:, None], gate, mask, OUT, GATED), mask=mask)


def attention_config(n_q: int, device: torch.device, head_dim: int = 128) -> dict:
    """The launch settings for n_q queries (up to 4: "narrow", AR-like; more: "wide", a block): key splits per
    (row, KV head), keys per tile, warps; from the current settings' table, else the device's. A table may give a
    head dim its own ("wide_d256"). Under `KernelSettings.batch_invariant`, "wide"'s tiles for any n_q, with
    "chunk": keys per split."""
    table = attention_table(device)
    wide = table.get(f"wide_d{head_dim}", table["wide"])
    if current_settings().batch_invariant:
        return {**wide, "chunk": INVARIANT_CHUNK}
    return table.get(f"narrow_d{head_dim}", table["narrow"]) if n_q <= 4 else wide


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, limits: torch.Tensor,
                     window: int = 0, config: dict | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
    """q [b, nH, n, d] over caches [b, nKV, L, d]; query i of row r sees slots j <= limits[r, i]
    (and j > limits - window when window > 0). Returns [b, n, nH*d] in q's dtype, times sigmoid(gate) where a gate
    [b, n, nH*d] is given (its last dim contiguous). A config with "chunk" cuts the keys at fixed offsets
    (batch_invariant) and takes any n; without, n is at most 16. Under PDL the kernel reads `limits` before it waits
    on the kernel launched just before it, so they must come from earlier (the passes' positions are set at their
    start; the cache store just before writes K, V and q)."""
    b, n_heads, n_q, d = q.shape
    config = config or attention_config(n_q, q.device, d)
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty(b, n_q, n_heads, d, device=q.device, dtype=q.dtype)
    chunk = config.get("chunk", 0)
    if chunk:
        assert chunk % config["block_n"] == 0, "a window's first tile must fall on the splits' tile grid"
        splits = triton.cdiv(k_cache.shape[2], chunk)
        per_query = b * n_heads * splits * d * 4
        step = max(INVARIANT_QUERIES, SCRATCH_BYTES // per_query // INVARIANT_QUERIES * INVARIANT_QUERIES)
        for start in range(0, n_q, step):
            part = slice(start, start + step)
            _launch(q[:, :, part], k_cache, v_cache, limits[:, part], out[:, part], window, config, splits,
                    INVARIANT_QUERIES, None if gate is None else gate[:, part])
    else:
        config, splits = batch_attention_config(config, b)
        _launch(q, k_cache, v_cache, limits, out, window, config, splits, triton.next_power_of_2(n_q), gate)
    return out.view(b, n_q, n_heads * d)


def prompt_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, config: dict,
                     gate: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of prompts q [b, nH, n, d] (any strides, unit on d) that start at slot 0 of the cache
    layers [b, nKV, >= n, d]: [b, n, nH * d] in q's dtype (what o_proj reads), times sigmoid(gate) where a gate
    [b, n, nH * d] is given (its last dim contiguous). Each program runs the online softmax of block_m queries of one
    (row, head) over their keys, reading its KV head's keys from the cache in place."""
    b, n_heads, n, d = q.shape
    out = torch.empty(b, n, n_heads * d, device=q.device, dtype=q.dtype)
    gated = gate is not None
    if gated:
        assert gate.stride(-1) == 1, "the gate's last dim must be contiguous"
    gate_ptr, sg_b, sg_n = (gate, gate.stride(0), gate.stride(1)) if gated else (out, 0, 0)  # out: never read
    _prompt_attention[(b * n_heads, triton.cdiv(n, config["block_m"]))](
        q, k_cache, v_cache, out, gate_ptr, q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), sg_b, sg_n, n, d ** -0.5, HEADS=n_heads, GROUP=n_heads // k_cache.shape[1],
        D=d, BLOCK_M=config["block_m"], BLOCK_N=config["block_n"],
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", GATED=gated, num_warps=config["num_warps"],
        num_stages=config["num_stages"], **pdl_options(q))
    return out


def _launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, limits: torch.Tensor, out: torch.Tensor,
            window: int, config: dict, splits: int, tile: int, gate: torch.Tensor | None) -> None:
    """The splits kernel for q [b, nH, n, d] in tiles of `tile` queries, into out [b, n, nH, d]: one split (no chunk)
    needs no combine; more, each group's last program combines them where their partial sums fit its registers; the
    combine kernel runs for the rest, fixed-offset splits (chunk) and where there are no counters."""
    b, n_heads, n_q, d = q.shape
    n_kv = k_cache.shape[1]
    group = n_heads // n_kv
    rows = attention_rows(group, tile)
    block_n = attention_keys_per_tile(config["block_n"], rows, d, q.element_size(), max_shared_bytes(q))
    chunk = config.get("chunk", 0)
    pdl = pdl_options(q)
    direct = splits == 1 and not chunk
    scratch = (1, 1, 1, 1) if direct else (b, n_heads, splits, n_q)
    acc = torch.empty(*scratch, d, device=q.device, dtype=torch.float32)
    ml = torch.empty(*scratch, 2, device=q.device, dtype=torch.float32)
    splits_kernel, combine_kernel = ((_attention_splits_any_count, _combine_splits_any_count) if chunk
                                     else (_attention_splits, _combine_splits))
    q_tiles = triton.cdiv(n_q, tile)
    splits_bound = triton.next_power_of_2(splits)  # what the combines unroll over
    # the last program holds every split's [rows, d] partial sums at once: up to ~64 floats a thread, else the
    # combine's own launch spreads them over many programs
    fits = splits_bound * rows * d <= COMBINE_FLOATS_PER_THREAD * 32 * config["num_warps"]
    arrived = None if direct or chunk or not fits else _arrival_counts(q.device, b * n_kv * q_tiles)
    gated = gate is not None
    if gated:
        assert gate.stride(-1) == 1, "the gate's last dim must be contiguous"
    gate_ptr, sg_b, sg_n = (gate, gate.stride(0), gate.stride(1)) if gated else (out, 0, 0)  # out: never read
    splits_kernel[(b * n_kv, splits, q_tiles)](
        q, k_cache, v_cache, limits, acc, ml, out, gate_ptr, acc if arrived is None else arrived,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), limits.stride(0), limits.stride(1),
        acc.stride(0), acc.stride(1), acc.stride(2), acc.stride(3),
        ml.stride(0), ml.stride(1), ml.stride(2), ml.stride(3), out.stride(0), out.stride(1), out.stride(2),
        sg_b, sg_n, n_q, n_kv, splits, window, d ** -0.5,
        GROUP=group, NQ=tile, ROWS=rows, D=d, BLOCK_N=block_n, CHUNK=chunk, DIRECT=direct,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", GATED=gated and (direct or arrived is not None),
        COMBINE=arrived is not None, SPLITS=1 if arrived is None else splits_bound,
        PREFETCH=prefetch_tiles(pdl) if d * k_cache.element_size() >= 128 else 0,  # whole 128-byte lines a key
        num_warps=config["num_warps"], **pdl)
    if direct or arrived is not None:
        return
    combine_kernel[(b * n_heads * n_q,)](
        acc, ml, limits, out, gate_ptr, acc.stride(0), acc.stride(1), acc.stride(2), acc.stride(3),
        ml.stride(0), ml.stride(1), ml.stride(2), ml.stride(3), limits.stride(0), limits.stride(1),
        out.stride(0), out.stride(1), out.stride(2), sg_b, sg_n, n_q, n_heads, splits, window,
        SPLITS=1 if chunk else splits_bound, D=d, CHUNK=chunk, GATED=gated,
        num_warps=min(8, max(1, splits_bound * d // (COMBINE_FLOATS_PER_THREAD * 32))), **pdl)


def _arrival_counts(device: torch.device, groups: int) -> torch.Tensor | None:
    """Zeroed int32 counters, one per (row, KV head, query tile) group of a splits launch on `device`, kept from
    call to call (each group's last program zeroes its counter again; launches on a device run one after another on
    one stream). None where they cannot be made: more groups than ARRIVAL_SLOTS, or the first call on a device
    being captured into a CUDA graph (a tensor made there would belong to the graph's pool); that launch combines in
    a kernel of its own, the same arithmetic."""
    counts = _ARRIVALS.get(device)
    if counts is None and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        counts = _ARRIVALS[device] = torch.zeros(ARRIVAL_SLOTS, device=device, dtype=torch.int32)
    return counts if counts is not None and groups <= ARRIVAL_SLOTS else None
