"""The persistent-kernel probe of benchmarks/gemv_chain.py (its Triton kernels, apart so that --report runs
where Triton is not installed): a decode layer's four GEMVs for every layer in one launch, one program per SM
slot, each GEMV's (column block, K tile) units dealt out evenly, fp32 atomics for the outputs, and a grid-wide
barrier between GEMVs. Not an engine path: the atomics make it nondeterministic.
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
def _barrier(SYNC, FAILED, target, SPINS: tl.constexpr):
    """Grid-wide: every program's writes before it, visible to every program after it."""
    tl.debug_barrier()
    count = tl.atomic_add(SYNC, 1, sem="acq_rel") + 1
    spins = 0
    while (count < target) & (spins < SPINS):
        count = tl.atomic_add(SYNC, 0, sem="acquire")
        spins += 1
    if count < target:
        tl.atomic_max(FAILED, 1)
    tl.debug_barrier()


@triton.jit
def _chain(X0, W0, W1, W2, W3, OUTS, SYNC, FAILED, layers, nprog,
           N0: tl.constexpr, K0: tl.constexpr, N1: tl.constexpr, K1: tl.constexpr, N2: tl.constexpr,
           K2: tl.constexpr, N3: tl.constexpr, K3: tl.constexpr, WIDE: tl.constexpr,
           BN: tl.constexpr, BK: tl.constexpr, PREFETCH: tl.constexpr, BARRIERS: tl.constexpr,
           SPINS: tl.constexpr):
    pid = tl.program_id(0)
    x = X0
    for layer in range(layers):
        out = OUTS + layer * 4 * WIDE
        w0 = W0 + layer.to(tl.int64) * N0 * K0
        w1 = W1 + layer.to(tl.int64) * N1 * K1
        w2 = W2 + layer.to(tl.int64) * N2 * K2
        w3 = W3 + layer.to(tl.int64) * N3 * K3
        _gemv(w0, x, out, N0, K0, pid, nprog, BN, BK)
        if PREFETCH > 0:
            _prefetch(w1, N1, K1, pid, nprog, PREFETCH, BN, BK)
        if BARRIERS:
            _barrier(SYNC, FAILED, (layer * 4 + 1) * nprog, SPINS)
        _gemv(w1, out, out + WIDE, N1, K1, pid, nprog, BN, BK)
        if PREFETCH > 0:
            _prefetch(w2, N2, K2, pid, nprog, PREFETCH, BN, BK)
        if BARRIERS:
            _barrier(SYNC, FAILED, (layer * 4 + 2) * nprog, SPINS)
        _gemv(w2, out + WIDE, out + 2 * WIDE, N2, K2, pid, nprog, BN, BK)
        if PREFETCH > 0:
            _prefetch(w3, N3, K3, pid, nprog, PREFETCH, BN, BK)
        if BARRIERS:
            _barrier(SYNC, FAILED, (layer * 4 + 3) * nprog, SPINS)
        _gemv(w3, out + 2 * WIDE, out + 3 * WIDE, N3, K3, pid, nprog, BN, BK)
        if PREFETCH > 0:
            _prefetch(W0 + (layer + 1).to(tl.int64) * N0 * K0, N0, K0, pid, nprog, PREFETCH, BN, BK)
        if BARRIERS:
            _barrier(SYNC, FAILED, (layer * 4 + 4) * nprog, SPINS)
        x = out + 3 * WIDE


def persistent_chain(x0: torch.Tensor, weights: list[torch.Tensor], layers: int, config: tuple, gemvs: tuple,
                     wide: int, barriers: bool = True):
    """A callable running the chain in one launch, and its output buffers [layers, 4, wide] fp32 and the
    failure flag (1: some program gave up waiting at a barrier)."""
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
                         PREFETCH=prefetch, BARRIERS=barriers, SPINS=SPIN_LIMIT, num_warps=warps, num_stages=stages)
        return outs

    return run, outs, failed
