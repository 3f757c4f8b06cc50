"""Gated DeltaNet decode and verify (the linear-attention layers of Qwen3.5 targets) in two kernels, the commit of a
"replay" cache, and a prefill's inputs and gated norm around a chunked recurrence (SPEC section 9; the torch path and
the arithmetic are in target/gdn.py).

`_gdn_inputs`: a program per (row, tile of tokens, key head) computes what the recurrence takes, with the torch
path's per-token arithmetic: the causal conv + SiLU of the head's q and k channels and of the v channels of the value
heads it serves (from the conv state, then the projection), the L2 norms of q and k, beta and the decay from b, a,
A_log and dt_bias; it also writes the conv window. Apart from the recurrence, all tokens at once: the serial part
below does no more than it must.

`_gdn_steps`: a program per (row, value head, block of value dims) holds its [Dk, value dims] slice of the fp32
state in registers (the tile: `gdn_tile`) and runs the tokens through it one by one (`delta_rule_step`). It writes
each token's output, what commit needs (the state after each token, or the replay tape) and the final state, except
in a verify that commit follows: commit then sets the state once (`_gdn_replay` advances it in place by the kept
updates), or, in a batch of KernelSettings.defer_replay_rows or more, records how many (`pending`, per row and head;
in a cache that may defer), which the next decode or verify of as many rows applies here first, with the same
arithmetic, storing the committed state before its block: one read of every state a step instead of three (a pass
of fewer rows compiles without that and finds the states settled). A verify of n tokens and n one-token decodes
run the same code per token, so they make the same choices.

The gated RMSNorm * silu(z) of each token and head needs the head's whole output, which a head's value tiles share
out: the last tile of a head to finish (a counter per row and head, `arrivals`, back to zero after) applies it to
the head's tokens. Every program first copies its share of the conv state after the last token from the window (the
programs of `_gdn_inputs` cannot update it themselves, as one would overwrite what another has yet to read), off that
serial tail. A decode or verify is thus two launches a layer besides the projections.

A prefill (`gdn_prefill`) runs `_gdn_inputs` without the window (sized for a verify block, not a prompt), then
`_prefill_states` (the conv state after the prompt, gathered from the projection and the old state, and a zero
initial state for a new sequence), flash-linear-attention's chunked recurrence, then the gated norm alone
(`_gdn_output`).

Fused multiply-adds are off (`enable_fp_fusion=False`) in every kernel here: each product and sum rounds once, as
the torch ops do, a replayed update equals the one the verify applied bit for bit, and the gated norm rounds alike
in the recurrence's last programs and in a prefill's `_gdn_output`.
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from blockspec.cache import GDNLayerState, defers_commits
from blockspec.kernels.launch import pdl_options, pdl_prologue
from blockspec.kernels.settings import gdn_tile


NORM_TOKENS = tl.constexpr(4)  # tokens a gated-norm tile takes: their loads in one round trip
# tokens an inputs program takes, in every call: a fixed tile, so that a token's sums run alike in a decode, a verify
# and a prefill (a prefill's programs taking 8 ran its inputs 26% slower on the H100, though with fewer instructions)
INPUT_TOKENS = tl.constexpr(4)


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20): log1p(exp(x)), with log1p as log(u) * y / (u - 1) for u = 1 + y, accurate
    where exp(x) is tiny (libdevice's log1p has no counterpart in Triton's interpreter)."""
    y = tl.exp(x)
    u = 1.0 + y
    log1p = tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _conv_silu(X, s_xn, CONV, s_cc, W, s_wc, s_wj, WINDOW, s_wt, channels, t, kept, live, KERNEL: tl.constexpr,
               STORE_WINDOW: tl.constexpr):
    """SiLU of the depthwise causal conv at tokens t [T, 1] for `channels` [1, C] (where `live`), rounded to X's dtype:
    sum_j W[c, j] * window[c, t+j] in fp32, where the window is the conv state (zeros unless `kept`) followed by the
    tokens' inputs X[token, c]. With STORE_WINDOW the window is written out too (token t's input at K-1+t, and by the
    tile holding token 0 the conv state before it); a token's channels are contiguous there.

    Every [T, C] operand is read in the tile's own layout, so that no tap waits on a shared-memory round trip: the
    inputs and a tap's weights as [T, C] loads (the weights repeated per token, contiguous over the channels where
    the weight is held taps-major: GatedDeltaNet.hold_conv_taps_major), the conv state's K-1 slots once each, picked
    per token where a tap reaches into them."""
    starts = tl.min(t, axis=0)[None, :] == 0  # [1, 1]: the tile holds token 0 (only it reaches into the state)
    state = ()
    for i in tl.static_range(KERNEL - 1):
        state = state + (tl.load(CONV + channels * s_cc + i, mask=kept & starts, other=0.0),)
        if STORE_WINDOW:
            tl.store(WINDOW + i * s_wt + channels, state[i], mask=starts)
    acc = tl.zeros([t.shape[0], channels.shape[1]], tl.float32)
    for j in tl.static_range(KERNEL):
        p = t + j  # position in the window
        x = tl.load(X + (p - (KERNEL - 1)) * s_xn + channels, mask=(p >= KERNEL - 1) & live, other=0.0)
        if STORE_WINDOW and j == KERNEL - 1:  # p - (K-1) = t: the tile's own inputs
            tl.store(WINDOW + p * s_wt + channels, x, mask=live)
        for i in tl.static_range(j, KERNEL - 1):  # slot i serves the tap at token i - j
            x = tl.where(p == i, state[i], x)
        acc = acc + x.to(tl.float32) * tl.load(W + channels * s_wc + j * s_wj + 0 * t).to(tl.float32)
    return (acc / (1.0 + tl.exp(-acc))).to(X.dtype.element_ty)


