"""The flow kernel: every decoder layer of a batch-1 decode step in one persistent launch, in Triton's Gluon
dialect. The engine runs a Qwen3-shaped target's AR token through it (layer_decoder, from target/flow.py);
benchmarks/flow_probe.py holds the probe form that benchmarks/gemv_chain.py times (the GEMV chain alone, clock
profiles and timelines, diagnostics), built from the same pieces.

Triton does not software-pipeline a K loop that holds a spin (the weight stream would stop at every tile), so the
pipeline is written out. One persistent program per SM walks its own fixed sequence of units, a unit being one
(GEMV, block of its output rows, K tile): every GEMV's rows are split evenly over the programs, at one-row
granularity, and each program owns its rows outright (no atomics: reruns are bit-exact).

- Weights go through a ring of STAGES shared-memory slots filled by cp.async in copy warps of their own (warp
  specialization); the dot warps take a slot when its mbarrier says it landed and release it when done. The
  copies do not depend on any activation, so they run ahead across GEMV and layer boundaries: while the dot
  warps wait for an input, the next weight tiles are on their way.
- But not too far ahead: the bytes in flight per program are capped (CAP). Every other read on the GPU, the
  activation polls included, waits behind the outstanding copies, so a deep ring of outstanding tiles made a
  GEMV's last rows reach their readers 4-5 us after the store; a ring of landed tiles with 64 KB in flight
  keeps that near 1-2 us at almost the same streaming rate.
- Activations are 32-bit words, bf16 bits low and a 16-bit run epoch high (the LL protocol of NCCL, halved: a
  32-bit store is single-copy atomic, so a reader that sees this run's epoch has the final value). Each thread
  polls only its own words, all of them in one round trip, in a few lines of inline PTX, so a slow producer
  delays only the tiles that read its rows, and nothing is reduced across the block to decide whether to wait.
- The multiply is a tensor-core mma (m16n8k16) with the activation as the narrow operand, over four K quarters
  into four accumulators (four short dependent chains, not one long one); the same code would take a verify
  block's 16 rows in the spare columns.

A layer's other work is done where the data already is:
- RMSNorm before qkv and gate_up by the reader, its scale taken out of the dot: (x * weight) rounded to bf16 goes
  into the dot, sum(x^2) builds up over the K tiles, and the finished rows are multiplied by rsqrt(mean + eps).
  (The per-op kernels round x * rsqrt first, which no reader can know before the whole vector is in: waiting for
  it is a grid barrier.)
- the residual adds after o_proj and down by the rows' owner: both GEMVs have `hidden` rows split alike, so a
  program adds to rows that it stored itself;
- silu(gate) * up after gate_up by the rows' owner: gate_up's rows are (gate, up) pairs, the engine's layout,
  split two at a time, so down reads 9728 words, not 19456 (and streams one region, not two: design notes).
- attention between qkv and o_proj, in (kv head, context split) units (_attention_unit), the new k and v written
  to the cache.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mma_v2
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

SPIN_LIMIT = 1 << 20  # polls of one word before a thread gives up (programs not all resident): flagged, not hung
SPIN = gl.constexpr(SPIN_LIMIT)


def poll_asm(words: int) -> str:
    """Inline PTX for one thread's `words` activation words (operands: the words out, then per input its `words`
    values: addresses, the run's epoch, the words read early by the prefetch, the FAILED address). The early
    words are kept if all carry the epoch; otherwise all of the thread's words are read again together (one L2
    round trip per poll, however many are stale) until they do. A thread gives up after SPIN_LIMIT polls (the
    kernel then raises FAILED) and every 256 polls looks at FAILED, so one give-up ends every wait instead of
    each waiting out its own limit. The braces keep the labels local to each copy the compiler inlines."""
    out, ptr, epoch, early, failed = (range(i * words, (i + 1) * words) for i in range(5))
    check = [f"shr.u32 seen, ${o}, 16;\nsetp.ne{'' if j == 0 else '.or'}.u32 stale, seen, ${e}"
             + ("" if j == 0 else ", stale") + ";" for j, (o, e) in enumerate(zip(out, epoch))]
    return "\n".join(["{", ".reg .pred stale;", ".reg .u32 seen, polls, failed;", "mov.u32 polls, 0;",
                      *[f"mov.u32 ${o}, ${e};" for o, e in zip(out, early)], "CHECK:", *check,
                      "@!stale bra DONE;", "add.u32 polls, polls, 1;", f"setp.lt.u32 stale, polls, {SPIN_LIMIT};",
                      "@!stale bra DONE;", "and.b32 seen, polls, 255;", "setp.ne.u32 stale, seen, 0;",
                      "@stale bra LOAD;", f"ld.volatile.global.u32 failed, [${failed[0]}];",
                      "setp.ne.u32 stale, failed, 0;", "@stale bra DONE;", "LOAD:",
                      *[f"ld.volatile.global.u32 ${o}, [${p}];" for o, p in zip(out, ptr)], "bra CHECK;", "DONE:",
                      "}"])


@gluon.jit
def _pick(g, a: gl.constexpr, b: gl.constexpr, c: gl.constexpr, d: gl.constexpr):
    """The value of the four for GEMV g (a runtime scalar)."""
    return gl.where(g == 0, a, gl.where(g == 1, b, gl.where(g == 2, c, d)))


@gluon.jit
def _split(pid, nprog, N, G):
    """This program's rows [start, end) of a GEMV with N rows: split evenly over the programs in granules of G
    rows (1; 2 for a layer's gate_up, whose rows come in (gate, up) pairs)."""
    return G * (pid * (N // G) // nprog), G * ((pid + 1) * (N // G) // nprog)


@gluon.jit
def _rows(g, pid, nprog, N0: gl.constexpr, N1: gl.constexpr, N2: gl.constexpr, N3: gl.constexpr,
          G2: gl.constexpr):
    """This program's rows [start, end) of GEMV g (a runtime scalar)."""
    start, end = _split(pid, nprog, _pick(g, N0, N1, N2, N3), 1)
    if G2 > 1:
        paired_start, paired_end = _split(pid, nprog, N2, G2)
        start = gl.where(g == 2, paired_start, start)
        end = gl.where(g == 2, paired_end, end)
    return start, end


@gluon.jit
def _packed(g, PACKED: gl.constexpr):
    """Whether GEMV g's units are packed (bit g of PACKED): a GEMV with at most BR / 2 rows per program fills a
    tile with its rows for two consecutive K tiles (rows i and i + BR / 2 of the tile are one weight row's two
    halves), so the dot warps' fixed cost per unit is spent on twice the bytes."""
    return ((PACKED >> g) & 1) == 1


@gluon.jit
def _units(pid, nprog, N: gl.constexpr, K: gl.constexpr, BR: gl.constexpr, BK: gl.constexpr, G: gl.constexpr,
           P: gl.constexpr):
    """How many units one GEMV [N, K] gives this program (P: packed)."""
    start, end = _split(pid, nprog, N, G)
    return gl.cdiv(end - start, BR // (1 + P)) * gl.cdiv(K, BK * (1 + P))


@gluon.jit
def _total_units(layers, pid, nprog, N0: gl.constexpr, K0: gl.constexpr, N1: gl.constexpr, K1: gl.constexpr,
                 N2: gl.constexpr, K2: gl.constexpr, N3: gl.constexpr, K3: gl.constexpr, BR: gl.constexpr,
                 BK: gl.constexpr, G2: gl.constexpr, PACKED: gl.constexpr):
    """How many units this program walks over the whole chain."""
    return layers * (_units(pid, nprog, N0, K0, BR, BK, 1, PACKED & 1)
                     + _units(pid, nprog, N1, K1, BR, BK, 1, (PACKED >> 1) & 1)
                     + _units(pid, nprog, N2, K2, BR, BK, G2, (PACKED >> 2) & 1)
                     + _units(pid, nprog, N3, K3, BR, BK, 1, (PACKED >> 3) & 1))


@gluon.jit
def _first_unit(pid, nprog, N0: gl.constexpr):
    """(layer, GEMV, row, K offset) of this program's first unit: layer 0's qkv, its first row."""
    zero = pid * 0
    return zero, zero, pid * N0 // nprog, zero


@gluon.jit
def _advance(layer, g, row, kk, pid, nprog, N0: gl.constexpr, K0: gl.constexpr, N1: gl.constexpr,
             K1: gl.constexpr, N2: gl.constexpr, K2: gl.constexpr, N3: gl.constexpr, K3: gl.constexpr,
             BR: gl.constexpr, BK: gl.constexpr, G2: gl.constexpr, PACKED: gl.constexpr):
    """The unit after (layer, g, row, kk) in this program's sequence: next K tile(s), next row block, next
    GEMV."""
    packed = _packed(g, PACKED)
    kk += gl.where(packed, 2 * BK, BK)
    if kk >= _pick(g, K0, K1, K2, K3):
        kk = 0
        row += gl.where(packed, BR // 2, BR)
        if row >= _rows(g, pid, nprog, N0, N1, N2, N3, G2)[1]:
            g += 1
            if g == 4:
                g = 0
                layer += 1
            row = _rows(g, pid, nprog, N0, N1, N2, N3, G2)[0]
    return layer, g, row, kk


@gluon.jit
def _issue(W0, W1, W2, W3, slot, layer, g, row, kk, pid, nprog, N0: gl.constexpr, K0: gl.constexpr,
           N1: gl.constexpr, K1: gl.constexpr, N2: gl.constexpr, K2: gl.constexpr, N3: gl.constexpr,
           K3: gl.constexpr, BR: gl.constexpr, BK: gl.constexpr, G2: gl.constexpr, PACKED: gl.constexpr,
           COPY: gl.constexpr):
    """cp.async of one unit's weight tile [BR, BK] into `slot` (packed: BR / 2 rows, two K tiles); rows past this
    program's range and columns past K are not read (the copy fills zeros)."""
    packed = _packed(g, PACKED)
    r = gl.arange(0, BR, gl.SliceLayout(1, COPY))
    rows = row + gl.where(packed, r % (BR // 2), r)
    cols = kk + gl.expand_dims(gl.where(packed, r // (BR // 2), 0) * BK, 1) \
        + gl.expand_dims(gl.arange(0, BK, gl.SliceLayout(0, COPY)), 0)
    end = _rows(g, pid, nprog, N0, N1, N2, N3, G2)[1]
    k = _pick(g, K0, K1, K2, K3)
    mask = gl.expand_dims(rows < end, 1) & (cols < k)
    # one copy whose base is chosen (Triton 3.6 cannot lower cp.async inside branches)
    base = gl.where(g == 0, W0, gl.where(g == 1, W1, gl.where(g == 2, W2, W3)))
    base += layer.to(gl.int64) * _pick(g, N0, N1, N2, N3) * k
    cp.async_copy_global_to_shared(slot, base + gl.expand_dims(rows, 1) * k + cols, mask)


@gluon.jit
def _unit_bytes(g, row, kk, pid, nprog: gl.constexpr, N0: gl.constexpr, K0: gl.constexpr, N1: gl.constexpr,
                K1: gl.constexpr, N2: gl.constexpr, K2: gl.constexpr, N3: gl.constexpr, K3: gl.constexpr,
                BR: gl.constexpr, BK: gl.constexpr, G2: gl.constexpr, PACKED: gl.constexpr):
    """Bytes a unit at (g, row, kk) reads: its rows inside this program's range, its columns inside K."""
    packed = _packed(g, PACKED)
    end = _rows(g, pid, nprog, N0, N1, N2, N3, G2)[1]
    columns = gl.minimum(_pick(g, K0, K1, K2, K3) - kk, gl.where(packed, 2 * BK, BK))
    return gl.minimum(end - row, gl.where(packed, BR // 2, BR)) * columns * 2


@gluon.jit
def _produce(W0, W1, W2, W3, ring, ready, empty, i, layer, g, row, kk, landed, l_layer, l_g, l_row, l_kk, flight, pid,
             nprog: gl.constexpr, N0: gl.constexpr, K0: gl.constexpr, N1: gl.constexpr, K1: gl.constexpr,
             N2: gl.constexpr, K2: gl.constexpr, N3: gl.constexpr, K3: gl.constexpr, BR: gl.constexpr,
             BK: gl.constexpr, STAGES: gl.constexpr, CAP: gl.constexpr, G2: gl.constexpr, PACKED: gl.constexpr,
             COPY: gl.constexpr):
    """Unit i into ring slot i % STAGES, once the dot warps have released it and the bytes still on their way,
    with it, stay within CAP (see _ws_producer)."""
    slot = i % STAGES
    mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)  # a fresh barrier passes the first round
    size = _unit_bytes(g, row, kk, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR, BK, G2, PACKED)
    # retire landed units: every unit whose slot the dot warps released (landed, and its ready barrier may
    # already be armed again, so no wait), then more, waiting for each, until this one fits under CAP
    while (landed <= i - STAGES) | ((flight + size > CAP) & (landed < i)):
        if landed > i - STAGES:
            mbarrier.wait(ready.index(landed % STAGES), (landed // STAGES) & 1)
        flight -= _unit_bytes(l_g, l_row, l_kk, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR, BK, G2, PACKED)
        l_layer, l_g, l_row, l_kk = _advance(l_layer, l_g, l_row, l_kk, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3,
                                             BR, BK, G2, PACKED)
        landed += 1
    _issue(W0, W1, W2, W3, ring.index(slot), layer, g, row, kk, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR,
           BK, G2, PACKED, COPY)
    cp.mbarrier_arrive(ready.index(slot), increment_count=False)  # each copy thread, once its copies land
    layer, g, row, kk = _advance(layer, g, row, kk, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR, BK, G2, PACKED)
    return i + 1, layer, g, row, kk, landed, l_layer, l_g, l_row, l_kk, flight + size


@gluon.jit
def _issue_attention(KC, VC, QKNORM, ROPE, kv_smem, norm_smem, rope_smem, layer, T, tmax, pid, KVH: gl.constexpr,
                     SPLITS: gl.constexpr, HD: gl.constexpr, KVP: gl.constexpr, PWARPS: gl.constexpr):
    """What a layer's attention unit needs that does not depend on the step, copied ahead into its own buffers:
    the split's first KVP cached positions (k then v per row), the q/k norm weights, cos and sin."""
    KVL: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [PWARPS, 1], [1, 0])  # [KVP, HD]
    NL: gl.constexpr = gl.BlockedLayout([2], [32], [PWARPS], [0])  # [HD]
    RL: gl.constexpr = gl.BlockedLayout([1], [32], [PWARPS], [0])  # [HD / 2]
    split = pid % SPLITS
    start = split * (T - 1) // SPLITS
    stop = gl.where(pid < KVH * SPLITS, (split + 1) * (T - 1) // SPLITS, start)
    positions = start + gl.arange(0, KVP, gl.SliceLayout(1, KVL))
    at = ((layer * KVH + pid // SPLITS) * tmax + gl.expand_dims(positions, 1)).to(gl.int64) * HD \
        + gl.expand_dims(gl.arange(0, HD, gl.SliceLayout(0, KVL)), 0)
    inside = gl.expand_dims(positions < stop, 1) & (at >= 0)
    cp.async_copy_global_to_shared(kv_smem.slice(0, HD, dim=1), KC + at, inside)
    cp.async_copy_global_to_shared(kv_smem.slice(HD, HD, dim=1), VC + at, inside)
    for j in gl.static_range(2):  # q_norm and k_norm; cos and sin
        cp.async_copy_global_to_shared(norm_smem.index(j), QKNORM + (layer * 2 + j) * HD + gl.arange(0, HD, NL))
        cp.async_copy_global_to_shared(rope_smem.index(j), ROPE + j * (HD // 2) + gl.arange(0, HD // 2, RL))


@gluon.jit
def _ws_producer(W0, W1, W2, W3, KC, VC, QKNORM, ROPE, POS, tmax, ring, ready, empty, kv_smem, norm_smem, rope_smem,
                 kv_ready, kv_empty, layers, pid, nprog: gl.constexpr, N0: gl.constexpr, K0: gl.constexpr,
                 N1: gl.constexpr, K1: gl.constexpr, N2: gl.constexpr, K2: gl.constexpr, N3: gl.constexpr,
                 K3: gl.constexpr, BR: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, PWARPS: gl.constexpr,
                 CAP: gl.constexpr, PACKED: gl.constexpr, KVH: gl.constexpr, SPLITS: gl.constexpr, HD: gl.constexpr,
                 KVP: gl.constexpr):
    """The copy warps: fill ring slot i % STAGES with unit i as soon as the dot warps have released it and the
    bytes still on their way, with it, stay within CAP. Outstanding copies delay every other read of the GPU
    (the activation polls queue behind them: a GEMV's last rows reached its readers 4.75 us after the store
    with 192 KB per SM in flight, 1.5 us with 64 KB), so the ring should hold landed tiles, not outstanding
    ones; and the cap is in bytes because a unit's valid rows vary (19 of 64 in o_proj, all 64 in gate_up).
    After each layer's qkv units they also copy what its attention unit will read from HBM into buffers of its
    own (_issue_attention; HBM reads wait behind the weight stream, 5.6 us, so none may be on the attention's
    critical path). The loop runs per layer so that copy is not inside a branch."""
    COPY: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [PWARPS, 1], [1, 0])
    G2: gl.constexpr = 2  # gate_up's rows come in (gate, up) pairs
    # positions cached after this step, from device memory (graphs replay it), read once: a read between the
    # weight copies waits behind them
    T = gl.load(POS).to(gl.int32) + 1
    qkv_units = _units(pid, nprog, N0, K0, BR, BK, 1, PACKED & 1)
    other_units = _total_units(1, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR, BK, G2, PACKED) - qkv_units
    i = pid * 0
    layer, g, row, kk = _first_unit(pid, nprog, N0)
    # the oldest unit not yet known to have landed (its cursor), and the bytes issued since
    landed = pid * 0
    l_layer, l_g, l_row, l_kk = _first_unit(pid, nprog, N0)
    flight = pid * 0
    for each_layer in range(layers):
        for _ in range(qkv_units):
            i, layer, g, row, kk, landed, l_layer, l_g, l_row, l_kk, flight = _produce(
                W0, W1, W2, W3, ring, ready, empty, i, layer, g, row, kk, landed, l_layer, l_g, l_row, l_kk, flight,
                pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR, BK, STAGES, CAP, G2, PACKED, COPY)
        mbarrier.wait(kv_empty, (each_layer & 1) ^ 1)  # the dot warps are done with the layer before's
        _issue_attention(KC, VC, QKNORM, ROPE, kv_smem, norm_smem, rope_smem, each_layer, T, tmax, pid, KVH, SPLITS,
                         HD, KVP, PWARPS)
        cp.mbarrier_arrive(kv_ready, increment_count=False)
        for _ in range(other_units):
            i, layer, g, row, kk, landed, l_layer, l_g, l_row, l_kk, flight = _produce(
                W0, W1, W2, W3, ring, ready, empty, i, layer, g, row, kk, landed, l_layer, l_g, l_row, l_kk, flight,
                pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR, BK, STAGES, CAP, G2, PACKED, COPY)


@gluon.jit
def _store_words(OUT, value, mask, epoch):
    """Publish values as activation words at the pointers OUT: bf16 bits low, the run's epoch high."""
    bits = value.to(gl.bfloat16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    gl.store(OUT, bits | (epoch << 16), mask=mask)


@gluon.jit
def _store_rows(OUT, value, rows, end, epoch):
    """Publish finished rows [0, end) as words."""
    _store_words(OUT + rows, value, rows < end, epoch)


@gluon.jit
def _store_silu_pairs(OUT, SCRATCH, value, row, end, epoch, out_rows, pairs):
    """Publish silu(gate) * up for a block of gate_up's (gate, up) output row pairs starting at `row` (even),
    with the engine's rounding (silu rounded to bf16 first). The two rows of a pair may sit in different threads,
    so they are traded through this program's scratch row."""
    gl.store(SCRATCH + out_rows, value)
    gl.thread_barrier()
    gate = gl.load(SCRATCH + 2 * pairs, volatile=True)
    up = gl.load(SCRATCH + 2 * pairs + 1, volatile=True)
    gl.thread_barrier()  # read before the next row block overwrites them
    silu = (gate / (1.0 + gl.exp(-gate))).to(gl.bfloat16).to(gl.float32)
    _store_rows(OUT, silu * up, row // 2 + pairs, end // 2, epoch)


@gluon.jit
def _fold_halves(SCRATCH, value, out_rows, halves, HALF: gl.constexpr):
    """A packed unit's rows: tile rows i and i + HALF hold one weight row's two K halves; their sums are traded
    through this program's scratch row and added (in a fixed order: reruns stay bit-exact)."""
    gl.store(SCRATCH + out_rows, value)
    gl.thread_barrier()
    folded = gl.load(SCRATCH + halves, volatile=True) + gl.load(SCRATCH + HALF + halves, volatile=True)
    gl.thread_barrier()  # read before the next row block overwrites them
    return folded


@gluon.jit
def _finish_rows(ACTS, OUT, value, rows, end, layer, g, epoch, WIDE: gl.constexpr):
    """Store finished rows; after o_proj and down, with the residual added by the rows' owner."""
    value = value.to(gl.bfloat16).to(gl.float32)
    if g % 2 == 1:
        # the residual stream's rows, which this program stored itself (o_proj and down split their rows
        # alike): the layer's input for o_proj, o_proj's output for down
        residual = ACTS + (layer * 4 + g - 1) * WIDE
        value += (gl.load(residual + rows, mask=rows < end, other=0, volatile=True) & 0xFFFF).to(
            gl.int16).to(gl.bfloat16, bitcast=True).to(gl.float32)
    _store_rows(OUT, value, rows, end, epoch)


@gluon.jit
def _x_operand(x_smem, q: gl.constexpr, CH: gl.constexpr, second, zero_b, B_OP: gl.constexpr,
               PACKED_UNIT: gl.constexpr):
    """The dot's narrow operand for K quarter q: the activation tile in every column, but for a packed unit the
    second K tile's in column 1."""
    first = zero_b + gl.expand_dims(x_smem.index(0).slice(q * CH, CH).load(gl.SliceLayout(1, B_OP)), 1)
    if PACKED_UNIT:
        other = zero_b + gl.expand_dims(x_smem.index(1).slice(q * CH, CH).load(gl.SliceLayout(1, B_OP)), 1)
        first = gl.where(second, other, first)
    return first


@gluon.jit
def _dot_tile(slot, x_smem, second, zero_b, fresh, acc0, acc1, acc2, acc3, CH: gl.constexpr, A_OP: gl.constexpr,
              B_OP: gl.constexpr, PACKED_UNIT: gl.constexpr):
    """One unit's multiply: the weight tile in `slot` times the activation operand, over four K quarters into four
    accumulators (restarted when `fresh`, a row block's first unit)."""
    acc0 = mma_v2(slot.slice(0, CH, dim=1).load(A_OP),
                  _x_operand(x_smem, 0, CH, second, zero_b, B_OP, PACKED_UNIT), gl.where(fresh, 0.0, acc0))
    acc1 = mma_v2(slot.slice(CH, CH, dim=1).load(A_OP),
                  _x_operand(x_smem, 1, CH, second, zero_b, B_OP, PACKED_UNIT), gl.where(fresh, 0.0, acc1))
    acc2 = mma_v2(slot.slice(2 * CH, CH, dim=1).load(A_OP),
                  _x_operand(x_smem, 2, CH, second, zero_b, B_OP, PACKED_UNIT), gl.where(fresh, 0.0, acc2))
    acc3 = mma_v2(slot.slice(3 * CH, CH, dim=1).load(A_OP),
                  _x_operand(x_smem, 3, CH, second, zero_b, B_OP, PACKED_UNIT), gl.where(fresh, 0.0, acc3))
    return acc0, acc1, acc2, acc3


@gluon.jit
def _store_float_words(OUT, value, epoch, mask):
    """fp32 values as two activation words each: the high 16 bits, then the low, under the run's epoch."""
    bits = value.to(gl.int32, bitcast=True)
    gl.store(OUT, ((bits >> 16) & 0xFFFF) | (epoch << 16), mask=mask)
    gl.store(OUT + 1, (bits & 0xFFFF) | (epoch << 16), mask=mask)


@gluon.jit
def _float_from_words(high, low):
    return (((high & 0xFFFF) << 16) | (low & 0xFFFF)).to(gl.float32, bitcast=True)


@gluon.jit
def _partial_words(outputs, stats):
    """A group's partials as published: the output words, then per head the max's and the sum's two words each."""
    return (gl.load(outputs, volatile=True), gl.load(stats, volatile=True), gl.load(stats + 1, volatile=True),
            gl.load(stats + 2, volatile=True), gl.load(stats + 3, volatile=True))


@gluon.jit
def _stale(words, epoch):
    """How many of the block's words are not yet this run's (0 when all are)."""
    return gl.sum(gl.reshape((((words >> 16) & 0xFFFF) != epoch).to(gl.int32), [words.numel]), axis=0)


@gluon.jit
def _kv_rows(KC, VC, cache, p, stop, rows, dims, HD: gl.constexpr):
    """A chunk of cached k and v rows from position p ([position, dim] each, 16-byte loads; positions at or past
    `stop` read as zeros)."""
    inside = p + rows < stop
    at = cache + (p + rows) * HD + dims
    return gl.load(KC + at, mask=inside, other=0.0), gl.load(VC + at, mask=inside, other=0.0)


@gluon.jit
def _attention_chunk(kv_smem, q_smem, p, stop, m, total, out, HD: gl.constexpr, C: gl.constexpr,
                     MMA: gl.constexpr, A_OP: gl.constexpr, B_OP: gl.constexpr):
    """One chunk of the online softmax on the tensor cores, over the C positions from p in kv_smem ([position,
    k then v]; those at or past `stop` masked): scores [head, position] = q k^T, then the running max and sum
    [head] and output [head, dim] updated with the chunk's (p rounded to bf16 for the second mma, as the engine's
    decode_attention rounds it)."""
    keys = kv_smem.slice(0, HD, dim=1).permute((1, 0)).load(B_OP)
    s = mma_v2(q_smem.load(A_OP), keys, gl.zeros([16, C], gl.float32, MMA)) * (HD ** -0.5)
    s = gl.where(gl.expand_dims(p + gl.arange(0, C, gl.SliceLayout(0, MMA)) < stop, 0), s, float("-inf"))
    m_new = gl.maximum(m, gl.max(s, axis=1))
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # no position yet
    alpha = gl.exp(m - m_safe)
    prob = gl.exp(s - gl.expand_dims(m_safe, 1))
    total = total * alpha + gl.sum(prob, axis=1)
    out = mma_v2(gl.convert_layout(prob.to(gl.bfloat16), A_OP), kv_smem.slice(HD, HD, dim=1).load(B_OP),
                 out * gl.expand_dims(alpha, 1))
    return m_new, total, out


@gluon.jit
def _attention_unit(QKV, KC, VC, PART, ACTS, FAILED, epoch, layer, unit, POS, tmax, q_smem, kv_smem, norm_smem,
                    rope_smem, kv_ready, kv_empty, APOLL: gl.constexpr, APOLL_OPERANDS: gl.constexpr, N0: gl.constexpr,
                    WIDE: gl.constexpr, KVH: gl.constexpr, GQ: gl.constexpr, HD: gl.constexpr, SPLITS: gl.constexpr,
                    KVP: gl.constexpr, WARPS: gl.constexpr, EPS: gl.constexpr):
    """One (kv head, context split) unit of a layer's decode attention, by the dot warps between a program's last
    qkv rows and its first o_proj unit: wait for the group's q heads, k and v; q/k RMSNorm and RoPE (rounded as
    the engine's qkv_rope_store rounds); the split holding the new position writes k and v to the cache; an
    online softmax over the split's positions, KVP at a time on the tensor cores; the partial (o / sum, max, sum)
    to PART as activation words. The group's last split waits for the group's partials, sums them in split order
    (reruns stay bit-exact) and publishes the attention output as o_proj's activation words, so o_proj's readers
    wait for it like any GEMV's rows."""
    HALF: gl.constexpr = HD // 2
    PSTRIDE: gl.constexpr = GQ * HD + 4 * GQ  # one partial's words: o / sum [GQ, HD], then per head max and sum
    # [half, row, dim]: the group's q heads, k, v, k, v (8 rows), each as its two halves (d pairs with d + HD / 2
    # in RoPE), 8 words per thread; rows never cross warps, so the norm and RoPE need no shared memory
    H3: gl.constexpr = gl.BlockedLayout([2, 1, 2], [1, 1, 32], [1, WARPS, 1], [2, 1, 0])
    HL: gl.constexpr = gl.SliceLayout(0, H3)  # [row, dim] of one half
    # the softmax's [head, position] scores and [head, dim] output, the heads as q_smem's 16 rows (the group's GQ,
    # then k and v, then zeros: only the first GQ are kept), the positions or dims split over the warps, so the
    # reductions over a chunk's positions cross warps once each (the engine's decode_attention has this shape)
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, WARPS], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    KVL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])  # [position, dim] of a K or V chunk
    kvh = unit // SPLITS
    split = unit % SPLITS
    last = split == SPLITS - 1  # the split that adds the new position
    # the copy warps have put the norm weights, cos and sin and the split's first KVP cached positions in shared
    # memory; the next KVP are loaded into registers here, before the wait for qkv, and each chunk after that one
    # chunk ahead of its use (the new position is taken from q_smem: nothing here reads the cache after writing it)
    hr = gl.expand_dims(gl.arange(0, 8, gl.SliceLayout(1, HL)), 1)
    hd = gl.expand_dims(gl.arange(0, HALF, gl.SliceLayout(0, HL)), 0)
    kv_row = hr >= GQ
    T = gl.load(POS).to(gl.int32) + 1  # loaded here, not held across the consumer's loop (its registers are full)
    start = split * (T - 1) // SPLITS
    stop = (split + 1) * (T - 1) // SPLITS
    cache = (layer * KVH + kvh) * tmax * HD
    chunk_rows = gl.expand_dims(gl.arange(0, KVP, gl.SliceLayout(1, KVL)), 1)
    chunk_dims = gl.expand_dims(gl.arange(0, HD, gl.SliceLayout(0, KVL)), 0)
    k_ahead, v_ahead = _kv_rows(KC, VC, cache, start + KVP, stop, chunk_rows, chunk_dims, HD)
    # wait for the group's qkv rows: GQ q heads, then k and v (twice over: the layout has 8 rows)
    half = gl.expand_dims(gl.expand_dims(gl.arange(0, 2, gl.SliceLayout(1, gl.SliceLayout(2, H3))), 1), 2)
    row = gl.expand_dims(gl.expand_dims(gl.arange(0, 8, gl.SliceLayout(0, gl.SliceLayout(2, H3))), 0), 2)
    dim = gl.expand_dims(gl.expand_dims(gl.arange(0, HALF, gl.SliceLayout(0, gl.SliceLayout(1, H3))), 0), 1)
    source = gl.where(row >= GQ, (GQ + (row - GQ) % 2) * KVH * HD + kvh * HD, (kvh * GQ + row) * HD)
    zero = gl.zeros([2, 8, HALF], gl.int32, H3)
    words = gl.inline_asm_elementwise(APOLL, APOLL_OPERANDS,
                                      [QKV + layer * N0 + source + half * HALF + dim, zero + epoch, zero,
                                       FAILED + zero], dtype=gl.int32, is_pure=False, pack=8)
    gl.atomic_max(FAILED + zero, zero + 1, mask=((words >> 16) & 0xFFFF) != epoch)
    x = (words & 0xFFFF).to(gl.int16).to(gl.bfloat16, bitcast=True).to(gl.float32)
    mbarrier.wait(kv_ready, layer & 1)
    VEC: gl.constexpr = gl.SliceLayout(0, HL)
    weight_lo = gl.where(kv_row, gl.expand_dims(norm_smem.index(1).slice(0, HALF).load(VEC), 0),
                         gl.expand_dims(norm_smem.index(0).slice(0, HALF).load(VEC), 0)).to(gl.float32)
    weight_hi = gl.where(kv_row, gl.expand_dims(norm_smem.index(1).slice(HALF, HALF).load(VEC), 0),
                         gl.expand_dims(norm_smem.index(0).slice(HALF, HALF).load(VEC), 0)).to(gl.float32)
    cos = gl.expand_dims(rope_smem.index(0).load(VEC), 0)
    sin = gl.expand_dims(rope_smem.index(1).load(VEC), 0)
    lo = gl.sum(gl.where(half == 0, x, 0.0), axis=0)
    hi = gl.sum(gl.where(half == 1, x, 0.0), axis=0)
    # q/k RMSNorm over each head (v rows untouched), then RoPE
    v_rows = kv_row & ((hr - GQ) % 2 == 1)
    scale = gl.expand_dims(gl.rsqrt((gl.sum(lo * lo, axis=1) + gl.sum(hi * hi, axis=1)) / HD + EPS), 1)
    lo = gl.where(v_rows, lo, (weight_lo * (lo * scale).to(gl.bfloat16).to(gl.float32)).to(gl.bfloat16).to(
        gl.float32))
    hi = gl.where(v_rows, hi, (weight_hi * (hi * scale).to(gl.bfloat16).to(gl.float32)).to(gl.bfloat16).to(
        gl.float32))
    rot_lo = ((lo * cos).to(gl.bfloat16).to(gl.float32) + (-hi * sin).to(gl.bfloat16).to(gl.float32)).to(
        gl.bfloat16).to(gl.float32)
    rot_hi = ((hi * cos).to(gl.bfloat16).to(gl.float32) + (lo * sin).to(gl.bfloat16).to(gl.float32)).to(
        gl.bfloat16).to(gl.float32)
    lo = gl.where(v_rows, lo, rot_lo)
    hi = gl.where(v_rows, hi, rot_hi)
    # the last split stores the new position's k and v in the cache (for the steps after this one)
    new = ((layer * KVH + kvh) * tmax + T - 1) * HD + hd + hr * 0
    gl.store(KC + new, lo.to(gl.bfloat16), mask=last & (hr == GQ))
    gl.store(KC + new + HALF, hi.to(gl.bfloat16), mask=last & (hr == GQ))
    gl.store(VC + new, lo.to(gl.bfloat16), mask=last & (hr == GQ + 1))
    gl.store(VC + new + HALF, hi.to(gl.bfloat16), mask=last & (hr == GQ + 1))
    # the 8 rows as q_smem's first (bf16 already: exact); its rows 8-15 stay zero
    q_smem.slice(0, 8, dim=0).slice(0, HALF, dim=1).store(lo.to(gl.bfloat16))
    q_smem.slice(0, 8, dim=0).slice(HALF, HALF, dim=1).store(hi.to(gl.bfloat16))
    gl.thread_barrier()
    # online softmax over the split's cached positions: the first KVP as the copy warps left them in kv_smem, the
    # rest through kv_smem too, stored there from registers a chunk at a time
    m = gl.full([16], float("-inf"), gl.float32, gl.SliceLayout(1, MMA))
    total = gl.zeros([16], gl.float32, gl.SliceLayout(1, MMA))
    o_acc = gl.zeros([16, HD], gl.float32, MMA)
    if start < stop:
        m, total, o_acc = _attention_chunk(kv_smem, q_smem, start, stop, m, total, o_acc, HD, KVP, MMA, A_OP, B_OP)
    for p in range(start + KVP, stop, KVP):
        gl.thread_barrier()  # every warp is done with the chunk before
        kv_smem.slice(0, HD, dim=1).store(k_ahead)
        kv_smem.slice(HD, HD, dim=1).store(v_ahead)
        gl.thread_barrier()
        k_ahead, v_ahead = _kv_rows(KC, VC, cache, p + KVP, stop, chunk_rows, chunk_dims, HD)
        m, total, o_acc = _attention_chunk(kv_smem, q_smem, p, stop, m, total, o_acc, HD, KVP, MMA, A_OP, B_OP)
    gl.thread_barrier()  # every warp is done with kv_smem before the copy warps may refill it
    mbarrier.arrive(kv_empty)
    if last:  # the new position: its k and v are q_smem's rows GQ and GQ + 1
        q_rows = q_smem.load(MMA).to(gl.float32)
        head_rows = gl.expand_dims(gl.arange(0, 16, gl.SliceLayout(1, MMA)), 1)
        k_new = gl.expand_dims(gl.sum(gl.where(head_rows == GQ, q_rows, 0.0), axis=0), 0)
        v_new = gl.expand_dims(gl.sum(gl.where(head_rows == GQ + 1, q_rows, 0.0), axis=0), 0)
        s_new = gl.sum(q_rows * k_new, axis=1) * (HD ** -0.5)
        m_new = gl.maximum(m, s_new)
        alpha = gl.exp(m - m_new)
        prob = gl.exp(s_new - m_new)
        total = total * alpha + prob
        o_acc = o_acc * gl.expand_dims(alpha, 1) + gl.expand_dims(prob, 1) * v_new
        m = m_new
    # the partial as activation words (no fence, no atomic: each word says itself whether it is this run's): the
    # output divided by its sum as bf16, the max and the sum as fp32 in two words each
    group = (layer * KVH + kvh) * SPLITS
    part = PART + (group + split) * PSTRIDE
    heads = gl.arange(0, 16, gl.SliceLayout(1, MMA))
    at = gl.expand_dims(heads, 1) * HD + gl.expand_dims(gl.arange(0, HD, gl.SliceLayout(0, MMA)), 0)
    _store_rows(part, o_acc * gl.expand_dims(gl.where(total > 0, 1.0 / total, 0.0), 1), at, GQ * HD, epoch)
    _store_float_words(part + GQ * HD + heads * 4, m, epoch, heads < GQ)
    _store_float_words(part + GQ * HD + heads * 4 + 2, total, epoch, heads < GQ)
    if last:  # the group's output, from all its splits' partials (in split order: reruns stay bit-exact)
        # [split, head, dim], a warp per head and the splits inside each thread: the sums over splits need no
        # shuffles or shared memory
        O3: gl.constexpr = gl.BlockedLayout([SPLITS, 1, 4], [1, 1, 32], [1, WARPS, 1], [2, 1, 0])
        W2: gl.constexpr = gl.SliceLayout(2, O3)  # [split, head]
        splits = gl.expand_dims(gl.arange(0, SPLITS, gl.SliceLayout(1, W2)), 1)
        head = gl.expand_dims(gl.arange(0, GQ, gl.SliceLayout(0, W2)), 0)
        stats = PART + (group + splits) * PSTRIDE + GQ * HD + head * 4
        head_dim = gl.expand_dims(gl.expand_dims(gl.arange(0, HD, gl.SliceLayout(0, gl.SliceLayout(0, O3))), 0), 0)
        outputs = PART + (group + gl.expand_dims(splits, 2)) * PSTRIDE + gl.expand_dims(head, 2) * HD + head_dim
        # all of the words read together, again until none is stale (waiting word group by word group costs a
        # round trip per group)
        output_words, m_high, m_low, sum_high, sum_low = _partial_words(outputs, stats)
        polls = 0
        while (_stale(output_words, epoch) + _stale(m_high, epoch) + _stale(m_low, epoch) + _stale(sum_high, epoch)
               + _stale(sum_low, epoch) > 0) & (polls < SPIN):
            output_words, m_high, m_low, sum_high, sum_low = _partial_words(outputs, stats)
            polls += 1
        if polls == SPIN:
            gl.atomic_max(FAILED, 1)
        m_s = _float_from_words(m_high, m_low)
        sum_s = _float_from_words(sum_high, sum_low)
        m_max = gl.max(m_s, axis=0)
        share = gl.where(m_s == float("-inf"), 0.0,
                         gl.exp(m_s - gl.expand_dims(gl.where(m_max == float("-inf"), 0.0, m_max), 0))) * sum_s
        partial = (output_words & 0xFFFF).to(gl.int16).to(gl.bfloat16, bitcast=True).to(gl.float32)
        denominator = gl.convert_layout(gl.sum(share, axis=0), gl.SliceLayout(1, gl.SliceLayout(0, O3)))
        out = gl.sum(gl.expand_dims(share, 2) * partial, axis=0) / gl.expand_dims(denominator, 1)
        rows = gl.expand_dims(gl.arange(0, GQ, gl.SliceLayout(1, gl.SliceLayout(0, O3))), 1) * HD \
            + gl.expand_dims(gl.arange(0, HD, gl.SliceLayout(0, gl.SliceLayout(0, O3))), 0)
        _store_rows(ACTS + (layer * 4 + 1) * WIDE + kvh * GQ * HD, out, rows, GQ * HD, epoch)


@gluon.jit
def _ws_consumer(ACTS, NORMS, SCRATCH, EPOCH, FAILED, QKV, KC, VC, PART, POS, tmax, ring, ready, empty, x_smem,
                 q_smem, kv_smem, norm_smem, rope_smem, kv_ready, kv_empty, layers, pid, nprog: gl.constexpr,
                 N0: gl.constexpr, K0: gl.constexpr, N1: gl.constexpr, K1: gl.constexpr, N2: gl.constexpr,
                 K2: gl.constexpr, N3: gl.constexpr, K3: gl.constexpr, WIDE: gl.constexpr,
                 BR: gl.constexpr, BK: gl.constexpr, NPAD: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr,
                 POLL: gl.constexpr, POLL_OPERANDS: gl.constexpr, PACK: gl.constexpr, PACKED: gl.constexpr,
                 APOLL: gl.constexpr, APOLL_OPERANDS: gl.constexpr, KVH: gl.constexpr, GQ: gl.constexpr,
                 HD: gl.constexpr, SPLITS: gl.constexpr, KVP: gl.constexpr, EPS: gl.constexpr):
    """The dot warps: per unit, wait for its activations and its weight slot, multiply, release the slot, and
    store the finished rows, doing the layer's other work where the data already is (the module's docstring says
    how) and its attention between qkv and o_proj (_attention_unit)."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    X: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    CH: gl.constexpr = BK // 4
    G2: gl.constexpr = 2  # gate_up's rows come in (gate, up) pairs
    epoch = gl.load(EPOCH) % 65535 + 1
    total = _total_units(layers, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR, BK, G2, PACKED)
    c_layer, c_g, c_row, c_kk = _first_unit(pid, nprog, N0)
    xs = gl.arange(0, BK, X)
    epochs = gl.full([BK], 0, gl.int32, X) + epoch
    words = gl.load(ACTS + xs, volatile=True)
    words2 = words  # a packed unit's second K tile (layer 0's qkv is not packed)
    norm_weights = gl.load(NORMS + xs, mask=xs >= 0, other=0.0)
    squares = gl.zeros([BK], gl.float32, X)
    cols = gl.arange(0, NPAD, gl.SliceLayout(0, MMA))
    out_rows = gl.arange(0, BR, gl.SliceLayout(1, MMA))
    pairs = gl.arange(0, BR // 2, X)
    zero_b = gl.zeros([CH, NPAD], gl.bfloat16, B_OP)
    b_cols = gl.expand_dims(gl.arange(0, NPAD, gl.SliceLayout(0, B_OP)), 0)
    second = (gl.zeros([CH, NPAD], gl.int32, B_OP) + b_cols) == 1  # the operand's column for a second K tile
    acc0 = gl.zeros([BR, NPAD], gl.float32, MMA)
    acc1 = gl.zeros([BR, NPAD], gl.float32, MMA)
    acc2 = gl.zeros([BR, NPAD], gl.float32, MMA)
    acc3 = gl.zeros([BR, NPAD], gl.float32, MMA)
    for i in range(total):
        n_layer, n_g, n_row, n_kk = _advance(c_layer, c_g, c_row, c_kk, pid, nprog, N0, K0, N1, K1, N2, K2,
                                             N3, K3, BR, BK, G2, PACKED)
        next_words = gl.load(ACTS + (n_layer * 4 + n_g) * WIDE + n_kk + xs, mask=(n_layer < layers) & (xs >= 0),
                             volatile=True)
        next_words2 = gl.load(ACTS + (n_layer * 4 + n_g) * WIDE + n_kk + BK + xs,
                              mask=(n_layer < layers) & _packed(n_g, PACKED)
                              & (n_kk + BK + xs < _pick(n_g, K0, K1, K2, K3)), other=0, volatile=True)
        # qkv's and gate_up's inputs are RMSNormed: the norm weights' tile too
        next_norm = gl.load(NORMS + (n_layer * 2 + n_g // 2) * K0 + n_kk + xs,
                            mask=(n_layer < layers) & (n_g % 2 == 0) & (xs >= 0), other=0.0)
        act = ACTS + (c_layer * 4 + c_g) * WIDE
        packed = _packed(c_g, PACKED)
        k_now = _pick(c_g, K0, K1, K2, K3)
        has_second = packed & (c_kk + BK < k_now)
        words = gl.inline_asm_elementwise(POLL, POLL_OPERANDS, [act + c_kk + xs, epochs, words, FAILED + xs * 0],
                                          dtype=gl.int32, is_pure=False, pack=PACK)
        stale = ((words >> 16) & 0xFFFF) != epoch
        if has_second:
            words2 = gl.inline_asm_elementwise(POLL, POLL_OPERANDS,
                                               [act + c_kk + BK + xs, epochs, words2, FAILED + xs * 0],
                                               dtype=gl.int32, is_pure=False, pack=PACK)
            stale = stale | (((words2 >> 16) & 0xFFFF) != epoch)
        gl.atomic_max(FAILED + xs * 0, gl.full([BK], 1, gl.int32, X), mask=stale)
        x = (words & 0xFFFF).to(gl.int16).to(gl.bfloat16, bitcast=True)
        x2 = gl.where(has_second, (words2 & 0xFFFF).to(gl.int16).to(gl.bfloat16, bitcast=True), 0.0)
        if c_g % 2 == 0:
            # RMSNorm with its scale taken out of the dot: x * weight goes in, the sum of squares builds up over
            # the K tiles, and the row block's outputs are scaled once all are in (the reader cannot know the
            # scale before the whole vector is there, and waiting for it is a grid barrier)
            xf = x.to(gl.float32)
            squares = gl.where(c_kk == 0, 0.0, squares) + xf * xf
            x = (xf * norm_weights.to(gl.float32)).to(gl.bfloat16)
        x_smem.index(0).store(x)
        if packed:
            x_smem.index(1).store(x2.to(gl.bfloat16))
        gl.thread_barrier()
        slot = ring.index(i % STAGES)
        mbarrier.wait(ready.index(i % STAGES), (i // STAGES) & 1)
        fresh = c_kk == 0
        if packed:  # the second K tile's operand column costs a load and a select: only where it is used
            acc0, acc1, acc2, acc3 = _dot_tile(slot, x_smem, second, zero_b, fresh, acc0, acc1, acc2, acc3, CH,
                                               A_OP, B_OP, True)
        else:
            acc0, acc1, acc2, acc3 = _dot_tile(slot, x_smem, second, zero_b, fresh, acc0, acc1, acc2, acc3, CH,
                                               A_OP, B_OP, False)
        mbarrier.arrive(empty.index(i % STAGES))
        if c_kk + gl.where(packed, 2 * BK, BK) >= k_now:
            # a row's sum: column 0, or for a packed unit's second half of the tile column 1 (its second K tile)
            half = gl.where(packed, out_rows // (BR // 2), 0)
            value = gl.sum(gl.where(gl.expand_dims(cols, 0) == gl.expand_dims(half, 1), (acc0 + acc1) + (acc2 + acc3),
                                    0.0), axis=1)
            end = _rows(c_g, pid, nprog, N0, N1, N2, N3, G2)[1]
            if packed:
                _finish_rows(ACTS, act + WIDE, _fold_halves(SCRATCH + pid * BR, value, out_rows, pairs, BR // 2),
                             c_row + pairs, end, c_layer, c_g, epoch, WIDE)
            else:
                if c_g % 2 == 0:
                    value *= gl.rsqrt(gl.sum(squares, axis=0) / k_now + EPS)
                if c_g == 2:
                    _store_silu_pairs(act + WIDE, SCRATCH + pid * BR, value.to(gl.bfloat16).to(gl.float32), c_row,
                                      end, epoch, out_rows, pairs)
                else:
                    out = act + WIDE
                    if c_g == 0:  # qkv's rows go to attention, whose output o_proj reads
                        out = QKV + c_layer * N0
                    _finish_rows(ACTS, out, value, c_row + out_rows, end, c_layer, c_g, epoch, WIDE)
        if (c_g == 0) & (n_g == 1) & (pid >= KVH * SPLITS):  # no unit: the copy warps may go on anyway
            mbarrier.arrive(kv_empty)
        if (c_g == 0) & (n_g == 1) & (pid < KVH * SPLITS):  # this program's last qkv rows are out
            _attention_unit(QKV, KC, VC, PART, ACTS, FAILED, epoch, c_layer, pid, POS, tmax, q_smem, kv_smem,
                            norm_smem, rope_smem, kv_ready, kv_empty, APOLL, APOLL_OPERANDS, N0, WIDE, KVH, GQ, HD,
                            SPLITS, KVP, WARPS, EPS)
        c_layer, c_g, c_row, c_kk = n_layer, n_g, n_row, n_kk
        words = next_words
        words2 = next_words2
        norm_weights = next_norm


@gluon.jit
def _flow_chain(W0, W1, W2, W3, ACTS, NORMS, SCRATCH, EPOCH, FAILED, QKV, KC, VC, QKNORM, ROPE, PART, POS, tmax,
                layers, nprog: gl.constexpr,
                N0: gl.constexpr, K0: gl.constexpr, N1: gl.constexpr, K1: gl.constexpr, N2: gl.constexpr,
                K2: gl.constexpr, N3: gl.constexpr, K3: gl.constexpr, WIDE: gl.constexpr, BR: gl.constexpr,
                BK: gl.constexpr, NPAD: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr,
                POLL: gl.constexpr, POLL_OPERANDS: gl.constexpr, PACK: gl.constexpr, PWARPS: gl.constexpr,
                PREGS: gl.constexpr, CAP: gl.constexpr, PACKED: gl.constexpr, APOLL: gl.constexpr,
                APOLL_OPERANDS: gl.constexpr, KVH: gl.constexpr, GQ: gl.constexpr, HD: gl.constexpr,
                SPLITS: gl.constexpr, KVP: gl.constexpr, EPS: gl.constexpr):
    """The flow kernel with its copies in their own warps (warp specialization): the copy warps and the dot
    warps run side by side, so a unit costs the longer of the two instead of their sum."""
    ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BR, BK],
                                     gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0]))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=32 * PWARPS)
        mbarrier.init(empty.index(s), count=1)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [2, BK], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    # an attention unit's q heads, k and v after RMSNorm and RoPE, as the softmax's first mma operand: 16 rows, the
    # last 8 zero for good
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [16, HD],
                                       gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0]),
                                       gl.zeros([16, HD], gl.bfloat16,
                                                gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])))
    # what the copy warps fetch for a layer's attention unit ahead of it (_issue_attention): the split's first
    # KVP cached positions, the q/k norm weights, cos and sin; with barriers like a ring slot's
    kv_smem = gl.allocate_shared_memory(gl.bfloat16, [KVP, 2 * HD],
                                        gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0]))
    norm_smem = gl.allocate_shared_memory(gl.bfloat16, [2, HD], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    rope_smem = gl.allocate_shared_memory(gl.float32, [2, HD // 2], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=32 * PWARPS)
    mbarrier.init(kv_empty, count=1)
    pid = gl.program_id(0)
    gl.warp_specialize([
        (_ws_consumer, (ACTS, NORMS, SCRATCH, EPOCH, FAILED, QKV, KC, VC, PART, POS, tmax, ring, ready, empty,
                        x_smem, q_smem, kv_smem, norm_smem, rope_smem, kv_ready, kv_empty, layers, pid, nprog, N0, K0,
                        N1, K1, N2, K2, N3, K3, WIDE, BR, BK, NPAD, STAGES, WARPS, POLL, POLL_OPERANDS, PACK, PACKED,
                        APOLL, APOLL_OPERANDS, KVH, GQ, HD, SPLITS, KVP, EPS)),
        (_ws_producer, (W0, W1, W2, W3, KC, VC, QKNORM, ROPE, POS, tmax, ring, ready, empty, kv_smem, norm_smem,
                        rope_smem, kv_ready, kv_empty, layers, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR, BK,
                        STAGES, PWARPS, CAP, PACKED, KVH, SPLITS, HD, KVP)),
    ], [PWARPS], [PREGS])


@gluon.jit
def _stamp_input(X, ACTS, EPOCH, n, rows, WIDE: gl.constexpr, BLOCK: gl.constexpr):
    """Start a run: bump the epoch and publish its input, `rows` rows of n values (bf16 bits), as activation words
    under it, rows WIDE words apart. One warp, so its read of EPOCH precedes its write."""
    L: gl.constexpr = gl.BlockedLayout([BLOCK // 32], [32], [1], [0])
    epoch = gl.load(EPOCH) + 1
    gl.store(EPOCH, epoch)
    cols = gl.arange(0, BLOCK, L)
    for row in range(rows):
        bits = gl.load(X + row * n + cols, mask=cols < n, other=0.0).to(gl.bfloat16).to(gl.int16, bitcast=True)
        gl.store(ACTS + row * WIDE + cols, (bits.to(gl.int32) & 0xFFFF) | ((epoch % 65535 + 1) << 16),
                 mask=cols < n)


def packed_gemvs(gemvs: tuple, nprog: int, br: int, pack_small: bool, layer: bool) -> list[bool]:
    """Which GEMVs' units are packed (two K tiles per tile): with pack_small, those with at most br / 2 rows per
    program; in a layer not the RMSNormed ones (qkv, gate_up), whose readers scale a whole tile's rows."""
    return [bool(pack_small) and -(-n // nprog) <= br // 2 and not (layer and index % 2 == 0)
            for index, (_, n, _) in enumerate(gemvs)]


def _launch_setup(gemvs: tuple, wide: int, layers: int, config: tuple, kv_heads: int, head_dim: int, eps: float,
                  device: torch.device) -> tuple[int, int, dict, dict]:
    """The programs, the dot warps, the kernel's constants and its scratch buffers for `layers` decoder layers of
    these GEMVs (name, N, K: qkv, o_proj, gate_up, down), with attention over kv_heads heads."""
    br, bk, warps, stages, per_sm, copy_warps, cap_kib, pack_small = config
    nprog = torch.cuda.get_device_properties(device).multi_processor_count * per_sm
    assert br % (16 * warps) == 0 and bk % 64 == 0 and all(k % bk == 0 and n >= nprog for _, n, k in gemvs)
    assert gemvs[3][2] * 2 == gemvs[2][1] and gemvs[1][1] == gemvs[3][1] == gemvs[0][2]
    splits = 1 << ((nprog // kv_heads).bit_length() - 1)  # one unit per program at most, a power of two per group
    group = gemvs[1][2] // (kv_heads * head_dim)
    assert group == 4 and warps == 4 and head_dim == 128 and gemvs[0][1] == (group + 2) * kv_heads * head_dim
    pack = bk // (32 * warps)  # activation words per thread
    packed = packed_gemvs(gemvs, nprog, br, pack_small, True)
    constants = {f"{a}{i}": v for i, (_, n, k) in enumerate(gemvs) for a, v in (("N", n), ("K", k))}
    constants.update(nprog=nprog, WIDE=wide, BR=br, BK=bk, STAGES=stages, WARPS=warps, PWARPS=copy_warps,
                     CAP=(cap_kib or stages * br * bk * 2 // 1024) * 1024, EPS=eps, NPAD=8, POLL=poll_asm(pack),
                     PACK=pack, PREGS=104,  # (the attention copies spill at 80)
                     PACKED=sum(1 << i for i, p in enumerate(packed) if p),
                     APOLL=poll_asm(8), APOLL_OPERANDS=",".join(["=r"] * 8 + ["l"] * 8 + ["r"] * 16 + ["l"] * 8),
                     KVH=kv_heads, GQ=group, HD=head_dim, SPLITS=splits, KVP=32,
                     POLL_OPERANDS=",".join(["=r"] * pack + ["l"] * pack + ["r"] * 2 * pack + ["l"] * pack))
    words = dict(device=device, dtype=torch.int32)
    buffers = {"acts": torch.zeros(layers * 4 + 1, wide, **words),
               "scratch": torch.zeros(nprog, br, device=device, dtype=torch.float32),
               "epoch": torch.zeros(1, **words), "failed": torch.zeros(1, **words),
               "qkv": torch.zeros(layers + 1, gemvs[0][1], **words),
               "partials": torch.zeros(layers * kv_heads * splits * (group * head_dim + 4 * group) + 1, **words)}
    return nprog, warps, constants, buffers


def stamp_input(x: torch.Tensor, buffers: dict, constants: dict, rows: int = 1) -> None:
    """Bump the run's epoch and publish x (`rows` rows of K0 values) as the chain's input words."""
    _stamp_input[(1,)](x, buffers["acts"], buffers["epoch"], constants["K0"], rows, WIDE=constants["WIDE"],
                       BLOCK=max(32, 1 << (constants["K0"] - 1).bit_length()), num_warps=1)


def layer_decoder(weights: list[torch.Tensor], norms: torch.Tensor, qk_norms: torch.Tensor, eps: float,
                  config: tuple):
    """Every decoder layer of a Qwen3-shaped target for one token in one launch (the engine's batch-1 decode):
    weights [layers, N, K] per projection (qkv, o_proj, gate_up as (gate, up) row pairs, down), norms [layers, 2,
    hidden] (input and post-attention RMSNorm), qk_norms [layers, 2, head_dim], all bf16; config: the device's
    launch settings (settings.LaunchTables.flow). Returns run(x, position, rope, k_cache, v_cache) -> the residual
    stream after the last layer (bf16 [hidden], a view into the kernel's buffers, valid until the next run) and
    the FAILED flag (set when a program gave up waiting: the programs were not all resident). x: the token's
    embedding (bf16 [hidden]); position: long [1], the new token's position, in device memory so that a CUDA graph
    replays it; rope: fp32 [2, head_dim / 2], its cos and sin; the caches [layers, kv heads, max positions,
    head_dim], to which the new k and v are written. Everything a run reads from the host is fixed, so a run can
    be captured in a CUDA graph."""
    layers, hidden = weights[0].shape[0], weights[0].shape[2]
    head_dim = qk_norms.shape[-1]
    gemvs = tuple((name, w.shape[1], w.shape[2]) for name, w in zip(("qkv", "o_proj", "gate_up", "down"), weights))
    wide = max(n for _, n, _ in gemvs)
    kv_heads = (gemvs[0][1] - gemvs[1][2]) // (2 * head_dim)  # qkv's rows: the q heads, then k and v
    nprog, warps, constants, buffers = _launch_setup(gemvs, wide, layers, config, kv_heads, head_dim, eps,
                                                     weights[0].device)
    out = buffers["acts"][layers * 4, :hidden].view(torch.int16)[0::2].view(torch.bfloat16)  # the words' low halves

    def run(x: torch.Tensor, position: torch.Tensor, rope: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor) -> torch.Tensor:
        stamp_input(x, buffers, constants)
        _flow_chain[(nprog,)](*weights, buffers["acts"], norms, buffers["scratch"], buffers["epoch"],
                              buffers["failed"], buffers["qkv"], k_cache, v_cache, qk_norms, rope,
                              buffers["partials"], position, k_cache.shape[-2], layers, **constants, num_warps=warps)
        return out

    return run, buffers["failed"]
