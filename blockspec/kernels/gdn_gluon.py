"""kernels/gdn.py's `_gdn_steps` in Triton's Gluon dialect, with its register layout written out (a tile whose
"key_lanes" the table names; CUDA only: Gluon has no interpreter). A program's [Dk, value dims] state tile has the
keys across `LANES` lanes of a warp (Dk / LANES each, q and k in the same lanes) and the value dims across the other
lanes (ROWS each) and the warps, so each token's sums over the keys stay in registers and shuffles and the rank-one
update needs no change of layout: no barrier in the token loop, where Triton's own layouts for the 64 x 2 tile take
19 and ~50 shared-memory accesses a token (design notes, "Where a GDN token's time goes"). Arguments, arithmetic
and what it writes are `_gdn_steps`'s, helper for helper.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

NORM_TOKENS = gl.constexpr(4)  # kernels/gdn.py's gated-norm tile


@gluon.jit
def _pdl_prologue(USE_PDL: gl.constexpr):
    """launch.pdl_prologue (Triton's gdc_wait and gdc_launch_dependents) as the PTX they emit."""
    if USE_PDL:
        gl.inline_asm_elementwise("griddepcontrol.wait; griddepcontrol.launch_dependents; mov.u32 $0, 0;", "=r", [],
                                  dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _replayed(S, k_at, s_kt, decay_at, s_dt, u_at, s_ut, count):
    """kernels/gdn.py `_replayed`: S advanced by a tape's first `count` updates, rounding as the verify did."""
    for t in range(count):
        decay = gl.load(decay_at + t * s_dt)
        k = gl.load(k_at + t * s_kt)
        innovation = gl.load(u_at + t * s_ut)
        S = S * decay
        S = S + gl.expand_dims(k, 1) * gl.expand_dims(innovation, 0)
    return S


@gluon.jit
def _conv_state(WINDOW, CONV, LENGTHS, b, h, dv, first, n, s_wb, s_wt, s_cb, s_cc, HK: gl.constexpr,
                DK: gl.constexpr, DV: gl.constexpr, KERNEL: gl.constexpr, RAGGED: gl.constexpr,
                LINE: gl.constexpr):
    """kernels/gdn.py `_conv_state`: a program's share of the conv state after the row's last token."""
    if RAGGED:
        m = gl.load(LENGTHS + b)
    else:
        m = n
    dk = gl.arange(0, DK, LINE)
    window = WINDOW + b * s_wb
    conv = CONV + b * s_cb
    head = first & (h < HK)
    for j in gl.static_range(KERNEL - 1):
        v_channels = 2 * HK * DK + h * DV + dv
        gl.store(conv + v_channels * s_cc + j, gl.load(window + (m + j) * s_wt + v_channels))
        for i in gl.static_range(2):
            channels = (i * HK + h) * DK + dk
            gl.store(conv + channels * s_cc + j, gl.load(window + (m + j) * s_wt + channels, mask=head), mask=head)


@gluon.jit
def _gated_norm(O, PROJ, NORM_W, OUT, b, first, n, h, s_ob, s_on, s_oh, s_pb, s_pn, s_outb, s_outn, eps,
                HK: gl.constexpr, HV: gl.constexpr, DK: gl.constexpr, DV: gl.constexpr, NORM: gl.constexpr):
    """kernels/gdn.py `_gated_norm` (its rounding points) on a [NORM_TOKENS, DV] tile of layout NORM."""
    t = gl.expand_dims(first + gl.arange(0, NORM_TOKENS, gl.SliceLayout(1, NORM)), 1)
    dv = gl.expand_dims(gl.arange(0, DV, gl.SliceLayout(0, NORM)), 0)
    real = t < n
    o = gl.load(O + b * s_ob + t * s_on + h * s_oh + dv, mask=real, other=0.0, cache_modifier=".cg").to(gl.float32)
    normed = (o * gl.rsqrt(gl.expand_dims(gl.sum(o * o, axis=1), 1) / DV + eps)).to(OUT.dtype.element_ty).to(gl.float32)
    y = (gl.load(NORM_W + dv).to(gl.float32) * normed).to(OUT.dtype.element_ty).to(gl.float32)
    z = gl.load(PROJ + b * s_pb + t * s_pn + 2 * HK * DK + (HV + h) * DV + dv, mask=real, other=0.0).to(gl.float32)
    gl.store(OUT + b * s_outb + t * s_outn + h * DV + dv, (y * (z / (1.0 + gl.exp(-z)))).to(OUT.dtype.element_ty),
             mask=real)


@gluon.jit(do_not_specialize=["n", "deferred"])
def steps_kernel(Q, K, V, BETA, DECAY, POS, STATE, STEPS, TAPE_U, O, PROJ, NORM_W, OUT, WINDOW, CONV, LENGTHS, ARRIVALS,
               TAPE_K, TAPE_DECAY, PENDING,
               s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_bb, s_bn, s_db, s_dn, s_pos, s_sb, s_sh,
               s_tb, s_tt, s_th, s_ub, s_ut, s_uh, s_ob, s_on, s_oh, s_pb, s_pn, s_outb, s_outn, s_wb, s_wt, s_cb, s_cc,
               s_ab, s_kb_tape, s_kt_tape, s_kh_tape, s_db_tape, s_dt_tape, s_pend, n, deferred, eps,
               HK: gl.constexpr, HV: gl.constexpr, DK: gl.constexpr, DV: gl.constexpr, BV: gl.constexpr,
               KERNEL: gl.constexpr, RAGGED: gl.constexpr, KEEP_STATES: gl.constexpr, DEFERS: gl.constexpr,
               TAPE_TOKENS: gl.constexpr, USE_PDL: gl.constexpr, LANES: gl.constexpr):
    # LANES lanes of a warp split the keys; the value dims go across the rest and the warps, ROWS to a thread
    WARPS: gl.constexpr = gl.num_warps()
    ROWS: gl.constexpr = BV // ((32 // LANES) * WARPS)
    TILE: gl.constexpr = gl.BlockedLayout([DK // LANES, ROWS], [LANES, 32 // LANES], [1, WARPS], [0, 1])
    KEYS: gl.constexpr = gl.SliceLayout(1, TILE)
    VALUES: gl.constexpr = gl.SliceLayout(0, TILE)
    LINE: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])  # channels of the conv state, the tape's decay
    NORM: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [WARPS, 1], [1, 0])  # [tokens, value dims]
    TAPE: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [1, WARPS], [1, 0])  # [tokens, keys]
    _pdl_prologue(USE_PDL)
    b = gl.program_id(0)
    h = gl.program_id(1)
    dk = gl.arange(0, DK, KEYS)
    dv = gl.program_id(2) * BV + gl.arange(0, BV, VALUES)
    q_at = Q + b * s_qb + h * s_qh + dk
    k_at = K + b * s_kb + h * s_kh + dk
    v_at = V + b * s_vb + h * s_vh + dv
    beta_at = BETA + b * s_bb + h
    decay_at = DECAY + b * s_db + h
    tile = gl.expand_dims(dk, 1) * DV + gl.expand_dims(dv, 0)
    state = STATE + b * s_sb + h * s_sh + tile
    kept = gl.load(POS + b * s_pos) != 0  # a row at position 0 starts a new sequence, from empty states
    S = gl.load(state, mask=kept & (tile >= 0), other=0.0)  # (tile >= 0: the scalar mask as a tile)
    _conv_state(WINDOW, CONV, LENGTHS, b, h, gl.program_id(2) * BV + gl.arange(0, BV, LINE), gl.program_id(2) == 0,
                n, s_wb, s_wt, s_cb, s_cc, HK, DK, DV, KERNEL, RAGGED, LINE)
    if not DEFERS:
        if deferred != 0:  # commit sets the state from the one before the block: empty for a new sequence
            gl.store(state, S, mask=(kept == 0) & (tile >= 0))
    else:  # the updates the last commit kept, then the committed state
        pending = gl.where(kept, gl.load(PENDING + b * s_pend + h), 0)
        S = _replayed(S, TAPE_K + b * s_kb_tape + h * s_kh_tape + dk, s_kt_tape, TAPE_DECAY + b * s_db_tape + h,
                      s_dt_tape, TAPE_U + b * s_ub + h * s_uh + dv, s_ut, pending)
        gl.thread_barrier()  # every thread's reads of the tape before this program's stores of the block's updates
        if deferred != 0:
            gl.store(state, S, mask=((kept == 0) | (pending > 0)) & (tile >= 0))
    q = gl.load(q_at)
    k = gl.load(k_at)
    v = gl.load(v_at)
    beta = gl.load(beta_at)
    decay = gl.load(decay_at)
    for t in range(n):  # the next token's inputs load before this token's stores, to hide their latency
        more = t + 1 < n
        q_next = gl.load(q_at + (t + 1) * s_qn, mask=more & (dk >= 0), other=0.0)
        k_next = gl.load(k_at + (t + 1) * s_kn, mask=more & (dk >= 0), other=0.0)
        v_next = gl.load(v_at + (t + 1) * s_vn, mask=more & (dv >= 0), other=0.0)
        beta_next = gl.load(beta_at + (t + 1) * s_bn, mask=more, other=0.0)
        decay_next = gl.load(decay_at + (t + 1) * s_dn, mask=more, other=0.0)
        S = S * decay
        seen = gl.sum(S * gl.expand_dims(q, 1), axis=0)  # S^T q beside the innovation's sum, as in _gdn_steps
        innovation = (v - gl.sum(S * gl.expand_dims(k, 1), axis=0)) * beta
        S = S + gl.expand_dims(k, 1) * gl.expand_dims(innovation, 0)
        o = seen + innovation * gl.sum(k * q, axis=0)
        gl.store(O + b * s_ob + t * s_on + h * s_oh + dv, o.to(O.dtype.element_ty))
        if KEEP_STATES:
            gl.store(STEPS + b * s_tb + t * s_tt + h * s_th + tile, S)
        else:
            gl.store(TAPE_U + b * s_ub + t * s_ut + h * s_uh + dv, innovation)
        q = q_next
        k = k_next
        v = v_next
        beta = beta_next
        decay = decay_next
    if deferred == 0:
        gl.store(state, S)
    # the last of a head's value tiles applies the gated norm; the barrier and the release publish o
    gl.thread_barrier()
    arrivals = ARRIVALS + b * s_ab + h
    if gl.atomic_add(arrivals, 1, sem="acq_rel") == DV // BV - 1:
        for first in range(0, n, NORM_TOKENS):
            _gated_norm(O, PROJ, NORM_W, OUT, b, first, n, h, s_ob, s_on, s_oh, s_pb, s_pn, s_outb, s_outn, eps, HK,
                        HV, DK, DV, NORM)
        gl.store(arrivals, 0)
        if DEFERS:  # the block's k and decay to the tape, and nothing pending
            block = gl.arange(0, TAPE_TOKENS, gl.SliceLayout(1, TAPE))
            keys = gl.expand_dims(gl.arange(0, DK, gl.SliceLayout(0, TAPE)), 0)
            live = gl.expand_dims(block < n, 1) & (keys >= 0)
            rows = gl.expand_dims(block, 1)
            ks = gl.load(K + b * s_kb + h * s_kh + keys + rows * s_kn, mask=live)
            gl.store(TAPE_K + b * s_kb_tape + rows * s_kt_tape + h * s_kh_tape + keys, ks, mask=live)
            block1 = gl.arange(0, TAPE_TOKENS, LINE)
            live1 = block1 < n
            gl.store(TAPE_DECAY + b * s_db_tape + block1 * s_dt_tape + h, gl.load(decay_at + block1 * s_dn, mask=live1),
                     mask=live1)
            gl.store(PENDING + b * s_pend + h, 0)