@triton.jit
def _store_heads(OUT, s_on, s_oh, x, t, first, live, D: tl.constexpr):
    """x [T, m x D] (m consecutive heads' D values side by side) to OUT[t, h, :] for heads h from `first`."""
    cols = tl.arange(0, x.shape[1])[None, :]
    tl.store(OUT + t * s_on + (first + cols // D) * s_oh + cols % D, x, mask=live)


# n varies per call: specialising on it (n == 1 above all) would compile a decode apart from a verify
@triton.jit(do_not_specialize=["n"])
def _gdn_inputs(PROJ, CONV_W, A_LOG, DT_BIAS, POS, LENGTHS, CONV, WINDOW, Q, K, V, BETA, DECAY,
                s_pb, s_pn, s_pos, s_cb, s_cc, s_wc, s_wj, s_wb, s_wt, s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn,
                s_vh, s_bb, s_bn, s_db, s_dn, n, HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr,
                DV: tl.constexpr, KERNEL: tl.constexpr, RAGGED: tl.constexpr, PREFILL: tl.constexpr,
                USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    tiles = tl.cdiv(n, INPUT_TOKENS)
    b = tl.program_id(0) // tiles
    t = (tl.program_id(0) % tiles) * INPUT_TOKENS + tl.arange(0, INPUT_TOKENS)[:, None]  # [T, 1]
    live = t < n
    hk = tl.program_id(1)
    SHARED: tl.constexpr = HV // HK  # each q/k head serves this many consecutive value heads
    first = hk * SHARED  # the first of them
    dk = tl.arange(0, DK)[None, :]
    q_channels = hk * DK + dk
    k_channels = HK * DK + q_channels
    v_channels = 2 * HK * DK + first * DV + tl.arange(0, SHARED * DV)[None, :]
    x = PROJ + b * s_pb  # [n, conv channels | z | b | a]
    conv = CONV + b * s_cb
    kept = tl.load(POS + b * s_pos) != 0  # a row at position 0 starts a new sequence, from empty states
    window = WINDOW + b * s_wb  # a prefill writes none (the window holds a verify block)
    q = _conv_silu(x, s_pn, conv, s_cc, CONV_W, s_wc, s_wj, window, s_wt, q_channels, t, kept, live, KERNEL,
                   not PREFILL)
    k = _conv_silu(x, s_pn, conv, s_cc, CONV_W, s_wc, s_wj, window, s_wt, k_channels, t, kept, live, KERNEL,
                   not PREFILL)
    v = _conv_silu(x, s_pn, conv, s_cc, CONV_W, s_wc, s_wj, window, s_wt, v_channels, t, kept, live, KERNEL,
                   not PREFILL)
    q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    q = q * tl.rsqrt(tl.sum(q * q, axis=1)[:, None] + 1e-6)
    q = q * (DK ** -0.5)
    k = k * tl.rsqrt(tl.sum(k * k, axis=1)[:, None] + 1e-6)
    heads = first + tl.arange(0, SHARED)[None, :]  # [1, SHARED]
    gates = x + t * s_pn + 2 * HK * DK + 2 * HV * DV + heads  # b, then a
    beta = tl.load(gates, mask=live, other=0.0).to(tl.float32)
    beta = (1.0 / (1.0 + tl.exp(-beta))).to(PROJ.dtype.element_ty).to(tl.float32)
    a = tl.load(gates + HV, mask=live, other=0.0).to(tl.float32) + tl.load(DT_BIAS + heads).to(tl.float32)
    g = -tl.exp(tl.load(A_LOG + heads).to(tl.float32)) * _softplus(a)
    decay = g if PREFILL else tl.exp(g)  # the chunked prefill takes the log-decay
    if RAGGED:  # a padding token: zero inputs and no decay leave the state exactly as it was
        real = t < tl.load(LENGTHS + b)
        q, k, v = tl.where(real, q, 0.0), tl.where(real, k, 0.0), tl.where(real, v, 0.0)
        beta, decay = tl.where(real, beta, 0.0), tl.where(real, decay, 0.0 if PREFILL else 1.0)
    for shared in tl.static_range(SHARED):  # the recurrence reads q and k per value head
        tl.store(Q + b * s_qb + t * s_qn + (first + shared) * s_qh + dk, q, mask=live)
        tl.store(K + b * s_kb + t * s_kn + (first + shared) * s_kh + dk, k, mask=live)
    _store_heads(V + b * s_vb, s_vn, s_vh, v, t, first, live, DV)
    tl.store(BETA + b * s_bb + t * s_bn + heads, beta, mask=live)
    tl.store(DECAY + b * s_db + t * s_dn + heads, decay, mask=live)


@triton.jit
def _replayed(S, k_at, s_kt, decay_at, s_dt, u_at, s_ut, count):
    """The state tile S advanced by the first `count` updates of a tape (update t: k at k_at + t s_kt, the decay at
    decay_at + t s_dt, the innovation at u_at + t s_ut), each with the verify's two roundings: S * decay, then
    + k innovation^T."""
    for t in range(count):
        decay = tl.load(decay_at + t * s_dt)
        k = tl.load(k_at + t * s_kt)
        innovation = tl.load(u_at + t * s_ut)
        S = S * decay
        S = S + k[:, None] * innovation[None, :]
    return S


# deferred, like n, must not compile a verify apart from a decode
@triton.jit(do_not_specialize=["n", "deferred"])
def _gdn_steps(Q, K, V, BETA, DECAY, POS, STATE, STEPS, TAPE_U, O, PROJ, NORM_W, OUT, WINDOW, CONV, LENGTHS, ARRIVALS,
               TAPE_K, TAPE_DECAY, PENDING,
               s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_vb, s_vn, s_vh, s_bb, s_bn, s_db, s_dn, s_pos, s_sb, s_sh,
               s_tb, s_tt, s_th, s_ub, s_ut, s_uh, s_ob, s_on, s_oh, s_pb, s_pn, s_outb, s_outn, s_wb, s_wt, s_cb, s_cc,
               s_ab, s_kb_tape, s_kt_tape, s_kh_tape, s_db_tape, s_dt_tape, s_pend, n, deferred, eps,
               HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
               KERNEL: tl.constexpr, RAGGED: tl.constexpr, KEEP_STATES: tl.constexpr, DEFERS: tl.constexpr,
               TAPE_TOKENS: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    dk = tl.arange(0, DK)
    dv = tl.program_id(2) * BV + tl.arange(0, BV)
    q_at = Q + b * s_qb + h * s_qh + dk
    k_at = K + b * s_kb + h * s_kh + dk
    v_at = V + b * s_vb + h * s_vh + dv
    beta_at = BETA + b * s_bb + h
    decay_at = DECAY + b * s_db + h
    tile = dk[:, None] * DV + dv[None, :]
    state = STATE + b * s_sb + h * s_sh + tile
    kept = tl.load(POS + b * s_pos) != 0  # a row at position 0 starts a new sequence, from empty states
    S = tl.load(state, mask=kept, other=0.0)
    _conv_state(WINDOW, CONV, LENGTHS, b, h, dv, tl.program_id(2) == 0, n, s_wb, s_wt, s_cb, s_cc, HK, DK, DV, KERNEL,
                RAGGED)
    if not DEFERS:
        if deferred != 0:  # commit sets the state from the one before the block: empty for a new sequence
            tl.store(state, S, mask=kept == 0)
    else:  # the updates the last commit kept, with the replay's arithmetic (_gdn_replay), then the committed state
        pending = tl.where(kept, tl.load(PENDING + b * s_pend + h), 0)
        S = _replayed(S, TAPE_K + b * s_kb_tape + h * s_kh_tape + dk, s_kt_tape, TAPE_DECAY + b * s_db_tape + h,
                      s_dt_tape, TAPE_U + b * s_ub + h * s_uh + dv, s_ut, pending)
        tl.debug_barrier()  # every thread's reads of the tape before this program's stores of the block's updates
        if deferred != 0:
            tl.store(state, S, mask=(kept == 0) | (pending > 0))
    q, k, v = tl.load(q_at), tl.load(k_at), tl.load(v_at)
    beta, decay = tl.load(beta_at), tl.load(decay_at)
    for t in range(n):
        # the next token's inputs are loaded before this token's stores, so their latency hides behind its work
        more = t + 1 < n
        q_next = tl.load(q_at + (t + 1) * s_qn, mask=more, other=0.0)
        k_next = tl.load(k_at + (t + 1) * s_kn, mask=more, other=0.0)
        v_next = tl.load(v_at + (t + 1) * s_vn, mask=more, other=0.0)
        beta_next = tl.load(beta_at + (t + 1) * s_bn, mask=more, other=0.0)
        decay_next = tl.load(decay_at + (t + 1) * s_dn, mask=more, other=0.0)
        S = S * decay
        # the output S_new^T q = S^T q + innovation (k . q): its reduction runs beside the innovation's, not after
        # the update, which keeps one pass over the state off each token's serial path
        seen = tl.sum(S * q[:, None], axis=0)
        innovation = (v - tl.sum(S * k[:, None], axis=0)) * beta
        S = S + k[:, None] * innovation[None, :]
        o = seen + innovation * tl.sum(k * q, axis=0)
        tl.store(O + b * s_ob + t * s_on + h * s_oh + dv, o.to(O.dtype.element_ty))
        if KEEP_STATES:
            tl.store(STEPS + b * s_tb + t * s_tt + h * s_th + tile, S)
        else:
            tl.store(TAPE_U + b * s_ub + t * s_ut + h * s_uh + dv, innovation)
        q, k, v, beta, decay = q_next, k_next, v_next, beta_next, decay_next
    if deferred == 0:
        tl.store(state, S)
    # The last of a head's value tiles to finish applies the gated norm to the head's outputs.
    # The barrier and the counter's release publish every thread's stores of o; the last reads the others' past L1.
    tl.debug_barrier()
    arrivals = ARRIVALS + b * s_ab + h
    if tl.atomic_add(arrivals, 1, sem="acq_rel") == DV // BV - 1:
        for first in range(0, n, NORM_TOKENS):
            _gated_norm(O, PROJ, NORM_W, OUT, b, first, n, h, s_ob, s_on, s_oh, s_pb, s_pn, s_outb, s_outn, eps, HK,
                        HV, DK, DV, ".cg")
        tl.store(arrivals, 0)  # every tile has arrived: ready for the layer's next launch
        if DEFERS:  # every tile has replayed the head's old tape: it takes the block's k and decay now, all its
            # tokens in one load and one store (one token at a time they were n dependent round trips on this tail)
            block = tl.arange(0, TAPE_TOKENS)
            live = block < n
            ks = tl.load(k_at[None, :] + block[:, None] * s_kn, mask=live[:, None])
            tl.store(TAPE_K + b * s_kb_tape + block[:, None] * s_kt_tape + h * s_kh_tape + dk[None, :], ks,
                     mask=live[:, None])
            tl.store(TAPE_DECAY + b * s_db_tape + block * s_dt_tape + h, tl.load(decay_at + block * s_dn, mask=live),
                     mask=live)
            tl.store(PENDING + b * s_pend + h, 0)  # and has applied what was pending


@triton.jit
def _gated_norm(O, PROJ, NORM_W, OUT, b, first, n, h, s_ob, s_on, s_oh, s_pb, s_pn, s_outb, s_outn, eps,
                HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, CACHE: tl.constexpr):
    """Head h of the gated RMSNorm * silu(z) for tokens first .. first + NORM_TOKENS - 1 below n, with GatedRMSNorm's
    rounding points: normed in fp32 and cast, times the weight (cast), times silu(z) in fp32, cast. Every caller
    takes the same tile without fused multiply-adds, so a prefill, a verify and a decode round alike. CACHE: the
    load modifier of o."""
    t = first + tl.arange(0, NORM_TOKENS)[:, None]
    dv = tl.arange(0, DV)[None, :]
    real = t < n
    o = tl.load(O + b * s_ob + t * s_on + h * s_oh + dv, mask=real, other=0.0, cache_modifier=CACHE).to(tl.float32)
    normed = (o * tl.rsqrt(tl.sum(o * o, axis=1)[:, None] / DV + eps)).to(OUT.dtype.element_ty).to(tl.float32)
    y = (tl.load(NORM_W + dv).to(tl.float32) * normed).to(OUT.dtype.element_ty).to(tl.float32)
    z = tl.load(PROJ + b * s_pb + t * s_pn + 2 * HK * DK + (HV + h) * DV + dv, mask=real, other=0.0).to(tl.float32)
    tl.store(OUT + b * s_outb + t * s_outn + h * DV + dv, (y * (z / (1.0 + tl.exp(-z)))).to(OUT.dtype.element_ty),
             mask=real)


@triton.jit
def _conv_state(WINDOW, CONV, LENGTHS, b, h, dv, first, n, s_wb, s_wt, s_cb, s_cc, HK: tl.constexpr, DK: tl.constexpr,
                DV: tl.constexpr, KERNEL: tl.constexpr, RAGGED: tl.constexpr):
    """A program's share of the conv state after the row's last token m, window rows m .. m+K-2: value head h's
    channels `dv`, and with `first` the q and k channels of key head h (if there is one). Not in `_gdn_inputs`, whose
    programs would overwrite what others have yet to read; here no program reads the conv state."""
    m = tl.load(LENGTHS + b) if RAGGED else n
    dk = tl.arange(0, DK)
    window, conv = WINDOW + b * s_wb, CONV + b * s_cb
    head = first & (h < HK)
    v_channels = 2 * HK * DK + h * DV + dv
    for j in tl.static_range(KERNEL - 1):
        tl.store(conv + v_channels * s_cc + j, tl.load(window + (m + j) * s_wt + v_channels))
        for i in tl.static_range(2):  # q, then k
            channels = (i * HK + h) * DK + dk
            tl.store(conv + channels * s_cc + j, tl.load(window + (m + j) * s_wt + channels, mask=head), mask=head)


@triton.jit
def _new_conv_state(X, s_pn, CONV, s_cc, channels, m, kept, mask, KERNEL: tl.constexpr, KP: tl.constexpr):
    """`channels`' conv state after a prompt's last token m, as a [KP, channels] tile (rows past K-2 masked): slots
    m .. m+K-2 of (the conv state, zeros unless `kept`; then the tokens' inputs X[token, c])."""
    j = tl.arange(0, KP)[:, None]
    slot = m + j
    token = slot - (KERNEL - 1)
    real = (j < KERNEL - 1) & mask
    new = tl.load(X + token * s_pn + channels[None, :], mask=real & (token >= 0), other=0.0)
    old = tl.load(CONV + channels[None, :] * s_cc + slot, mask=real & (token < 0) & kept, other=0.0)
    return tl.where(token >= 0, new, old), real


@triton.jit(do_not_specialize=["n"])
def _prefill_states(PROJ, CONV, STATE, POS, LENGTHS, s_pb, s_pn, s_pos, s_cb, s_cc, s_sb, s_sh, n,
                    HK: tl.constexpr, HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, KERNEL: tl.constexpr,
                    KP: tl.constexpr, ZERO_ROWS: tl.constexpr, RAGGED: tl.constexpr, USE_PDL: tl.constexpr):
    """A program per (row, value head), after the prefill's inputs and before its chunked recurrence: the head's
    channels of the conv state after the row's last token (its value channels, and its q and k channels where h is
    also a key head), and its recurrent state zeroed where the row starts a new sequence (the initial state)."""
    pdl_prologue(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    m = tl.load(LENGTHS + b) if RAGGED else n
    kept = tl.load(POS + b * s_pos) != 0
    x, conv = PROJ + b * s_pb, CONV + b * s_cb
    dk = tl.arange(0, DK)
    v_channels = 2 * HK * DK + h * DV + tl.arange(0, DV)
    q_channels = h * DK + dk
    k_channels = (HK + h) * DK + dk
    head = h < HK
    v, v_mask = _new_conv_state(x, s_pn, conv, s_cc, v_channels, m, kept, True, KERNEL, KP)
    q, q_mask = _new_conv_state(x, s_pn, conv, s_cc, q_channels, m, kept, head, KERNEL, KP)
    k, k_mask = _new_conv_state(x, s_pn, conv, s_cc, k_channels, m, kept, head, KERNEL, KP)
    tl.debug_barrier()  # a slot read above may be one another thread of this program writes below
    j = tl.arange(0, KP)[:, None]
    tl.store(conv + v_channels[None, :] * s_cc + j, v, mask=v_mask)
    tl.store(conv + q_channels[None, :] * s_cc + j, q, mask=q_mask)
    tl.store(conv + k_channels[None, :] * s_cc + j, k, mask=k_mask)
    if not kept:
        state = STATE + b * s_sb + h * s_sh
        tile = tl.arange(0, ZERO_ROWS)[:, None] * DV + tl.arange(0, DV)[None, :]
        for i in tl.static_range(0, DK, ZERO_ROWS):
            tl.store(state + i * DV + tile, tl.zeros([ZERO_ROWS, DV], tl.float32))


@triton.jit(do_not_specialize=["n"])
def _gdn_output(O, PROJ, NORM_W, OUT, s_ob, s_on, s_oh, s_pb, s_pn, s_outb, s_outn, n, eps, HK: tl.constexpr,
                HV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    _gated_norm(O, PROJ, NORM_W, OUT, tl.program_id(0), tl.program_id(1) * NORM_TOKENS, n, tl.program_id(2), s_ob,
                s_on, s_oh, s_pb, s_pn, s_outb, s_outn, eps, HK, HV, DK, DV, "")


def _inputs(projected: torch.Tensor, positions: torch.Tensor, conv_weight: torch.Tensor, A_log: torch.Tensor,
            dt_bias: torch.Tensor, layer: GDNLayerState, lengths: torch.Tensor | None, k: torch.Tensor,
            decay: torch.Tensor, prefill: bool) -> tuple[torch.Tensor, ...]:
    """`_gdn_inputs` over every token of `projected` [b, n, ...]: (q, k, v, beta, decay) [b, n, h, ...], writing k
    and the decay into the buffers given; q, v and beta in fp32, for a prefill in k's dtype. A prefill writes no conv
    window and gives the log-decay."""
    b, n, _ = projected.shape
    heads, key_dim, value_dim = layer.recurrent.shape[1:]
    channels, kernel = conv_weight.shape[0], conv_weight.shape[-1]
    made = {"device": projected.device, "dtype": k.dtype if prefill else torch.float32}
    q = torch.empty(b, n, heads, key_dim, **made)
    v = torch.empty(b, n, heads, value_dim, **made)
    beta = torch.empty(b, n, heads, **made)
    ragged = lengths is not None
    _gdn_inputs[(b * triton.cdiv(n, INPUT_TOKENS.value), _key_heads(layer, channels))](
        projected, conv_weight, A_log, dt_bias, positions, lengths if ragged else positions, layer.conv,
        layer.windows, q, k, v, beta, decay, projected.stride(0), projected.stride(1), positions.stride(0),
        layer.conv.stride(0), layer.conv.stride(1), conv_weight.stride(0), conv_weight.stride(2),
        layer.windows.stride(0), layer.windows.stride(1), *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *beta.stride()[:2], *decay.stride()[:2], n, HK=_key_heads(layer, channels), HV=heads, DK=key_dim,
        DV=value_dim, KERNEL=kernel, RAGGED=ragged, PREFILL=prefill, num_warps=4,
        enable_fp_fusion=False, **pdl_options(projected))
    return q, k, v, beta, decay


def _output(o: torch.Tensor, projected: torch.Tensor, norm_weight: torch.Tensor, eps: float, layer: GDNLayerState
            ) -> torch.Tensor:
    """`_gdn_output`: the gated norm of a prefill's recurrence outputs o [b, n, h, Dv] -> [b, n, h * Dv]."""
    b, n, heads, value_dim = o.shape
    out = torch.empty(b, n, heads * value_dim, device=projected.device, dtype=projected.dtype)
    _gdn_output[(b, triton.cdiv(n, NORM_TOKENS), heads)](
        o, projected, norm_weight, out, o.stride(0), o.stride(1), o.stride(2), projected.stride(0),
        projected.stride(1), out.stride(0), out.stride(1), n, eps, HK=_key_heads(layer, layer.conv.shape[1]), HV=heads,
        DK=layer.recurrent.shape[2], DV=value_dim, num_warps=1, enable_fp_fusion=False, **pdl_options(projected))
    return out


def _states_before_recurrence(projected: torch.Tensor, positions: torch.Tensor, layer: GDNLayerState,
                              lengths: torch.Tensor | None, kernel: int) -> None:
    """`_prefill_states`: the layer's conv state after each row's prompt, and its recurrent state zeroed where a
    row starts a new sequence (one launch where the torch ops take ten)."""
    b, n, _ = projected.shape
    heads, key_dim, value_dim = layer.recurrent.shape[1:]
    ragged = lengths is not None
    _prefill_states[(b, heads)](
        projected, layer.conv, layer.recurrent, positions, lengths if ragged else positions, projected.stride(0),
        projected.stride(1), positions.stride(0), layer.conv.stride(0), layer.conv.stride(1),
        layer.recurrent.stride(0), layer.recurrent.stride(1), n, HK=_key_heads(layer, layer.conv.shape[1]), HV=heads,
        DK=key_dim, DV=value_dim, KERNEL=kernel, KP=triton.next_power_of_2(kernel - 1),
        ZERO_ROWS=min(8, key_dim), RAGGED=ragged, num_warps=2, **pdl_options(projected))


def _key_heads(layer: GDNLayerState, channels: int) -> int:
    """The q/k heads of a layer whose conv has `channels` (q, k, then v)."""
    heads, key_dim, value_dim = layer.recurrent.shape[1:]
    return (channels - heads * value_dim) // (2 * key_dim)


def gdn_steps(projected: torch.Tensor, positions: torch.Tensor, conv_weight: torch.Tensor, A_log: torch.Tensor,
              dt_bias: torch.Tensor, norm_weight: torch.Tensor, eps: float, layer: GDNLayerState,
              lengths: torch.Tensor | None = None, deferred: bool = False) -> torch.Tensor:
    """A Gated DeltaNet layer's decode or verify of n tokens (n <= the cache's verify_tokens): `projected`
    [b, n, C + V + 2h] (in_proj's output: conv channels q, k, v, then z, b, a), the rows' positions [b, n] (a row at
    position 0 starts from empty states), and with `lengths` [b] rows right-padded past them (prompts prefilled
    together). Updates `layer` as target/gdn.py's torch path does (`deferred`: the recurrent state is left to
    commit); returns the gated norm's output [b, n, V] (what out_proj takes)."""
    b, n, _ = projected.shape
    heads, key_dim, value_dim = layer.recurrent.shape[1:]
    for t in (layer.recurrent, layer.steps):
        assert t is None or t.stride(-1) == 1 and t.stride(-2) == value_dim, "state tiles must be contiguous"
    assert projected.stride(-1) == 1 and layer.conv.stride(-1) == 1 and layer.windows.stride(-1) == 1
    fp32 = {"device": projected.device, "dtype": torch.float32}
    states = layer.steps is not None
    defers = defers_commits(layer.pending, b)  # a cache's pending counts; too few rows: settled before, none left
    # k and the decay go straight to a replay cache's tape, unless a commit may have left the tape's updates pending:
    # `_gdn_steps` applies them first, and its last program of a head copies the block's k and decay there after
    k, decay = ((layer.tape_k, layer.tape_decay) if not (states or defers) else
                (torch.empty(b, n, heads, key_dim, **fp32), torch.empty(b, n, heads, **fp32)))
    q, k, v, beta, decay = _inputs(projected, positions, conv_weight, A_log, dt_bias, layer, lengths, k, decay,
                                   prefill=False)
    o = torch.empty(b, n, heads, value_dim, device=projected.device, dtype=projected.dtype)
    out = torch.empty(b, n, heads * value_dim, device=projected.device, dtype=projected.dtype)
    steps, tape_u = (layer.steps, v) if states else (layer.recurrent.unsqueeze(1), layer.tape_u)
    # without deferred commits there is nothing pending: those arguments are never read
    tape_k, tape_decay, pending = ((layer.tape_k, layer.tape_decay, layer.pending) if defers else
                                   (k, decay, layer.arrivals))
    tile = gdn_tile(projected.device, b)
    block_v = min(tile["value_dims"], value_dim)
    ragged = lengths is not None
    _gdn_steps[(b, heads, value_dim // block_v)](
        q, k, v, beta, decay, positions, layer.recurrent, steps, tape_u, o, projected, norm_weight, out,
        layer.windows, layer.conv, lengths if ragged else positions, layer.arrivals, tape_k, tape_decay, pending,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *beta.stride()[:2], *decay.stride()[:2],
        positions.stride(0), layer.recurrent.stride(0), layer.recurrent.stride(1), *steps.stride()[:3],
        *tape_u.stride()[:3], *o.stride()[:3], projected.stride(0), projected.stride(1), out.stride(0), out.stride(1),
        layer.windows.stride(0), layer.windows.stride(1), layer.conv.stride(0), layer.conv.stride(1),
        layer.arrivals.stride(0), *tape_k.stride()[:3], *tape_decay.stride()[:2], pending.stride(0), n,
        int(deferred), eps, HK=_key_heads(layer, conv_weight.shape[0]), HV=heads,
        DK=key_dim, DV=value_dim, BV=block_v, KERNEL=conv_weight.shape[-1], RAGGED=ragged, KEEP_STATES=states,
        DEFERS=defers, TAPE_TOKENS=triton.next_power_of_2(tape_k.shape[1]) if defers else 1, num_warps=tile["warps"],
        enable_fp_fusion=False, **pdl_options(projected))
    return out


def gdn_prefill(projected: torch.Tensor, positions: torch.Tensor, conv_weight: torch.Tensor, A_log: torch.Tensor,
                dt_bias: torch.Tensor, norm_weight: torch.Tensor, eps: float, layer: GDNLayerState,
                lengths: torch.Tensor | None, chunked: Callable) -> torch.Tensor:
    """A Gated DeltaNet layer's prefill of n tokens, arguments as `gdn_steps` takes them: the inputs and the gated norm
    in this module's kernels (the decode's arithmetic), the recurrence in `chunked` (flash-linear-attention's
    chunk_gated_delta_rule: q, k, v, g, beta as [b, n, h, ...]); sets the layer's recurrent and conv states. q, k, v
    and beta go to it in the projection's dtype (each rounded once from the decode's fp32 values), as Hugging Face's
    Qwen3.5 hands them over: in bf16 its kernels read half the bytes and multiply at twice tf32's rate."""
    b, n, _ = projected.shape
    heads, key_dim, value_dim = layer.recurrent.shape[1:]
    device = projected.device
    q, k, v, beta, g = _inputs(projected, positions, conv_weight, A_log, dt_bias, layer, lengths,
                               torch.empty(b, n, heads, key_dim, device=device, dtype=projected.dtype),
                               torch.empty(b, n, heads, device=device, dtype=torch.float32), prefill=True)
    _states_before_recurrence(projected, positions, layer, lengths, conv_weight.shape[-1])
    o, final = chunked(q, k, v, g, beta, scale=1.0, initial_state=layer.recurrent, output_final_state=True)
    out = _output(o.to(projected.dtype), projected, norm_weight, eps, layer)
    layer.recurrent.copy_(final)
    return out


@triton.jit
def _gdn_replay(STATE, TAPE_K, TAPE_DECAY, TAPE_U, KEEP, s_sl, s_sb, s_sh, s_kl, s_kb, s_kt, s_kh, s_dl, s_db, s_dt,
                s_ul, s_ub, s_ut, s_uh, s_keep, rows, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
                USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    layer = tl.program_id(0) // rows
    b = tl.program_id(0) % rows
    h = tl.program_id(1)
    dk = tl.arange(0, DK)
    dv = tl.program_id(2) * BV + tl.arange(0, BV)
    state = STATE + layer * s_sl + b * s_sb + h * s_sh + dk[:, None] * DV + dv[None, :]
    keep = tl.load(KEEP + b * s_keep)
    if keep > 0:  # none (a settled row that starts a new sequence): the state need not be read
        S = _replayed(tl.load(state), TAPE_K + layer * s_kl + b * s_kb + h * s_kh + dk, s_kt,
                      TAPE_DECAY + layer * s_dl + b * s_db + h, s_dt, TAPE_U + layer * s_ul + b * s_ub + h * s_uh + dv,
                      s_ut, keep)
        tl.store(state, S)


def replay(recurrent: torch.Tensor, tape_k: torch.Tensor, tape_decay: torch.Tensor, tape_u: torch.Tensor,
           keep: torch.Tensor) -> None:
    """A "replay" cache's commit of its recurrent states [L, b, h, Dk, Dv], all layers in one launch: each row's state
    (the one before the verify) advances, in place, by its first keep[row] updates of the tape (target/gdn.py
    replay_steps). Programs take the decode's state tile (`gdn_tile`)."""
    layers, b, heads, key_dim, value_dim = recurrent.shape
    tile = gdn_tile(recurrent.device, b)
    block_v = min(tile["value_dims"], value_dim)
    assert recurrent.stride(-1) == 1 and recurrent.stride(-2) == value_dim, "state tiles must be contiguous"
    _gdn_replay[(layers * b, heads, value_dim // block_v)](
        recurrent, tape_k, tape_decay, tape_u, keep, *recurrent.stride()[:3], *tape_k.stride()[:4],
        *tape_decay.stride()[:3], *tape_u.stride()[:4], keep.stride(0), b,
        DK=key_dim, DV=value_dim, BV=block_v, num_warps=tile["warps"], enable_fp_fusion=False,
        **pdl_options(recurrent))
