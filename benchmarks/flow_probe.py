"""The flow kernel's probe form, which benchmarks/gemv_chain.py and flow_block.py time: the kernel of
blockspec/kernels/flow.py (the engine's: whole decode layers, attention in) with the modes only measurements need,
built from that module's pieces. Here the chain may be the 144 GEMVs of an AR step alone; with RMSNorm weights,
those GEMVs with a layer's norms, residual adds and silu * up done inside; or with attention state as well, whole
decode layers, what the engine runs. TIMED adds clock profiles and %globaltimer timelines; wait=False reads the
activations without waiting for them and copies=False issues no weight copies (diagnostics, wrong results).

The functions here are the engine kernel's with those modes in: a change to the engine's belongs here too.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from blockspec.kernels.flow import (SPIN, _advance, _attention_chunk, _dot_tile, _first_unit, _float_from_words,
                                    _fold_halves, _issue, _issue_attention, _kv_rows, _packed, _partial_words, _pick,
                                    _rows, _stale, _store_float_words, _store_rows, _store_silu_pairs, _total_units,
                                    _unit_bytes, _units, packed_gemvs, poll_asm, stamp_input)


@gluon.jit
def _clock():
    return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _globaltime():
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _produce(W0, W1, W2, W3, ring, ready, empty, i, layer, g, row, kk, landed, l_layer, l_g, l_row, l_kk, flight, pid,
             nprog: gl.constexpr, N0: gl.constexpr, K0: gl.constexpr, N1: gl.constexpr, K1: gl.constexpr,
             N2: gl.constexpr, K2: gl.constexpr, N3: gl.constexpr, K3: gl.constexpr, BR: gl.constexpr,
             BK: gl.constexpr, STAGES: gl.constexpr, CAP: gl.constexpr, G2: gl.constexpr, PACKED: gl.constexpr,
             COPIES: gl.constexpr, COPY: gl.constexpr):
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
    if COPIES:  # (False: a diagnostic, the slots keep whatever they hold)
        _issue(W0, W1, W2, W3, ring.index(slot), layer, g, row, kk, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3,
               BR, BK, G2, PACKED, COPY)
    cp.mbarrier_arrive(ready.index(slot), increment_count=False)  # each copy thread, once its copies land
    layer, g, row, kk = _advance(layer, g, row, kk, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR, BK, G2, PACKED)
    return i + 1, layer, g, row, kk, landed, l_layer, l_g, l_row, l_kk, flight + size


@gluon.jit
def _ws_producer(W0, W1, W2, W3, KC, VC, QKNORM, ROPE, POS, tmax, ring, ready, empty, kv_smem, norm_smem, rope_smem,
                 kv_ready, kv_empty, layers, pid, nprog: gl.constexpr, N0: gl.constexpr, K0: gl.constexpr,
                 N1: gl.constexpr, K1: gl.constexpr, N2: gl.constexpr, K2: gl.constexpr, N3: gl.constexpr,
                 K3: gl.constexpr, BR: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, PWARPS: gl.constexpr,
                 CAP: gl.constexpr, G2: gl.constexpr, PACKED: gl.constexpr, COPIES: gl.constexpr,
                 ATTN: gl.constexpr, KVH: gl.constexpr, SPLITS: gl.constexpr, HD: gl.constexpr, KVP: gl.constexpr):
    """The copy warps: fill ring slot i % STAGES with unit i as soon as the dot warps have released it and the
    bytes still on their way, with it, stay within CAP. Outstanding copies delay every other read of the GPU
    (the activation polls queue behind them: a GEMV's last rows reached its readers 4.75 us after the store
    with 192 KB per SM in flight, 1.5 us with 64 KB), so the ring should hold landed tiles, not outstanding
    ones; and the cap is in bytes because a unit's valid rows vary (19 of 64 in o_proj, all 64 in gate_up).
    With attention, after each layer's qkv units they also copy what its attention unit will read from HBM into
    buffers of its own (_issue_attention; HBM reads wait behind the weight stream, 5.6 us, so none may be on
    the attention's critical path). The loop runs per layer so that copy is not inside a branch."""
    COPY: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [PWARPS, 1], [1, 0])
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
                pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR, BK, STAGES, CAP, G2, PACKED, COPIES, COPY)
        if ATTN:
            mbarrier.wait(kv_empty, (each_layer & 1) ^ 1)  # the dot warps are done with the layer before's
            _issue_attention(KC, VC, QKNORM, ROPE, kv_smem, norm_smem, rope_smem, each_layer, T, tmax, pid, KVH,
                             SPLITS, HD, KVP, PWARPS)
            cp.mbarrier_arrive(kv_ready, increment_count=False)
        for _ in range(other_units):
            i, layer, g, row, kk, landed, l_layer, l_g, l_row, l_kk, flight = _produce(
                W0, W1, W2, W3, ring, ready, empty, i, layer, g, row, kk, landed, l_layer, l_g, l_row, l_kk, flight,
                pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR, BK, STAGES, CAP, G2, PACKED, COPIES, COPY)


