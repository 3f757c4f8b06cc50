"""Which tile runs a Gated DeltaNet decode or verify fastest (kernels/gdn.py `gdn_steps`), at one row and at a batch?
(issue 25: on the H100 the batched Qwen3.5-4B AR step grew by 0.33 ms a row, 3.4x its floor at 32 rows.)

A tile is the value dims of one value head's state that a program holds, and its warps: narrow tiles put more
programs on the state, wide ones fewer and larger, and more warps take fewer registers a thread. For the Qwen3.5-4B
layer shape (32 value heads of 128, 16 key heads, conv kernel 4), at 1, 8 and 32 rows and 1 token (a decode) or 8 or
16 (a verify block), each tile is timed as CUDA-graph replays of one `gdn_steps` per Gated DeltaNet layer over all 24
layers' states (so the states stream from HBM, as in a step), with rollback by replay, beside its floor: every row's
state read and written once, what commit keeps per token (the tape), and the projections in and the outputs out.
Each tile's outputs are checked against the first's.

`--ablate NAME ...` also times copies of kernels/gdn.py with one edit each (ABLATIONS), beside the kernel as it is,
to tell what a token of `_gdn_steps` spends its time on; their outputs are wrong by design and not checked.

    python -m benchmarks.gdn_tiles --out DIR          # on a CUDA machine
    python -m benchmarks.gdn_tiles --rows 32 --tokens 1 8 --tiles 64x2 --out DIR   # one tile's cells (an A/B)
    TRITON_INTERPRET=1 python -m benchmarks.gdn_tiles --tiny --device cpu   # logic check on small shapes
    python -m benchmarks.gdn_tiles --rows 1 32 --tokens 1 8 --tiles 64x2 16x1 --ablate fma one_sum --out DIR
    python -m benchmarks.gdn_tiles --report FILE.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Callable

import torch

from benchmarks.harness import (copy_bandwidth, graph_ms, parser_with_common_flags, qwen35_4b_config, run_and_report,
                                run_header)
from blockspec.kernels import use_settings
from blockspec.target import TargetModel

# (value dims, warps), the H100 table's first. One-warp tiles keep every reduction inside a warp (95 and 159 registers
# for 8x1 and 16x1, offline for sm_90); gdn_tiles-20261205-184558.json timed 16x1 the best at one row
TILES = [(16, 1), (8, 1), (16, 2), (32, 2), (32, 4), (64, 2), (64, 4), (128, 8)]
ROWS = (1, 8, 32)
TOKENS = (1, 8, 16)


# one edit of kernels/gdn.py each (old text, new text), in `_gdn_steps` and its launch
ABLATIONS = {
    # fused multiply-adds: fewer fp32 instructions, if instruction issue bounds a token
    "fma": [("\n        enable_fp_fusion=False, **pdl_options(projected))\n    return out\n",
             "\n        enable_fp_fusion=True, **pdl_options(projected))\n    return out\n")],
    # one sum over the keys a token instead of two (the innovation reuses S^T q)
    "one_sum": [("innovation = (v - tl.sum(S * k[:, None], axis=0)) * beta", "innovation = (v - seen) * beta")],
    # no stores inside the token loop: the outputs and innovations summed, stored once after it
    "no_token_stores": [
        ("    beta, decay = tl.load(beta_at), tl.load(decay_at)\n",
         "    beta, decay = tl.load(beta_at), tl.load(decay_at)\n    acc = tl.zeros([BV], tl.float32)\n"),
        ("        tl.store(O + b * s_ob + t * s_on + h * s_oh + dv, o.to(O.dtype.element_ty))\n", "        acc += o\n"),
        ("            tl.store(TAPE_U + b * s_ub + t * s_ut + h * s_uh + dv, innovation)\n",
         "            acc += innovation\n"),
        ("    if deferred == 0:\n        tl.store(state, S)\n",
         "    tl.store(O + b * s_ob + h * s_oh + dv, acc.to(O.dtype.element_ty))\n"
         "    if deferred == 0:\n        tl.store(state, S)\n")],
    # no inputs launch in a decode or verify (the recurrence reads its buffers as they are): what fusing the conv,
    # norms and gates into `_gdn_steps` could save at most, a launch and its round trip through memory
    "no_inputs": [("\n    _gdn_inputs[(b * triton.cdiv(n, INPUT_TOKENS.value),",
                   "\n    if prefill:\n      _gdn_inputs[(b * triton.cdiv(n, INPUT_TOKENS.value),")],
    # no gated norm or tape copy by a head's last program
    "no_tail": [('if tl.atomic_add(arrivals, 1, sem="acq_rel") == DV // BV - 1:',
                 'if tl.atomic_add(arrivals, 1, sem="acq_rel") == -1:')],
}


def ablated(name: str) -> Callable:
    """`gdn_steps` of a copy of kernels/gdn.py with ABLATIONS[name] applied (a file of its own: Triton reads a
    kernel's source from its file)."""
    from blockspec.kernels import gdn

    source = Path(gdn.__file__).read_text()
    for old, new in ABLATIONS[name]:
        assert source.count(old) == 1, f"ablation {name}: kernels/gdn.py no longer has {old!r}"
        source = source.replace(old, new)
    path = Path(tempfile.mkdtemp()) / f"gdn_{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"gdn_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.gdn_steps


def floor_bytes(model: TargetModel, rows: int, tokens: int) -> int:
    """What one Gated DeltaNet layer's decode or verify must move for `rows` rows of `tokens` tokens."""
    g, item = model.config.gdn, model.embed_tokens.weight.element_size()
    state = g.num_value_heads * g.key_head_dim * g.value_head_dim * 4
    tape = g.num_value_heads * (g.key_head_dim + g.value_head_dim + 1) * 4
    projected = g.conv_dim + g.num_value_heads * (g.value_head_dim + 2)
    per_row = 2 * state + tokens * (tape + projected * item + 2 * g.num_value_heads * g.value_head_dim * item)
    return rows * per_row


def run(args: argparse.Namespace) -> dict:
    from blockspec.kernels.gdn import gdn_steps

    device, tiny = args.device, args.tiny
    bandwidth = copy_bandwidth(device, 0.05 if tiny else 2.0)
    dtype = torch.float32 if tiny else torch.bfloat16
    model = TargetModel.random(qwen35_4b_config(tiny), device=device, dtype=dtype, seed=0, rope_theta=1e7)
    model.prepare_fast_path()  # the conv weights as the engine holds them
    chosen = [tuple(map(int, name.split("x"))) for name in args.tiles] if args.tiles else TILES
    tiles = [(v, w) for v, w in chosen if v <= model.config.gdn.value_head_dim]
    kernels = {"": gdn_steps, **{name: ablated(name) for name in args.ablate}}
    columns = [(f"{v}x{w}" + (f" {name}" if name else ""), (v, w), name) for v, w in tiles for name in kernels]
    layers = [model.layers[i].linear_attn for i in model.config.gdn_layers]
    mixer = layers[0]
    args_of = (mixer.conv1d.weight, mixer.A_log, mixer.dt_bias, mixer.norm.weight, mixer.norm.eps)
    width = mixer.in_proj.weight.shape[0]
    record: dict = {**run_header(args), "copy_bandwidth_GBps": bandwidth / 1e9, "tiles": tiles,
                    "columns": [c[0] for c in columns], "cells": []}
    gen = torch.Generator(device=device).manual_seed(0)
    for rows in (1, 2) if tiny else args.rows:
        cache = model.new_cache(rows, 32, verify_tokens=max(args.tokens), rollback="replay")
        states = [cache.gdn_layer(i) for i in range(len(layers))]
        for tokens in args.tokens:
            projected = torch.randn(rows, tokens, width, device=device, dtype=dtype, generator=gen)
            positions = (5 + torch.arange(tokens, device=device))[None].expand(rows, -1).contiguous()
            floor_us = floor_bytes(model, rows, tokens) / bandwidth * 1e6
            cell: dict = {"rows": rows, "tokens": tokens, "floor_us": floor_us, "tiles": {}}
            reference, start = None, [t.clone() for t in (states[0].conv, states[0].recurrent)]
            for column, (value_dims, warps), name in columns:
                steps = kernels[name]
                with torch.inference_mode(), use_settings(gdn_tile={"value_dims": value_dims, "warps": warps}):
                    states[0].conv.copy_(start[0])  # each tile's checked call from the same states
                    states[0].recurrent.copy_(start[1])
                    cache.arrivals.zero_()  # no_tail's replays never reset a head's counter
                    out = steps(projected, positions, *args_of, states[0])
                    us = graph_ms(lambda: [steps(projected, positions, *args_of, s) for s in states], device,
                                  replays=5, rounds=1 if tiny else 5) * 1e3 / len(states)
                reference = out if reference is None else reference
                error = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
                cell["tiles"][column] = {"us": us, "x_floor": us / floor_us, "rel_err": None if name else error}
            record["cells"].append(cell)
            print(json.dumps(cell), flush=True)
        cache = states = None  # this row count's states go before the next one's are made
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return record


def report(path: str) -> str:
    r = json.loads(Path(path).read_text())
    names = r.get("columns") or [f"{v}x{w}" for v, w in r["tiles"]]
    lines = [f"Device {r['device']}, torch {r['torch']}, commit {r['commit']}, {r['date']}; copy bandwidth "
             f"{r['copy_bandwidth_GBps']:.0f} GB/s. One Gated DeltaNet layer of the Qwen3.5-4B shape (rollback by "
             f"replay), us per layer (x floor), per tile (value dims x warps):", "",
             "| rows | tokens | floor us | " + " | ".join(names) + " | best |",
             "| --- | --- | --- | " + " | ".join("---" for _ in names) + " | --- |"]
    for cell in r["cells"]:
        tiles = cell["tiles"]
        best = min(tiles, key=lambda name: tiles[name]["us"])
        lines.append(f"| {cell['rows']} | {cell['tokens']} | {cell['floor_us']:.1f} | " + " | ".join(
            f"{tiles[n]['us']:.1f} ({tiles[n]['x_floor']:.2f})" for n in names) + f" | {best} |")
    worst = max(t["rel_err"] for cell in r["cells"] for t in cell["tiles"].values() if t["rel_err"] is not None)
    lines += ["", f"Outputs against the first tile's: relative error at most {worst:.1e}."]
    return "\n".join(lines)


def main() -> None:
    parser = parser_with_common_flags(__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--tiles", nargs="+", choices=[f"{v}x{w}" for v, w in TILES], default=None,
                        help="value dims x warps (default: every tile of TILES)")
    parser.add_argument("--ablate", nargs="+", choices=list(ABLATIONS), default=[],
                        help="also time these edits of the kernel (ABLATIONS), per tile")
    run_and_report(parser, run, report, "gdn_tiles")


if __name__ == "__main__":
    main()
