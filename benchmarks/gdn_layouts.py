"""Would explicit register layouts speed up a Gated DeltaNet verify's token loop (issue 25)? A probe, not the engine's
kernel. Compiled offline for sm_90, kernels/gdn.py's `_gdn_steps` loop (Triton picks its layouts from the loads) takes
19 barriers and ~50 shared-memory accesses a token at the 64 x 2 tile, its two warps splitting the keys (design notes,
"Where a GDN token's time goes"). `_token_loop` here is that loop alone in Gluon with the layout written out: a
program's [Dk, value dims] state tile has the keys across LANES lanes of a warp (Dk / LANES each, q and k in the same
lanes) and the value dims across the other lanes (ROWS each) and the warps, so a sum over the keys stays in registers
and shuffles and the rank-one update needs no layout change.

Both sides run the Qwen3.5-4B layer shape on all 24 Gated DeltaNet layers' states (so the states stream from HBM), at
1 row (a decode's latency) and 32 rows (a batch's throughput) of 1 and 8 tokens: `_token_loop` (state load, the
tokens, state store; no gated norm, no conv state) and `gdn_steps` at the 64 x 2 and 16 x 1 tiles without its last
program's tail (gdn_tiles' no_tail ablation; it still copies the conv state and takes the arrival counter). Compare
the per-token slopes, (8 tokens - 1 token) / 7: the fixed parts differ, the cost of a token does not.
`_token_loop`'s outputs and states are checked against target/gdn.py's torch step.

    python -m benchmarks.gdn_layouts --out DIR        # on a CUDA machine
    python -m benchmarks.gdn_layouts --report FILE.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from benchmarks.gdn_tiles import ablated
from benchmarks.harness import graph_ms, parser_with_common_flags, qwen35_4b_config, run_and_report, run_header
from blockspec.kernels import use_settings
from blockspec.target import TargetModel
from blockspec.target.gdn import delta_rule_step

ROWS, TOKENS = (1, 32), (1, 8)
LAYOUTS = [(4, 1, 4), (4, 2, 4), (8, 2, 4), (8, 4, 2), (4, 4, 2), (2, 1, 4)]  # (lanes on the keys, value rows, warps)


@gluon.jit
def _token_loop(Q, K, V, BETA, DECAY, STATE, O, TAPE_U, n, s_qb, s_qn, s_qh, s_vb, s_vn, s_vh, s_bb, s_bn, s_sb, s_sh,
                DK: gl.constexpr, DV: gl.constexpr, LANES: gl.constexpr, ROWS: gl.constexpr, WARPS: gl.constexpr):
    TILE: gl.constexpr = gl.BlockedLayout([DK // LANES, ROWS], [LANES, 32 // LANES], [1, WARPS], [0, 1])
    KEYS: gl.constexpr = gl.SliceLayout(1, TILE)
    VALUES: gl.constexpr = gl.SliceLayout(0, TILE)
    BV: gl.constexpr = ROWS * (32 // LANES) * WARPS
    b = gl.program_id(0)
    h = gl.program_id(1)
    dk = gl.arange(0, DK, KEYS)
    dv = gl.program_id(2) * BV + gl.arange(0, BV, VALUES)
    state = STATE + b * s_sb + h * s_sh + gl.expand_dims(dk, 1) * DV + gl.expand_dims(dv, 0)
    S = gl.load(state)
    q_at = Q + b * s_qb + h * s_qh + dk  # q and k share a layout, v, o and the tape another
    k_at = K + b * s_qb + h * s_qh + dk
    v_at = V + b * s_vb + h * s_vh + dv
    beta_at = BETA + b * s_bb + h
    decay_at = DECAY + b * s_bb + h
    q, k, v = gl.load(q_at), gl.load(k_at), gl.load(v_at)
    beta, decay = gl.load(beta_at), gl.load(decay_at)
    for t in range(n):
        more = t + 1 < n
        q_next = gl.load(q_at + (t + 1) * s_qn, mask=more, other=0.0)
        k_next = gl.load(k_at + (t + 1) * s_qn, mask=more, other=0.0)
        v_next = gl.load(v_at + (t + 1) * s_vn, mask=more, other=0.0)
        beta_next = gl.load(beta_at + (t + 1) * s_bn, mask=more, other=0.0)
        decay_next = gl.load(decay_at + (t + 1) * s_bn, mask=more, other=0.0)
        S = S * decay
        seen = gl.sum(S * gl.expand_dims(q, 1), axis=0)
        innovation = (v - gl.sum(S * gl.expand_dims(k, 1), axis=0)) * beta
        S = S + gl.expand_dims(k, 1) * gl.expand_dims(innovation, 0)
        o = seen + innovation * gl.sum(k * q, axis=0)
        gl.store(O + b * s_vb + t * s_vn + h * s_vh + dv, o.to(O.dtype.element_ty))
        gl.store(TAPE_U + b * s_vb + t * s_vn + h * s_vh + dv, innovation)
        q, k, v, beta, decay = q_next, k_next, v_next, beta_next, decay_next
    gl.store(state, S)


def token_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, decay: torch.Tensor,
               state: torch.Tensor, o: torch.Tensor, tape_u: torch.Tensor, layout: tuple[int, int, int]) -> None:
    """q, k [b, n, h, Dk], v [b, n, h, Dv], beta and decay [b, n, h] (fp32); state [b, h, Dk, Dv] updated in place;
    o (in its dtype, strides as v's) and tape_u (fp32) [b, n, h, Dv] written."""
    b, n, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    lanes, rows, warps = layout
    block_v = rows * (32 // lanes) * warps
    _token_loop[(b, heads, value_dim // block_v)](
        q, k, v, beta, decay, state, o, tape_u, n, *q.stride()[:3], *v.stride()[:3], *beta.stride()[:2],
        *state.stride()[:2], DK=key_dim, DV=value_dim, LANES=lanes, ROWS=rows, WARPS=warps, num_warps=warps)


def inputs(rows: int, tokens: int, heads: int, key_dim: int, value_dim: int, device: str, seed: int) -> list:
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k = (torch.nn.functional.normalize(torch.randn(rows, tokens, heads, key_dim, device=device, generator=gen),
                                          dim=-1) for _ in range(2))
    v = torch.randn(rows, tokens, heads, value_dim, device=device, generator=gen)
    beta = torch.rand(rows, tokens, heads, device=device, generator=gen)
    g = -torch.rand(rows, tokens, heads, device=device, generator=gen)
    return [q * key_dim ** -0.5, k, v, beta, g]


def check(layout: tuple[int, int, int], device: str) -> float:
    """`_token_loop`'s outputs and final state against the torch step's, relative error (the sums run in another
    order)."""
    rows, tokens, heads, dim = 2, 8, 4, 128
    q, k, v, beta, g = inputs(rows, tokens, heads, dim, dim, device, 1)
    state = torch.randn(rows, heads, dim, dim, device=device) * 0.1
    want_state, want = state.clone(), []
    for t in range(tokens):
        want_state, out, _, _ = delta_rule_step(want_state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
        want.append(out)
    o, tape_u = torch.empty_like(v), torch.empty_like(v)
    token_loop(q, k, v, beta, g.exp(), state, o, tape_u, layout)
    want = torch.stack(want, dim=1)
    return max(((got - ref).norm() / ref.norm()).item() for got, ref in ((o, want), (state, want_state)))


def run(args: argparse.Namespace) -> dict:
    device = args.device
    model = TargetModel.random(qwen35_4b_config(False), device=device, dtype=torch.bfloat16, seed=0, rope_theta=1e7)
    g = model.config.gdn
    layers = [model.layers[i].linear_attn for i in model.config.gdn_layers]
    mixer = layers[0]
    args_of = (mixer.conv1d.weight, mixer.A_log, mixer.dt_bias, mixer.norm.weight, mixer.norm.eps)
    steps = ablated("no_tail")
    record: dict = {**run_header(args), "rows": ROWS, "layouts": LAYOUTS, "cells": []}
    gen = torch.Generator(device=device).manual_seed(0)
    for rows in ROWS:
        cache = model.new_cache(rows, 32, verify_tokens=max(TOKENS), rollback="replay")
        states = [cache.gdn_layer(i) for i in range(len(layers))]
        for tokens in TOKENS:
            cell: dict = {"rows": rows, "tokens": tokens, "us": {}}
            projected = torch.randn(rows, tokens, mixer.in_proj.weight.shape[0], device=device, dtype=torch.bfloat16,
                                    generator=gen)
            positions = (5 + torch.arange(tokens, device=device))[None].expand(rows, -1).contiguous()
            for value_dims, warps in ((64, 2), (16, 1)):  # the batch's tile and the one-row tile (tables/h100)
                with torch.inference_mode(), use_settings(gdn_tile={"value_dims": value_dims, "warps": warps}):
                    cell["us"][f"gdn_steps {value_dims}x{warps} no_tail"] = graph_ms(
                        lambda: [steps(projected, positions, *args_of, s) for s in states], device, 5,
                        5) * 1e3 / len(states)
            q, k, v, beta, log_decay = inputs(rows, tokens, g.num_value_heads, g.key_head_dim, g.value_head_dim, device,
                                              2)
            decay, o, tape_u = log_decay.exp(), torch.empty_like(v, dtype=torch.bfloat16), torch.empty_like(v)
            for layout in LAYOUTS:
                cell["us"][f"gluon {layout}"] = graph_ms(
                    lambda: [token_loop(q, k, v, beta, decay, s.recurrent, o, tape_u, layout) for s in states], device,
                    5, 5) * 1e3 / len(states)
            record["cells"].append(cell)
            print(json.dumps(cell), flush=True)
    record["rel_err"] = {str(layout): check(layout, device) for layout in LAYOUTS}
    return record


def report(path: str) -> str:
    r = json.loads(Path(path).read_text())
    lines = [f"Device {r['device']}, torch {r['torch']}, commit {r['commit']}, {r['date']}. One Gated DeltaNet layer "
             "of the Qwen3.5-4B shape, us (24 layers' states, graphed):", "",
             "| rows | kernel | 1 token | 8 tokens | per token after the first |", "| --- | --- | --- | --- | --- |"]
    cells = {(c.get("rows", r["rows"]), c["tokens"]): c["us"] for c in r["cells"]}
    for rows in sorted({rows for rows, _ in cells}):
        one, eight = cells[rows, 1], cells[rows, 8]
        for name, us in one.items():
            lines.append(f"| {rows} | {name} | {us:.1f} | {eight[name]:.1f} | {(eight[name] - us) / 7:.2f} |")
    errors = ", ".join(f"{name} {e:.1e}" for name, e in r["rel_err"].items())
    return "\n".join(lines + ["", f"Gluon against the torch step, relative error: {errors}."])


def main() -> None:
    run_and_report(parser_with_common_flags(__doc__), run, report, "gdn_layouts")


if __name__ == "__main__":
    main()