@gluon.jit
def _finish_rows(ACTS, OUT, value, rows, end, layer, g, epoch, WIDE: gl.constexpr, LAYER: gl.constexpr):
    """Store finished rows; in a layer, after o_proj and down, with the residual added by the rows' owner."""
    if LAYER:
        value = value.to(gl.bfloat16).to(gl.float32)
        if g % 2 == 1:
            # the residual stream's rows, which this program stored itself (o_proj and down split their rows
            # alike): the layer's input for o_proj, o_proj's output for down
            residual = ACTS + (layer * 4 + g - 1) * WIDE
            value += (gl.load(residual + rows, mask=rows < end, other=0, volatile=True) & 0xFFFF).to(
                gl.int16).to(gl.bfloat16, bitcast=True).to(gl.float32)
    _store_rows(OUT, value, rows, end, epoch)


@gluon.jit
def _attention_unit(QKV, KC, VC, PART, ACTS, FAILED, PROFILE, epoch, layer, unit, POS, tmax, q_smem,
                    kv_smem, norm_smem, rope_smem, kv_ready, kv_empty,
                    nprog: gl.constexpr, TIMED: gl.constexpr, APOLL: gl.constexpr,
                    APOLL_OPERANDS: gl.constexpr, N0: gl.constexpr,
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
    stamps = PROFILE + (layer * nprog + unit) * 8  # TIMED == 3: %globaltimer at each stage
    if TIMED == 3:
        gl.store(stamps + 1, _globaltime())
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
    if TIMED == 3:
        gl.store(stamps + 2, _globaltime())
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
    if TIMED == 3:
        gl.store(stamps + 3, _globaltime())
    # the partial as activation words (no fence, no atomic: each word says itself whether it is this run's): the
    # output divided by its sum as bf16, the max and the sum as fp32 in two words each
    group = (layer * KVH + kvh) * SPLITS
    part = PART + (group + split) * PSTRIDE
    heads = gl.arange(0, 16, gl.SliceLayout(1, MMA))
    at = gl.expand_dims(heads, 1) * HD + gl.expand_dims(gl.arange(0, HD, gl.SliceLayout(0, MMA)), 0)
    _store_rows(part, o_acc * gl.expand_dims(gl.where(total > 0, 1.0 / total, 0.0), 1), at, GQ * HD, epoch)
    _store_float_words(part + GQ * HD + heads * 4, m, epoch, heads < GQ)
    _store_float_words(part + GQ * HD + heads * 4 + 2, total, epoch, heads < GQ)
    if TIMED == 3:
        gl.store(stamps + 4, _globaltime())
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
        # round trip per group: 29 us, 16d0930)
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
        if TIMED == 3:
            gl.store(stamps + 5, _globaltime())


@gluon.jit
def _ws_consumer(ACTS, NORMS, SCRATCH, EPOCH, FAILED, PROFILE, QKV, KC, VC, PART, POS, tmax, ring, ready,
                 empty, x_smem, q_smem, kv_smem, norm_smem, rope_smem, kv_ready, kv_empty, layers, pid,
                 nprog: gl.constexpr,
                 N0: gl.constexpr, K0: gl.constexpr, N1: gl.constexpr, K1: gl.constexpr, N2: gl.constexpr,
                 K2: gl.constexpr, N3: gl.constexpr, K3: gl.constexpr, WIDE: gl.constexpr,
                 BR: gl.constexpr, BK: gl.constexpr, NPAD: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr,
                 WAIT: gl.constexpr, POLL: gl.constexpr, POLL_OPERANDS: gl.constexpr, PACK: gl.constexpr,
                 TIMED: gl.constexpr, LAYER: gl.constexpr, PACKED: gl.constexpr, ATTN: gl.constexpr,
                 APOLL: gl.constexpr, APOLL_OPERANDS: gl.constexpr, KVH: gl.constexpr, GQ: gl.constexpr,
                 HD: gl.constexpr, SPLITS: gl.constexpr, KVP: gl.constexpr, EPS: gl.constexpr):
    """The dot warps: per unit, wait for its activations and its weight slot, multiply, release the slot, and
    store the finished rows. With LAYER, also a layer's elementwise work, and with ATTN its attention (see
    flow_chain)."""
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_OP: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    X: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    CH: gl.constexpr = BK // 4
    G2: gl.constexpr = 2 if LAYER else 1
    epoch = gl.load(EPOCH) % 65535 + 1
    total = _total_units(layers, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR, BK, G2, PACKED)
    c_layer, c_g, c_row, c_kk = _first_unit(pid, nprog, N0)
    xs = gl.arange(0, BK, X)
    epochs = gl.full([BK], 0, gl.int32, X) + epoch
    words = gl.load(ACTS + xs, volatile=True)
    words2 = words  # a packed unit's second K tile (layer 0's qkv is not packed)
    norm_weights = gl.load(NORMS + xs, mask=LAYER & (xs >= 0), other=0.0)
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
    # clock cycles per (GEMV, phase): waiting for weights, the next unit's cursor and prefetch, activations in, dot
    # and store
    slots = gl.arange(0, 16, X)
    spent = gl.zeros([16], gl.int64, X)
    then = pid.to(gl.int64) * 0
    if TIMED == 1:
        then = _clock()
    for i in range(total):
        n_layer, n_g, n_row, n_kk = _advance(c_layer, c_g, c_row, c_kk, pid, nprog, N0, K0, N1, K1, N2, K2,
                                             N3, K3, BR, BK, G2, PACKED)
        next_words = gl.load(ACTS + (n_layer * 4 + n_g) * WIDE + n_kk + xs, mask=(n_layer < layers) & (xs >= 0),
                             volatile=True)
        next_words2 = gl.load(ACTS + (n_layer * 4 + n_g) * WIDE + n_kk + BK + xs,
                              mask=(n_layer < layers) & _packed(n_g, PACKED)
                              & (n_kk + BK + xs < _pick(n_g, K0, K1, K2, K3)), other=0, volatile=True)
        if LAYER:  # qkv's and gate_up's inputs are RMSNormed: the norm weights' tile too
            next_norm = gl.load(NORMS + (n_layer * 2 + n_g // 2) * K0 + n_kk + xs,
                                mask=(n_layer < layers) & (n_g % 2 == 0) & (xs >= 0), other=0.0)
        if TIMED == 1:
            now = _clock()
            spent += gl.where(slots == c_g * 4 + 1, now - then, 0)
            then = now
        act = ACTS + (c_layer * 4 + c_g) * WIDE
        packed = _packed(c_g, PACKED)
        k_now = _pick(c_g, K0, K1, K2, K3)
        has_second = packed & (c_kk + BK < k_now)
        if WAIT:
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
        if LAYER:
            if c_g % 2 == 0:
                # RMSNorm with its scale taken out of the dot: x * weight goes in, the sum of squares builds up
                # over the K tiles, and the row block's outputs are scaled once all are in (the reader cannot
                # know the scale before the whole vector is there, and waiting for it is a grid barrier)
                xf = x.to(gl.float32)
                squares = gl.where(c_kk == 0, 0.0, squares) + xf * xf
                x = (xf * norm_weights.to(gl.float32)).to(gl.bfloat16)
        x_smem.index(0).store(x)
        if packed:
            x_smem.index(1).store(x2.to(gl.bfloat16))
        gl.thread_barrier()
        if TIMED == 1:
            now = _clock()
            spent += gl.where(slots == c_g * 4 + 2, now - then, 0)
            then = now
        if TIMED == 3:
            if (c_kk == 0) & (c_row == _rows(c_g, pid, nprog, N0, N1, N2, N3, G2)[0]) & (c_g == 1):
                gl.store(PROFILE + (c_layer * nprog + pid) * 8 + 6, _globaltime())  # o_proj's first input is in
        if TIMED == 2:
            if (c_kk == 0) & (c_row == _rows(c_g, pid, nprog, N0, N1, N2, N3, G2)[0]) & (c_layer * 4 + c_g > 0):
                # the first unit of a GEMV has its activations: when the GEMV before became readable here
                gl.store(PROFILE + ((c_layer * 4 + c_g - 1) * nprog + pid) * 2 + 1, _globaltime())
        slot = ring.index(i % STAGES)
        mbarrier.wait(ready.index(i % STAGES), (i // STAGES) & 1)
        if TIMED == 1:
            now = _clock()
            spent += gl.where(slots == c_g * 4 + 0, now - then, 0)
            then = now
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
                             c_row + pairs, end, c_layer, c_g, epoch, WIDE, LAYER)
            else:
                if LAYER:
                    if c_g % 2 == 0:
                        value *= gl.rsqrt(gl.sum(squares, axis=0) / k_now + EPS)
                    if c_g == 2:
                        _store_silu_pairs(act + WIDE, SCRATCH + pid * BR, value.to(gl.bfloat16).to(gl.float32),
                                          c_row, end, epoch, out_rows, pairs)
                    else:
                        out = act + WIDE
                        if ATTN:
                            if c_g == 0:  # qkv's rows go to attention, whose output o_proj reads
                                out = QKV + c_layer * N0
                        _finish_rows(ACTS, out, value, c_row + out_rows, end, c_layer, c_g, epoch, WIDE, LAYER)
                else:
                    _finish_rows(ACTS, act + WIDE, value, c_row + out_rows, end, c_layer, c_g, epoch, WIDE, LAYER)
            if TIMED == 2:
                if c_row + gl.where(packed, BR // 2, BR) >= end:  # this program's last rows of the GEMV: stored when
                    gl.store(PROFILE + ((c_layer * 4 + c_g) * nprog + pid) * 2, _globaltime())
        if ATTN:
            if TIMED == 3:
                if (c_g == 0) & (n_g == 1):
                    gl.store(PROFILE + (c_layer * nprog + pid) * 8, _globaltime())
            if (c_g == 0) & (n_g == 1) & (pid >= KVH * SPLITS):  # no unit: the copy warps may go on anyway
                mbarrier.arrive(kv_empty)
            if (c_g == 0) & (n_g == 1) & (pid < KVH * SPLITS):  # this program's last qkv rows are out
                _attention_unit(QKV, KC, VC, PART, ACTS, FAILED, PROFILE, epoch, c_layer, pid, POS, tmax, q_smem,
                                kv_smem, norm_smem, rope_smem, kv_ready, kv_empty, nprog, TIMED, APOLL, APOLL_OPERANDS,
                                N0, WIDE, KVH, GQ, HD, SPLITS, KVP, WARPS, EPS)
        if TIMED == 1:
            now = _clock()
            spent += gl.where(slots == c_g * 4 + 3, now - then, 0)
            then = now
        c_layer, c_g, c_row, c_kk = n_layer, n_g, n_row, n_kk
        words = next_words
        words2 = next_words2
        if LAYER:
            norm_weights = next_norm
    if TIMED == 1:
        gl.store(PROFILE + pid * 16 + slots, spent)


@gluon.jit
def _flow_chain(W0, W1, W2, W3, ACTS, NORMS, SCRATCH, EPOCH, FAILED, PROFILE, QKV, KC, VC, QKNORM, ROPE, PART,
                POS, tmax, layers, nprog: gl.constexpr,
                N0: gl.constexpr, K0: gl.constexpr, N1: gl.constexpr, K1: gl.constexpr, N2: gl.constexpr,
                K2: gl.constexpr, N3: gl.constexpr, K3: gl.constexpr, WIDE: gl.constexpr, BR: gl.constexpr,
                BK: gl.constexpr, NPAD: gl.constexpr, STAGES: gl.constexpr, WARPS: gl.constexpr,
                WAIT: gl.constexpr, POLL: gl.constexpr, POLL_OPERANDS: gl.constexpr, PACK: gl.constexpr,
                TIMED: gl.constexpr, PWARPS: gl.constexpr, PREGS: gl.constexpr, CAP: gl.constexpr, COPIES: gl.constexpr,
                LAYER: gl.constexpr, PACKED: gl.constexpr, ATTN: gl.constexpr, APOLL: gl.constexpr,
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
        (_ws_consumer, (ACTS, NORMS, SCRATCH, EPOCH, FAILED, PROFILE, QKV, KC, VC, PART, POS, tmax, ring, ready,
                        empty, x_smem, q_smem, kv_smem, norm_smem, rope_smem, kv_ready, kv_empty, layers, pid,
                        nprog, N0, K0, N1, K1, N2, K2, N3, K3, WIDE, BR, BK, NPAD, STAGES, WARPS, WAIT, POLL,
                        POLL_OPERANDS, PACK, TIMED, LAYER, PACKED, ATTN, APOLL, APOLL_OPERANDS, KVH, GQ, HD, SPLITS,
                        KVP, EPS)),
        (_ws_producer, (W0, W1, W2, W3, KC, VC, QKNORM, ROPE, POS, tmax, ring, ready, empty, kv_smem, norm_smem,
                        rope_smem, kv_ready, kv_empty, layers, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR, BK,
                        STAGES, PWARPS, CAP, 2 if LAYER else 1, PACKED, COPIES, ATTN, KVH, SPLITS, HD, KVP)),
    ], [PWARPS], [PREGS])


def _launch_setup(gemvs: tuple, wide: int, layers: int, config: tuple, layer: bool, kv_heads: int | None,
                  head_dim: int, wait: bool, copies: bool, timed: int, eps: float,
                  rows: int = 1) -> tuple[int, int, dict, dict]:
    """The programs, the dot warps, the kernel's constants and its scratch buffers for a chain of `layers`
    (attention in when kv_heads is given). rows > 1: only what any dataflow chain of `rows` tokens shares (the
    block probe, benchmarks/flow_block.py, adds its own)."""
    br, bk, warps, stages, per_sm, copy_warps, cap_kib, pack_small = config
    nprog = torch.cuda.get_device_properties(0).multi_processor_count * per_sm
    assert br % (16 * warps) == 0 and bk % 64 == 0 and all(k % bk == 0 and n >= nprog for _, n, k in gemvs)
    if layer:
        assert gemvs[3][2] * 2 == gemvs[2][1] and gemvs[1][1] == gemvs[3][1] == gemvs[0][2]
    constants = {f"{a}{i}": v for i, (_, n, k) in enumerate(gemvs) for a, v in (("N", n), ("K", k))}
    constants.update(nprog=nprog, WIDE=wide, BR=br, BK=bk, STAGES=stages, WARPS=warps, WAIT=wait, PWARPS=copy_warps,
                     CAP=(cap_kib or stages * br * bk * 2 // 1024) * 1024, EPS=eps)
    words = dict(device="cuda", dtype=torch.int32)
    buffers = {"acts": torch.zeros(layers * 4 + 1, rows * wide, **words),
               "scratch": torch.zeros(nprog, br * rows, device="cuda", dtype=torch.float32),
               "epoch": torch.zeros(1, **words), "failed": torch.zeros(1, **words)}
    if rows > 1:
        return nprog, warps, constants, buffers
    pack = bk // (32 * warps)  # activation words per thread
    packed = packed_gemvs(gemvs, nprog, br, pack_small, layer)
    splits, group = 1, 4
    if kv_heads is not None:
        assert layer
        splits = 1 << ((nprog // kv_heads).bit_length() - 1)  # one unit per program at most, a power of two per group
        group = gemvs[1][2] // (kv_heads * head_dim)
        assert group == 4 and warps == 4 and head_dim == 128 and gemvs[0][1] == (group + 2) * kv_heads * head_dim
    constants.update(NPAD=8, POLL=poll_asm(pack), PACK=pack, TIMED=timed,
                     PREGS=104 if kv_heads is not None else 80,  # (the attention copies spill at 80)
                     COPIES=copies, LAYER=layer,
                     PACKED=sum(1 << i for i, p in enumerate(packed) if p), ATTN=kv_heads is not None,
                     APOLL=poll_asm(8), APOLL_OPERANDS=",".join(["=r"] * 8 + ["l"] * 8 + ["r"] * 16 + ["l"] * 8),
                     KVH=kv_heads or 1, GQ=group, HD=head_dim, SPLITS=splits,
                     KVP=32 if kv_heads is not None else 16,
                     POLL_OPERANDS=",".join(["=r"] * pack + ["l"] * pack + ["r"] * 2 * pack + ["l"] * pack))
    buffers.update(qkv=torch.zeros(layers + 1, gemvs[0][1] if kv_heads is not None else 1, **words),
                   partials=torch.zeros(layers * (kv_heads or 0) * splits * (group * head_dim + 4 * group) + 1,
                                        **words))
    return nprog, warps, constants, buffers


def _launch(buffers: dict, constants: dict, nprog: int, warps: int, x: torch.Tensor, weights: list[torch.Tensor],
            norms: torch.Tensor, profile: torch.Tensor, qk_norms: torch.Tensor, rope: torch.Tensor,
            position: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layers: int) -> None:
    """Stamp `x` in as the chain's input under a new epoch, then run the chain."""
    stamp_input(x, buffers, constants)
    _flow_chain[(nprog,)](*weights, buffers["acts"], norms, buffers["scratch"], buffers["epoch"], buffers["failed"],
                          profile, buffers["qkv"], k_cache, v_cache, qk_norms, rope, buffers["partials"], position,
                          k_cache.shape[-2], layers, **constants, num_warps=warps)


def flow_chain(x0: torch.Tensor, weights: list[torch.Tensor], layers: int, config: tuple, gemvs: tuple,
               wide: int, wait: bool = True, profile: torch.Tensor | None = None, timeline: bool | str = False,
               norms: torch.Tensor | None = None, attention: dict | None = None, copies: bool = True,
               last_only: bool = False):
    """The probe's entry: as persistent_gemv.dataflow_chain, for this kernel; config
    (block rows, block_k, dot warps, stages, programs per SM, copy warps, KiB in flight per program: 0 for the
    whole ring, pack small GEMVs: see packed_gemvs). wait=False reads the activations without waiting for them
    (wrong results): the kernel's streaming ceiling, so its dependency cost is flow - nowait. `profile` (int64
    [programs, 4]) receives each program's clock cycles per phase (see gemv_chain.flow_profile); with
    timeline=True it is int64 [layers * 4, programs, 2] instead and receives, per GEMV and program, the
    %globaltimer when the program stored its last rows of the GEMV and when the next GEMV's first activations
    arrived there; with timeline="attention" it is int64 [layers, programs, 8] and receives the attention stages'
    times (see gemv_chain.attention_timeline). Each run reads x0, bumps a device-side epoch and stamps the input
    with it; the callable returns the values as fp32 [layers, 4, wide].

    With RMSNorm weights `norms` [layers, 2, hidden] (bf16) the chain is a Qwen3 layer without attention (o_proj
    reads q where attention's output would be), its elementwise work done where the data already is:
    - RMSNorm before qkv and gate_up by the reader, its scale taken out of the dot: (x * weight) rounded to bf16
      goes into the dot, sum(x^2) builds up over the K tiles, and the finished rows are multiplied by
      rsqrt(mean + eps). (The engine's kernels round x * rsqrt first, which no reader can know before the whole
      vector is in: waiting for it is a grid barrier, as 518322b's staged kernel measured.)
    - the residual adds after o_proj and down by the rows' owner: both GEMVs have `hidden` rows split alike, so a
      program adds to rows that it stored itself;
    - silu(gate) * up after gate_up by the rows' owner: gate_up's rows are (gate j, up j) pairs, the engine's
      layout, split two at a time, so down reads 9728 words, not 19456. (Read as gate rows then up rows, two
      regions at once, the same chain streamed 10% slower: 2.968 against 2.690 ms, 148dcb3.)
    The values returned are then per layer: qkv, the residual after o_proj, silu(gate) * up, the residual after
    down.

    With `attention` as well (a dict: k_cache and v_cache [layers, kv heads, max positions, head_dim] bf16, qk_norms
    [layers, 2, head_dim] bf16, rope [2, head_dim / 2] fp32 (cos, sin of the new position), length: the positions
    including the new one), the chain is a whole Qwen3 decode layer: o_proj reads attention's output, computed by
    (kv head, context split) units between qkv and o_proj (see _attention_unit), the new k and v written to the
    cache at length - 1; the values returned per layer then start with attention's output.

    copies=False is a diagnostic: the copy warps issue no weight copies (wrong results), to time the dot warps'
    work without the copies' instructions beside it. last_only=True returns only the last GEMV's output (fp32
    [its rows]), without decoding every layer's words."""
    layer = norms is not None
    timed = 0 if profile is None else 3 if timeline == "attention" else 2 if timeline else 1
    kv_heads = None if attention is None else attention["k_cache"].shape[1]
    nprog, warps, constants, buffers = _launch_setup(gemvs, wide, layers, config, layer, kv_heads, 128, wait, copies,
                                                     timed, 1e-6)
    dummy = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
    no_cache = torch.zeros(1, 1, 1, 1, device="cuda", dtype=torch.bfloat16)
    state = [dummy, torch.zeros(1, device="cuda", dtype=torch.float32), torch.zeros(1, device="cuda", dtype=torch.long),
             no_cache, no_cache]
    if attention is not None:
        assert attention["length"] <= attention["k_cache"].shape[2]
        state = [attention["qk_norms"], attention["rope"],
                 torch.full((1,), attention["length"] - 1, device="cuda", dtype=torch.long),
                 attention["k_cache"], attention["v_cache"]]
    norm_weights = norms if layer else dummy
    cycles = profile if timed else torch.zeros(1, device="cuda", dtype=torch.int64)
    acts = buffers["acts"]

    def run() -> torch.Tensor:
        _launch(buffers, constants, nprog, warps, x0, weights, norm_weights, cycles, *state, layers)
        if last_only:
            return ((acts[layers * 4, :gemvs[3][1]] & 0xFFFF) << 16).view(torch.float32)
        return ((acts[1:] & 0xFFFF) << 16).view(torch.float32).view(layers, 4, wide)

    return run, buffers["failed"]
