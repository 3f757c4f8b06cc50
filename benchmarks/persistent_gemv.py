"""The persistent-kernel probe of benchmarks/gemv_chain.py (its Triton kernels, apart so that --report runs
where Triton is not installed): a decode layer's four GEMVs for every layer in one launch, one program per SM
slot, each GEMV's (column block, K tile) units dealt out evenly, fp32 atomics for the outputs, and a grid-wide
barrier between GEMVs (not an engine path: the atomics make it nondeterministic); and a deterministic,
barrier-free dataflow variant (below).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SPIN_LIMIT = 1_000_000  # polls before a program gives up waiting (programs not all resident): flagged, not hung


@triton.jit
def _units(pid, nprog, n, k, BN: tl.constexpr, BK: tl.constexpr):
    """This program's share [first, end) of a GEMV's units (column block, K tile), K tiles innermost."""
    total = (n // BN) * (k // BK)
    return pid * total // nprog, (pid + 1) * total // nprog


@triton.jit
def _prefetch(W, n, k, pid, nprog, TILES: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Ask L2 for the first TILES weight tiles this program will read in the GEMV of weight W."""
    first, end = _units(pid, nprog, n, k, BN, BK)
    kt = k // BK
    line: tl.constexpr = 64  # bf16 elements per 128-byte line
    rows = tl.arange(0, BN)
    offs = tl.arange(0, BK // line) * line
    for t in tl.static_range(TILES):
        u = tl.minimum(first + t, end - 1)
        ptrs = W + ((u // kt) * BN + rows)[:, None].to(tl.int64) * k + (u % kt) * BK + offs[None, :]
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs.to(tl.int64)],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gemv(W, X, OUT, n, k, pid, nprog, BN: tl.constexpr, BK: tl.constexpr):
    """OUT[:n] += W[n, k] @ X[:k] over this program's units: a K run per column block, then one atomic add."""
    first, end = _units(pid, nprog, n, k, BN, BK)
    kt = k // BK
    cols = tl.arange(0, BN)
    ks = tl.arange(0, BK)
    rows = tl.arange(0, 16)  # tensor-core dot: the one row padded to 16
    u = first
    while u < end:
        block = u // kt
        stop = tl.minimum((block + 1) * kt, end)
        acc = tl.zeros([BN, 16], tl.float32)
        w_ptrs = W + (block * BN + cols)[:, None].to(tl.int64) * k + (u % kt) * BK + ks[None, :]
        x_ptrs = X + (u % kt) * BK + ks[None, :] + rows[:, None] * 0
        for _ in range(u, stop):
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs, mask=rows[:, None] < 1, other=0.0).to(tl.bfloat16)
            acc = tl.dot(w, tl.trans(x), acc)
            w_ptrs += BK
            x_ptrs += BK
        tl.atomic_add(OUT + block * BN + cols, tl.sum(acc, axis=1), sem="relaxed")
        u = stop


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _barrier(SYNC, FAILED, target, SPINS: tl.constexpr, TIMES, nprog, TIMED: tl.constexpr):
    """Grid-wide: every program's writes before it, visible to every program after it. TIMED: each program's
    arrival and departure (ns, %globaltimer) go to TIMES[barrier, program, 0 / 1]."""
    if TIMED:
        arrived = _now()
    tl.debug_barrier()
    count = tl.atomic_add(SYNC, 1, sem="acq_rel") + 1
    spins = 0
    while (count < target) & (spins < SPINS):
        count = tl.atomic_add(SYNC, 0, sem="acquire")
        spins += 1
    if count < target:
        tl.atomic_max(FAILED, 1)
    tl.debug_barrier()
    if TIMED:
        slot = TIMES + ((target // nprog - 1) * nprog + tl.program_id(0)) * 2
        tl.store(slot, arrived)
        tl.store(slot + 1, _now())


@triton.jit
def _link(W, X, OUT, n, k, W_NEXT, n_next, k_next, pid, nprog, SYNC, FAILED, target, TIMES,
          BN: tl.constexpr, BK: tl.constexpr, PREFETCH: tl.constexpr, BARRIERS: tl.constexpr,
          SPINS: tl.constexpr, TIMED: tl.constexpr):
    """One GEMV and the barrier after it, the next GEMV's first tiles asked of L2 before waiting (PREFETCH)."""
    _gemv(W, X, OUT, n, k, pid, nprog, BN, BK)
    if PREFETCH > 0:
        _prefetch(W_NEXT, n_next, k_next, pid, nprog, PREFETCH, BN, BK)
    if BARRIERS:
        _barrier(SYNC, FAILED, target, SPINS, TIMES, nprog, TIMED)


@triton.jit
def _chain(X0, W0, W1, W2, W3, OUTS, SYNC, FAILED, layers, nprog,
           N0: tl.constexpr, K0: tl.constexpr, N1: tl.constexpr, K1: tl.constexpr, N2: tl.constexpr,
           K2: tl.constexpr, N3: tl.constexpr, K3: tl.constexpr, WIDE: tl.constexpr,
           BN: tl.constexpr, BK: tl.constexpr, PREFETCH: tl.constexpr, BARRIERS: tl.constexpr,
           SPINS: tl.constexpr, TIMES, TIMED: tl.constexpr):
    pid = tl.program_id(0)
    x = X0
    for layer in range(layers):
        out = OUTS + layer * 4 * WIDE
        w0 = W0 + layer.to(tl.int64) * N0 * K0
        w1 = W1 + layer.to(tl.int64) * N1 * K1
        w2 = W2 + layer.to(tl.int64) * N2 * K2
        w3 = W3 + layer.to(tl.int64) * N3 * K3
        w_next = W0 + (layer + 1).to(tl.int64) * N0 * K0
        base = layer * 4 * nprog
        _link(w0, x, out, N0, K0, w1, N1, K1, pid, nprog, SYNC, FAILED, base + nprog, TIMES,
              BN, BK, PREFETCH, BARRIERS, SPINS, TIMED)
        _link(w1, out, out + WIDE, N1, K1, w2, N2, K2, pid, nprog, SYNC, FAILED, base + 2 * nprog, TIMES,
              BN, BK, PREFETCH, BARRIERS, SPINS, TIMED)
        _link(w2, out + WIDE, out + 2 * WIDE, N2, K2, w3, N3, K3, pid, nprog, SYNC, FAILED, base + 3 * nprog, TIMES,
              BN, BK, PREFETCH, BARRIERS, SPINS, TIMED)
        _link(w3, out + 2 * WIDE, out + 3 * WIDE, N3, K3, w_next, N0, K0, pid, nprog, SYNC, FAILED,
              base + 4 * nprog, TIMES, BN, BK, PREFETCH, BARRIERS, SPINS, TIMED)
        x = out + 3 * WIDE


def persistent_chain(x0: torch.Tensor, weights: list[torch.Tensor], layers: int, config: tuple, gemvs: tuple,
                     wide: int, barriers: bool = True, times: torch.Tensor | None = None):
    """A callable running the chain in one launch (returning its outputs [layers, 4, wide] fp32), and the failure
    flag (1: some program gave up waiting at a barrier). With `times` (int64 [layers * 4, programs,
    2]), every barrier records each program's arrival and departure in ns."""
    bn, bk, warps, stages, per_sm, prefetch = config
    nprog = torch.cuda.get_device_properties(0).multi_processor_count * per_sm
    outs = torch.zeros(layers, 4, wide, device="cuda", dtype=torch.float32)
    sync = torch.zeros(1, device="cuda", dtype=torch.int32)
    failed = torch.zeros(1, device="cuda", dtype=torch.int32)
    shapes = {f"{a}{i}": v for i, (_, n, k) in enumerate(gemvs) for a, v in (("N", n), ("K", k))}

    def run() -> torch.Tensor:
        outs.zero_()
        sync.zero_()
        _chain[(nprog,)](x0, *weights, outs, sync, failed, layers, nprog, **shapes, WIDE=wide, BN=bn, BK=bk,
                         PREFETCH=prefetch, BARRIERS=barriers, SPINS=SPIN_LIMIT,
                         TIMES=failed if times is None else times, TIMED=times is not None, num_warps=warps,
                         num_stages=stages)
        return outs

    return run, failed


# --- Dataflow variant: no barriers; each value carries its step's epoch (NCCL's LL protocol) ---
#
# Each program owns contiguous output rows of every GEMV and reduces their whole K itself on tensor cores, so
# every value is written once, deterministically (no atomics, no split-K partials), and there is no grid
# barrier at all: an activation element is stored as one 64-bit word, fp32 bits low and the run's epoch high.
# One 8-byte store is single-copy atomic, so a reader that sees this run's epoch in a word has that word's final
# value: no fence, no counter, no barrier. A program reads the vector tile by tile as its K loop needs it and
# spins only on a tile whose producer has not yet stored it, so a slow producer delays only the readers that
# reach its rows. Correct and bit-exact on the H100, but slow as written: Triton does not software-pipeline a
# loop that holds the spin (no cp.async in its K loop), so the weight stream stops at every tile.


@triton.jit
def _ll_read(ACT, offs, epoch, FAILED, SPINS: tl.constexpr):
    """The fp32 values at ACT[offs] once all carry `epoch` (flags FAILED after SPINS polls)."""
    v = tl.load(ACT + offs, volatile=True)
    spins = 0
    while (tl.min(((v >> 32) == epoch).to(tl.int32), axis=0) == 0) & (spins < SPINS):
        v = tl.load(ACT + offs, volatile=True)
        spins += 1
    if spins == SPINS:
        tl.atomic_max(FAILED, 1)
    return v.to(tl.int32).to(tl.float32, bitcast=True)  # the low word


@triton.jit
def _ll_gemv(W, ACT_IN, ACT_OUT, n, k, pid, nprog, epoch, FAILED, BR: tl.constexpr, BK: tl.constexpr,
             SPINS: tl.constexpr):
    """ACT_OUT[rows] = W[rows] @ ACT_IN[:k] for this program's rows, in blocks of BR rows."""
    first = pid * n // nprog
    end = (pid + 1) * n // nprog
    ks = tl.arange(0, BK)
    pad = tl.arange(0, 16)  # tensor-core dot: the one row padded to 16
    block_rows = tl.arange(0, BR)
    for row in range(first, end, BR):
        rows = row + block_rows
        acc = tl.zeros([BR, 16], tl.float32)
        w_ptrs = W + rows[:, None].to(tl.int64) * k + ks[None, :]
        for kk in range(0, k, BK):
            w = tl.load(w_ptrs, mask=(rows < end)[:, None], other=0.0)
            x = _ll_read(ACT_IN, kk + ks, epoch, FAILED, SPINS)
            x16 = tl.where(pad[:, None] < 1, x[None, :], 0.0).to(tl.bfloat16)
            acc = tl.dot(w, tl.trans(x16), acc)
            w_ptrs += BK
        value = tl.sum(acc, axis=1).to(tl.uint32, bitcast=True).to(tl.int64)  # zero-extended bits
        tl.store(ACT_OUT + rows, (epoch.to(tl.int64) << 32) | value, mask=rows < end)


@triton.jit
def _ll_chain(W0, W1, W2, W3, ACTS, EPOCH, FAILED, layers, nprog,
              N0: tl.constexpr, K0: tl.constexpr, N1: tl.constexpr, K1: tl.constexpr, N2: tl.constexpr,
              K2: tl.constexpr, N3: tl.constexpr, K3: tl.constexpr, WIDE: tl.constexpr,
              BR: tl.constexpr, BK: tl.constexpr, SPINS: tl.constexpr):
    pid = tl.program_id(0)
    epoch = tl.load(EPOCH)
    for layer in range(layers):
        act = ACTS + layer * 4 * WIDE
        _ll_gemv(W0 + tl.cast(layer, tl.int64) * N0 * K0, act, act + WIDE, N0, K0, pid, nprog, epoch, FAILED,
                 BR, BK, SPINS)
        _ll_gemv(W1 + tl.cast(layer, tl.int64) * N1 * K1, act + WIDE, act + 2 * WIDE, N1, K1, pid, nprog, epoch,
                 FAILED, BR, BK, SPINS)
        _ll_gemv(W2 + tl.cast(layer, tl.int64) * N2 * K2, act + 2 * WIDE, act + 3 * WIDE, N2, K2, pid, nprog,
                 epoch, FAILED, BR, BK, SPINS)
        _ll_gemv(W3 + tl.cast(layer, tl.int64) * N3 * K3, act + 3 * WIDE, act + 4 * WIDE, N3, K3, pid, nprog,
                 epoch, FAILED, BR, BK, SPINS)


def dataflow_chain(x0: torch.Tensor, weights: list[torch.Tensor], layers: int, config: tuple, gemvs: tuple,
                   wide: int):
    """As persistent_chain, for the dataflow kernel; config (block rows, block_k, num_warps, num_stages,
    programs per SM). Each run bumps a device-side epoch (so CUDA-graph replays each wait for their own values)
    and stamps x0 with it; the callable returns the fp32 values [layers, 4, wide]."""
    br, bk, warps, stages, per_sm = config
    nprog = torch.cuda.get_device_properties(0).multi_processor_count * per_sm
    acts = torch.zeros(layers * 4 + 1, wide, device="cuda", dtype=torch.int64)
    epoch = torch.zeros(1, device="cuda", dtype=torch.int64)
    failed = torch.zeros(1, device="cuda", dtype=torch.int32)
    shapes = {f"{a}{i}": v for i, (_, n, k) in enumerate(gemvs) for a, v in (("N", n), ("K", k))}
    x_bits = x0.float().view(torch.int32).to(torch.int64) & 0xFFFFFFFF

    def run() -> torch.Tensor:
        epoch.add_(1)
        acts[0, :x0.numel()] = (epoch << 32) | x_bits
        _ll_chain[(nprog,)](*weights, acts, epoch, failed, layers, nprog, **shapes, WIDE=wide, BR=br, BK=bk,
                            SPINS=SPIN_LIMIT, num_warps=warps, num_stages=stages)
        return (acts[1:] & 0xFFFFFFFF).to(torch.int32).view(torch.float32).view(layers, 4, wide)

    return run, failed
