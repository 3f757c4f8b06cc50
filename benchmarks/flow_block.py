"""A probe: the flow kernel's layer chain (attention left out) for a verify block of 16 tokens, timed by
`python -m benchmarks.gemv_chain --block` against the engine's kernels on 16 rows. Not an engine path: it is
correct (relative error 0.004 against fp64, bit-exact reruns) but slower than the engine's kernels (4.7 against
3.05 ms for 36 layers, 39357c8), because a program reads as many activation bytes from L2 as weight bytes from HBM
(see docs/design-notes.md). It shares the copy warps, the cursor and the activation words of the flow kernel
(blockspec/kernels/flow.py, its probe form in flow_probe.py); its dot warps (_ws_block_consumer) are its own.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_wait)

from benchmarks.flow_probe import _clock, _launch_setup, _ws_producer
from blockspec.kernels.flow import (SPIN_LIMIT, _advance, _first_unit, _pick, _rows, _store_words, _total_units,
                                    stamp_input)

ROWS = 16


@gluon.jit
def _from_words(words):
    """The values of activation words (their low halves, bf16 bits) as fp32."""
    return (words & 0xFFFF).to(gl.int16).to(gl.bfloat16, bitcast=True).to(gl.float32)


def poll_block_asm(wide: int) -> str:
    """Inline PTX for one dot-warp thread's 32 activation words of a block unit ([16, 256] words, the layout
    _ws_block_consumer's WORDS: rows warp + 4 r, columns lane * 8 + c, word r * 8 + c of the thread). Operands:
    the 32 words out, then per word the words read early (the prefetch), the unit's base address, the run's epoch
    and the FAILED address (all but the early words the same for every word: only the first is used). As poll_asm:
    the early words are kept if all carry the epoch, else all are read again together (8 16-byte loads, from
    addresses derived from %tid.x) until they do; a thread that gives up (SPIN_LIMIT polls) sets FAILED itself."""
    check = [f"shr.u32 seen, ${j}, 16;\nsetp.ne{'' if j == 0 else '.or'}.u32 stale, seen, $96"
             + ("" if j == 0 else ", stale") + ";" for j in range(32)]
    loads = [f"ld.volatile.global.v4.u32 {{${8 * r + 4 * h}, ${8 * r + 4 * h + 1}, ${8 * r + 4 * h + 2}, "
             f"${8 * r + 4 * h + 3}}}, [at+{(r * 4 * wide + 4 * h) * 4}];" for r in range(4) for h in range(2)]
    return "\n".join(["{", ".reg .pred stale;", ".reg .u32 seen, polls, failed, thread;", ".reg .u64 at;",
                      "mov.u32 polls, 0;", *[f"mov.u32 ${j}, ${32 + j};" for j in range(32)],
                      "mov.u32 thread, %tid.x;", "and.b32 seen, thread, 31;", "shr.u32 thread, thread, 5;",
                      f"mul.lo.u32 thread, thread, {wide * 4};", "mad.lo.u32 thread, seen, 32, thread;",
                      "cvt.u64.u32 at, thread;", "add.u64 at, at, $64;", "CHECK:", *check, "@!stale bra DONE;",
                      "add.u32 polls, polls, 1;", f"setp.lt.u32 stale, polls, {SPIN_LIMIT};", "@stale bra MORE;",
                      "st.global.u32 [$128], polls;", "bra DONE;", "MORE:", "and.b32 seen, polls, 255;",
                      "setp.ne.u32 stale, seen, 0;", "@stale bra LOAD;", "ld.volatile.global.u32 failed, [$128];",
                      "setp.ne.u32 stale, failed, 0;", "@stale bra DONE;", "LOAD:", *loads, "bra CHECK;", "DONE:",
                      "}"])


@gluon.jit
def _block_outputs(ACTS, SCRATCH, acc, scale, layer, g, row, pid, epoch, nprog: gl.constexpr, N0: gl.constexpr,
                   N1: gl.constexpr, N2: gl.constexpr, N3: gl.constexpr, WIDE: gl.constexpr, BR: gl.constexpr,
                   ROWS: gl.constexpr, ACC: gl.constexpr):
    """A block row block's finished outputs acc [BR, ROWS] (GEMV g of `layer`, rows from `row`) as the next GEMV's
    words: RMSNormed GEMVs scaled per token, the residual added after o_proj and down, silu(gate) * up after
    gate_up (as _finish_rows and _store_silu_pairs for one token)."""
    PAIRS: gl.constexpr = gl.BlockedLayout([1, 1], [2, 16], [ACC.warps_per_cta[0], 1], [1, 0])  # [BR / 2, ROWS]
    SLAB: gl.constexpr = ROWS * WIDE
    out = ACTS + (layer * 4 + g + 1) * SLAB
    tokens = gl.arange(0, ROWS, gl.SliceLayout(0, ACC))
    out_rows = gl.arange(0, BR, gl.SliceLayout(1, ACC))
    end = _rows(g, pid, nprog, N0, N1, N2, N3, 2)[1]
    value = acc
    if g % 2 == 0:
        value *= gl.expand_dims(gl.convert_layout(scale, gl.SliceLayout(0, ACC)), 0)
    value = value.to(gl.bfloat16).to(gl.float32)
    if g == 2:  # silu(gate) * up of the (gate, up) row pairs, traded through this program's scratch
        pair_rows = gl.expand_dims(gl.arange(0, BR // 2, gl.SliceLayout(1, PAIRS)), 1)
        pair_tokens = gl.expand_dims(gl.arange(0, ROWS, gl.SliceLayout(0, PAIRS)), 0)
        scratch = SCRATCH + pid * BR * ROWS
        gl.store(scratch + gl.expand_dims(out_rows, 1) * ROWS + gl.expand_dims(tokens, 0), value)
        gl.thread_barrier()
        gate = gl.load(scratch + 2 * pair_rows * ROWS + pair_tokens, volatile=True)
        up = gl.load(scratch + (2 * pair_rows + 1) * ROWS + pair_tokens, volatile=True)
        gl.thread_barrier()  # read before the next row block overwrites them
        silu = (gate / (1.0 + gl.exp(-gate))).to(gl.bfloat16).to(gl.float32)
        half_rows = row // 2 + pair_rows
        _store_words(out + pair_tokens * WIDE + half_rows, silu * up, (half_rows < end // 2) & (pair_tokens >= 0),
                     epoch)
    else:
        rows = row + out_rows
        at = gl.expand_dims(tokens, 0) * WIDE + gl.expand_dims(rows, 1)
        inside = gl.expand_dims(rows < end, 1) & gl.expand_dims(tokens >= 0, 0)
        if g % 2 == 1:  # the residual's rows, stored by this program itself (see _finish_rows)
            value += _from_words(gl.load(ACTS + (layer * 4 + g - 1) * SLAB + at, mask=inside, other=0, volatile=True))
        _store_words(out + at, value, inside, epoch)


@gluon.jit
def _block_operand(ACTS, FAILED, x_smem, buffer, words, norm_weights, squares, layer, g, kk, epoch,
                   K0: gl.constexpr, K1: gl.constexpr, K2: gl.constexpr, K3: gl.constexpr, WIDE: gl.constexpr,
                   ROWS: gl.constexpr, WAIT: gl.constexpr, POLL: gl.constexpr, POLL_OPERANDS: gl.constexpr,
                   EPS: gl.constexpr):
    """A block unit's wgmma operand: its words (read ahead) polled again per thread until all are this run's,
    RMSNormed by the reader where GEMV g reads a norm (x * weight into the dot, the sum of squares per token
    building up over the K tiles), stored as bf16 [ROWS, BK] to x_smem.index(buffer). Returns the sums of squares
    and the tokens' RMSNorm scales so far (complete at a row block's last unit; 1 for unnormed GEMVs)."""
    k = _pick(g, K0, K1, K2, K3)
    if WAIT:
        words = gl.inline_asm_elementwise(POLL, POLL_OPERANDS, [words, ACTS + (layer * 4 + g) * ROWS * WIDE + kk,
                                                                epoch, FAILED], dtype=gl.int32, is_pure=False, pack=32)
    x = _from_words(words)
    scale = gl.full([ROWS], 1.0, gl.float32, squares.type.layout)
    if g % 2 == 0:
        squares = gl.where(kk == 0, 0.0, squares) + gl.sum(x * x, axis=1)
        scale = gl.rsqrt(squares / k + EPS)
        x = x * gl.expand_dims(norm_weights.to(gl.float32), 0)
    x_smem.index(buffer).store(x.to(gl.bfloat16))
    gl.thread_barrier()
    return squares, scale


@gluon.jit
def _unit_inputs(ACTS, NORMS, layer, g, kk, layers, tile, columns, K0: gl.constexpr, SLAB: gl.constexpr):
    """A block unit's activation words [ROWS, BK] and, where GEMV g reads an RMSNorm, its norm weights [BK], read
    ahead (nothing past the last layer)."""
    words = gl.load(ACTS + (layer * 4 + g) * SLAB + kk + tile, mask=(layer < layers) & (tile >= 0), volatile=True)
    norm = gl.load(NORMS + (layer * 2 + g // 2) * K0 + kk + columns,
                   mask=(layer < layers) & (g % 2 == 0) & (columns >= 0), other=0.0)
    return words, norm


@gluon.jit
def _ws_block_consumer(ACTS, NORMS, SCRATCH, EPOCH, FAILED, PROFILE, ring, ready, empty, x_smem, layers, pid,
                       nprog: gl.constexpr, N0: gl.constexpr, K0: gl.constexpr, N1: gl.constexpr, K1: gl.constexpr,
                       N2: gl.constexpr, K2: gl.constexpr, N3: gl.constexpr, K3: gl.constexpr, WIDE: gl.constexpr,
                       BR: gl.constexpr, BK: gl.constexpr, ROWS: gl.constexpr, STAGES: gl.constexpr,
                       WARPS: gl.constexpr, WAIT: gl.constexpr, POLL: gl.constexpr, POLL_OPERANDS: gl.constexpr,
                       TIMED: gl.constexpr, EPS: gl.constexpr):
    """The dot warps for a block of ROWS = 16 tokens (a verify block): as _ws_consumer's layer chain, but each unit
    multiplies its weight tile by the block's 16 activation rows, on the warpgroup's wgmma (the tokens its N), which
    reads the tile and the operand from shared memory once for all four warps. (mma_v2 loads the operand into every
    warp: with the words staged through shared memory as well, a unit moved about 136 KB through it, 2000 cycles
    against the 770 a 9.5 KB o_proj unit takes to stream, 1.55x of the floor without waiting at all, 3e58ff3.) A
    unit's activations are [16, 256] words, 32 per thread, read ahead into registers and polled again per thread
    (POLL) only where stale. Under the weight stream a load takes longer than a unit (2-3 us against 0.4-1.1), so
    they are loaded two units ahead of their operand, and unit i's wgmma runs while unit i + 1's operand is made
    unless unit i ends a row block (17b9785, synchronous, stalled on both). The wgmma is issued and waited for in
    one iteration: a wgmma in flight across the loop's back edge makes ptxas wait for it at the top. TIMED == 1:
    clock cycles per (GEMV, phase) to PROFILE: weights landed; loads issued; the next operand made; the wgmma waited
    for and the outputs stored."""
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, ROWS, 16])
    WORDS: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [WARPS, 1], [1, 0])  # [ROWS, BK]: see poll_block_asm
    SLAB: gl.constexpr = ROWS * WIDE  # one GEMV's activation words
    epoch = gl.load(EPOCH) % 65535 + 1
    total = _total_units(layers, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR, BK, 2, 0)
    columns = gl.arange(0, BK, gl.SliceLayout(0, WORDS))
    tile = gl.expand_dims(gl.arange(0, ROWS, gl.SliceLayout(1, WORDS)), 1) * WIDE + gl.expand_dims(columns, 0)
    acc = gl.zeros([BR, ROWS], gl.float32, ACC)
    squares = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, WORDS))
    # four units in the pipe: c, whose wgmma is issued now; o, whose operand is made meanwhile; n and f (from the
    # loop), whose words and norm weights are on their way
    c_layer, c_g, c_row, c_kk = _first_unit(pid, nprog, N0)
    o_layer, o_g, o_row, o_kk = _advance(c_layer, c_g, c_row, c_kk, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR,
                                         BK, 2, 0)
    n_layer, n_g, n_row, n_kk = _advance(o_layer, o_g, o_row, o_kk, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR,
                                         BK, 2, 0)
    o_words, o_norm = _unit_inputs(ACTS, NORMS, o_layer, o_g, o_kk, layers, tile, columns, K0, SLAB)
    n_words, n_norm = _unit_inputs(ACTS, NORMS, n_layer, n_g, n_kk, layers, tile, columns, K0, SLAB)
    squares, c_scale = _block_operand(ACTS, FAILED, x_smem, 0, gl.load(ACTS + tile, volatile=True),
                                      gl.load(NORMS + columns), squares, c_layer, c_g, c_kk, epoch, K0, K1, K2, K3,
                                      WIDE, ROWS, WAIT, POLL, POLL_OPERANDS, EPS)
    o_scale = c_scale
    slots = gl.arange(0, 16, gl.BlockedLayout([1], [32], [WARPS], [0]))
    spent = gl.zeros([16], gl.int64, gl.BlockedLayout([1], [32], [WARPS], [0]))
    then = pid.to(gl.int64) * 0
    if TIMED == 1:
        then = _clock()
    for i in range(total):
        f_layer, f_g, f_row, f_kk = _advance(n_layer, n_g, n_row, n_kk, pid, nprog, N0, K0, N1, K1, N2, K2,
                                             N3, K3, BR, BK, 2, 0)
        f_words, f_norm = _unit_inputs(ACTS, NORMS, f_layer, f_g, f_kk, layers, tile, columns, K0, SLAB)
        if TIMED == 1:
            now = _clock()
            spent += gl.where(slots == c_g * 4 + 1, now - then, 0)
            then = now
        mbarrier.wait(ready.index(i % STAGES), (i // STAGES) & 1)
        fence_async_shared()  # the copies' and the operand's writes, before the wgmma reads them
        if TIMED == 1:
            now = _clock()
            spent += gl.where(slots == c_g * 4 + 0, now - then, 0)
            then = now
        pending = warpgroup_mma(ring.index(i % STAGES), x_smem.index(i % 2).permute((1, 0)), acc, use_acc=c_kk > 0,
                                is_async=True)
        # a row block's last unit stores its outputs before the next operand is polled (the next unit may read
        # them: this program's last qkv rows are in o_proj's input); any other overlaps the next operand with it
        ends = c_kk + BK >= _pick(c_g, K0, K1, K2, K3)
        if (i + 1 < total) & (not ends):  # (into the operand buffer the wgmma before this one read)
            squares, o_scale = _block_operand(ACTS, FAILED, x_smem, (i + 1) % 2, o_words, o_norm, squares, o_layer,
                                              o_g, o_kk, epoch, K0, K1, K2, K3, WIDE, ROWS, WAIT, POLL, POLL_OPERANDS,
                                              EPS)
        if TIMED == 1:
            now = _clock()
            spent += gl.where(slots == c_g * 4 + 2, now - then, 0)
            then = now
        acc = warpgroup_mma_wait(0, deps=[pending])
        mbarrier.arrive(empty.index(i % STAGES))
        if ends:  # its [BR, ROWS] outputs, then the next operand
            _block_outputs(ACTS, SCRATCH, acc, c_scale, c_layer, c_g, c_row, pid, epoch, nprog, N0, N1, N2, N3, WIDE,
                           BR, ROWS, ACC)
            if i + 1 < total:
                squares, o_scale = _block_operand(ACTS, FAILED, x_smem, (i + 1) % 2, o_words, o_norm, squares,
                                                  o_layer, o_g, o_kk, epoch, K0, K1, K2, K3, WIDE, ROWS, WAIT, POLL,
                                                  POLL_OPERANDS, EPS)
        if TIMED == 1:
            now = _clock()
            spent += gl.where(slots == c_g * 4 + 3, now - then, 0)
            then = now
        c_layer, c_g, c_row, c_kk, c_scale = o_layer, o_g, o_row, o_kk, o_scale
        o_layer, o_g, o_row, o_kk, o_words, o_norm = n_layer, n_g, n_row, n_kk, n_words, n_norm
        n_layer, n_g, n_row, n_kk, n_words, n_norm = f_layer, f_g, f_row, f_kk, f_words, f_norm
    if TIMED == 1:
        gl.store(PROFILE + pid * 16 + slots, spent)


@gluon.jit
def _flow_block_chain(W0, W1, W2, W3, ACTS, NORMS, SCRATCH, EPOCH, FAILED, PROFILE, POS, layers,
                      nprog: gl.constexpr, N0: gl.constexpr, K0: gl.constexpr, N1: gl.constexpr, K1: gl.constexpr,
                      N2: gl.constexpr, K2: gl.constexpr, N3: gl.constexpr, K3: gl.constexpr, WIDE: gl.constexpr,
                      BR: gl.constexpr, BK: gl.constexpr, ROWS: gl.constexpr, STAGES: gl.constexpr,
                      WARPS: gl.constexpr, WAIT: gl.constexpr, POLL: gl.constexpr, POLL_OPERANDS: gl.constexpr,
                      TIMED: gl.constexpr, PWARPS: gl.constexpr, PREGS: gl.constexpr, CAP: gl.constexpr,
                      EPS: gl.constexpr):
    """The flow kernel's layer chain (attention left out) for a block of ROWS tokens: the same copy warps as
    _flow_chain, into a ring laid out for wgmma; the dot warps of _ws_block_consumer."""
    ring = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BR, BK], gl.NVMMASharedLayout(128, 16, rank=2))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=32 * PWARPS)
        mbarrier.init(empty.index(s), count=1)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [2, ROWS, BK], gl.NVMMASharedLayout(128, 16, rank=2))
    pid = gl.program_id(0)
    # (no attention: the copy warps' attention operands are never touched, so the ring and its barriers stand in)
    gl.warp_specialize([
        (_ws_block_consumer, (ACTS, NORMS, SCRATCH, EPOCH, FAILED, PROFILE, ring, ready, empty, x_smem, layers, pid,
                              nprog, N0, K0, N1, K1, N2, K2, N3, K3, WIDE, BR, BK, ROWS, STAGES, WARPS, WAIT, POLL,
                              POLL_OPERANDS, TIMED, EPS)),
        (_ws_producer, (W0, W1, W2, W3, W0, W0, W0, W0, POS, layers, ring, ready, empty, ring, ring, ring,
                        ready.index(0), ready.index(0), layers, pid, nprog, N0, K0, N1, K1, N2, K2, N3, K3, BR, BK,
                        STAGES, PWARPS, CAP, 2, 0, True, False, 1, 1, 128, 16)),
    ], [PWARPS], [PREGS])


def block_chain(x0: torch.Tensor, weights: list[torch.Tensor], layers: int, config: tuple, gemvs: tuple,
                wide: int, norms: torch.Tensor, wait: bool = True, profile: torch.Tensor | None = None):
    """flow_chain's layer chain (norms, no attention) for a block of 16 tokens x0 [16, K0]: config as flow_chain's,
    with block_k 256, 4 dot warps and nothing packed; wait=False and `profile` (clock cycles per GEMV and phase,
    int64 [programs, 4, 4]) as there. Returns run() -> the residual stream after the last layer (fp32 [16,
    hidden]) and the FAILED flag."""
    assert config[1] == 256 and config[2] == 4 and not config[7], "block_k 256, 4 dot warps, nothing packed"
    nprog, warps, constants, buffers = _launch_setup(gemvs, wide, layers, config, True, None, 128, wait, True,
                                                     int(profile is not None), 1e-6, ROWS)
    constants.update(ROWS=ROWS, TIMED=int(profile is not None), PREGS=80, POLL=poll_block_asm(wide),
                     POLL_OPERANDS=",".join(["=r"] * 32 + ["r"] * 32 + ["l"] * 32 + ["r"] * 32 + ["l"] * 32))
    cycles = profile if profile is not None else torch.zeros(1, device="cuda", dtype=torch.int64)
    position = torch.zeros(1, device="cuda", dtype=torch.long)  # (the copy warps read one; nothing uses it)
    acts = buffers["acts"]

    def run() -> torch.Tensor:
        stamp_input(x0, buffers, constants, ROWS)
        _flow_block_chain[(nprog,)](*weights, acts, norms, buffers["scratch"], buffers["epoch"], buffers["failed"],
                                    cycles, position, layers, **constants, num_warps=warps)
        return ((acts[layers * 4].view(ROWS, wide)[:, :gemvs[3][1]] & 0xFFFF) << 16).view(torch.float32)

    return run, buffers["failed"]
