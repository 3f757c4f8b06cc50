"""Skinny GEMMs of the decode step (M = 1 or 16 rows; 32 to 256 in a batch) at Qwen3-4B and Qwen3.5-4B shapes:
which formulation reaches the memory-bandwidth floor? Each variant is timed as CUDA-graph replays (no Python launch
cost), median of many, with the weights rotated so the L2 cache does not serve them.

    python -m benchmarks.gemm_shapes      # on a CUDA machine; prints a table, writes JSON to --out
    python -m benchmarks.gemm_shapes --m 256 16384 [--shapes ...]
        # cuBLAS's formulations (VARIANTS) at a verify's or a join's rows, against max(bytes / bandwidth,
        # FLOPs / the 8192^3 matmul rate)
    python -m benchmarks.gemm_shapes --skinny [--shapes qkv lm_head ...] [--rows 1 16 32 64 128 256]
        # cuBLAS vs blockspec's Triton skinny_linear under each candidate launch config, per projection
        # (targets and drafts, plus the lm_heads) and row bucket; prints the winners as the "skinny" entries to
        # paste into the device's launch table (blockspec/kernels/tables/*.json); a benchmark's --skinny-table
        # runs under them in the same call

--skinny times each projection as the engine runs it (layers.py, under a table holding just the config): a target's
fused gate_up with silu(gate) * up after it (in the GEMM's epilogue where the config allows), its o_proj and down
with the residual add and the next RMSNorm (which sums a split-K GEMM's partials itself), an lm_head with a greedy
step's argmax (kept per column block where the config allows, the logits never written); the rest alone. An o_proj
or down also gets cuBLAS in 2 or 4 K ranges as candidates, their fp32 partials summed by that norm.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import capture_graph, matmul_rate
from benchmarks.harness import copy_bandwidth as host_copy_bandwidth

from blockspec.kernels.settings import SkinnyTable, merged_skinny_tables, skinny_table_from_winners

SHAPES = {"qkv": (6144, 2560), "o_proj": (2560, 4096), "gate_up": (19456, 2560), "down": (2560, 9728)}  # (N, K)
# the drafts' own shapes (separate gate/up, the context's k/v, DFlash's fc over 5 taps) and the lm_head
SKINNY_SHAPES = {**SHAPES, "draft_gate": (9728, 2560), "ctx_kv": (2048, 2560), "fc": (2560, 12800),
                 "lm_head": (151936, 2560),
                 # Qwen3.5-4B and its draft (their o_proj, out_proj, qkv and ctx_kv shapes are listed above)
                 "q35_qkv": (10240, 2560), "q35_in_proj": (12352, 2560), "q35_gate_up": (18432, 2560),
                 "q35_down": (2560, 9216), "q35_draft_gate": (9216, 2560), "q35_fc": (2560, 20480),
                 "q35_lm_head": (248320, 2560)}
QWEN35_SHAPES = [name for name in SKINNY_SHAPES if name.startswith("q35_")]
VARIANTS = {
    "linear": lambda x, w: F.linear(x, w),
    "transposed": lambda x, w: torch.mm(w, x.t()).t(),
    # with a (zero) bias torch takes cuBLASLt's matmul with a bias epilogue: its own heuristics and algorithms
    "lt_bias": lambda x, w: F.linear(x, w, _zero_bias(w)),
}
# skinny_linear candidates: (block_n, block_k, num_warps, num_stages) per path, each with every split_k
# that leaves at least two K tiles per range. Shared memory per stage is (block_n + 16) * block_k * 2 bytes.
# Narrow tiles fill the GPU without split-K (whose reduce is a second launch) but re-read x from L2 per tile.
DOT_TILES = [(16, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 4), (32, 256, 4, 4), (32, 512, 4, 3),
             (64, 128, 4, 4), (64, 256, 4, 3), (64, 256, 4, 4), (128, 128, 4, 4), (128, 128, 8, 4), (128, 256, 8, 3)]
SUM_TILES = [(16, 512, 4, 3), (32, 256, 4, 3), (32, 512, 8, 3), (64, 128, 4, 3), (64, 256, 8, 3)]  # M = 1 only
# --quick: the tiles that won a bucket on the H100 (tables/h100.json) and their neighbours, dot tiles only (they won
# M = 1 too), for a sweep that fits a device call beside the benchmark that runs under it
QUICK_TILES = [(32, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (64, 256, 4, 4), (128, 128, 8, 4)]
# From 128 rows a dot tile of all the rows (the weight streamed once; wgmma's N is up to 256): (block_n, block_k,
# num_warps, num_stages) that compile for sm_90 without spills and fit its shared memory (checked offline)
WIDE_TILES = {128: [(64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 2), (64, 128, 4, 3), (128, 64, 8, 3),
                    (128, 64, 8, 4), (128, 128, 8, 2), (256, 64, 8, 3)],
              256: [(64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 4, 2), (128, 64, 8, 3), (128, 64, 8, 4),
                    (128, 128, 8, 2)]}
# what follows a projection in the engine, timed with it: silu * up (the target's fused gate_up), the residual add
# and the next norm (the target's o_proj / out_proj and down), a greedy step's argmax (the lm_heads); the others are
# timed alone
ROLES = {"gate_up": "silu_mul", "q35_gate_up": "silu_mul", "o_proj": "residual_norm", "down": "residual_norm",
         "q35_down": "residual_norm", "lm_head": "argmax", "q35_lm_head": "argmax"}
SPLITS = (1, 2, 4, 8)
CALLS = 20  # back-to-back calls per graph, as a decode step's graph runs them
ROTATE_BYTES = 200e6  # weight copies cycled per graph: 4x the H100's 50 MB L2, so HBM serves every call


def graph_time(fn, reps: int = 50) -> tuple[float, object]:
    """Median seconds per replay of `fn` captured in a CUDA graph, and what the captured call returned."""
    graph, out = capture_graph(fn, warmups=3)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), out


def copy_bandwidth() -> float:
    """Bytes/s (read + written) of a 1 GiB device copy timed like the GEMMs, in a graph, after a warm-up that
    brings the clocks up (engine_limit.py times a 2 GiB copy from the host: both are measured)."""
    n = 1 << 29
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    graph_time(lambda: dst.copy_(src), reps=20)
    return 2 * n * 2 / graph_time(lambda: dst.copy_(src))[0]


def candidates(m: int, k: int, quick: bool = False) -> list[dict]:
    """Launch configs for a product of m rows (a row bucket: 1, 16, 32, 64, 128 or 256) and K: dot tiles of
    max(16, m) rows up to 64 (more rows run as more tiles, neighbours in launch order that find the weight tile in
    L2), from 128 rows also wide tiles (WIDE_TILES) of 128 rows and of all m rows (at 256 rows both: one tile
    holds a 32 x 8 verify, two halve the accumulator), the one-row sums too at m = 1 unless `quick`, each with every
    split that leaves two K tiles a range (up to 4 when `quick`)."""
    dot = min(max(16, m), 64)
    tiles = [(dot, *t) for t in (QUICK_TILES if quick else DOT_TILES)]
    tiles += [(rows, *t) for rows in sorted({128, m}) if rows <= m for t in WIDE_TILES.get(rows, [])]
    tiles += [(1, *t) for t in SUM_TILES] if m == 1 and not quick else []
    splits = SPLITS[:3] if quick else SPLITS
    return [{"rows": rows, "block_n": bn, "block_k": bk, "split_k": split, "num_warps": warps, "num_stages": stages}
            for rows, bn, bk, warps, stages in tiles for split in splits if split == 1 or k >= 2 * split * bk]


def cublas_splits(k: int, role: str | None) -> list[dict]:
    """cuBLAS over 2 or 4 K ranges whose partials the next norm sums ({"cublas_split_k": s}): candidates of a
    projection the residual norm follows, where the ranges split K evenly on 16-byte boundaries."""
    return [{"cublas_split_k": s} for s in (2, 4) if role == "residual_norm" and k % (8 * s) == 0]


def label(config: dict) -> str:
    if "cublas_split_k" in config:
        return f"cuBLAS in {config['cublas_split_k']} K ranges"
    return "r{rows} n{block_n} k{block_k} s{split_k} w{num_warps} st{num_stages}".format(**config)


def project(x: torch.Tensor, w: torch.Tensor, config: dict | None) -> torch.Tensor:
    """cuBLAS (config None), its K ranges' partials summed, or skinny_linear under `config`."""
    from blockspec.kernels.skinny import cublas_partials, skinny_linear

    if config is None:
        return F.linear(x, w)
    if "cublas_split_k" in config:
        return cublas_partials(x, w, config["cublas_split_k"]).sum(0).to(x.dtype)
    return skinny_linear(x, w, None, config)


def engine_op(x: torch.Tensor, w: torch.Tensor, config: dict | None, role: str | None, residual: torch.Tensor,
              norm: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The projection by weight `w` as the engine runs it (ROLES; "residual_norm" adds it to `residual` and applies
    `norm`) on a table holding only `config` for x's rows (None: cuBLAS): a function of the weight, returning the
    output the engine goes on with."""
    from blockspec.kernels import use_settings
    from blockspec.layers import linear, linear_add_rms_norm, linear_argmax, linear_silu_mul

    table = {tuple(w.shape): {x.shape[0]: config}}

    def run(weight: torch.Tensor) -> torch.Tensor:
        with use_settings(skinny_table=table):
            if role == "silu_mul":
                return linear_silu_mul(x, weight)
            if role == "residual_norm":
                return linear_add_rms_norm(x, weight, None, residual, norm)[1]
            if role == "argmax":
                return linear_argmax(x, weight)
            return linear(x, weight)

    return run


def time_config(x: torch.Tensor, weights: list[torch.Tensor], ref: torch.Tensor, config: dict | None,
                bandwidth: float, role: str | None = None) -> dict:
    """us/call over CALLS back-to-back calls of the engine's op (`engine_op`) in one graph and % of `bandwidth`
    (weight bytes / time), with checks: the GEMM's error against `ref` (fp32 x @ weights[0]^T), two eager calls of
    the op equal, the graph's result equals eager."""
    from blockspec.layers import RMSNorm

    w = weights[0]
    err = ((project(x, w, config).float() - ref).norm() / ref.norm()).item()
    residual = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    # a weight needing gradients would send the norm down the torch path (layers.fused_kernels_apply), ~8 kernels
    norm = RMSNorm(w.shape[0], 1e-6).to(x.device, x.dtype).requires_grad_(False)
    op = engine_op(x, w, config, role, residual, norm)
    eager = op(w)
    seconds, outs = graph_time(lambda: [op(weights[i % len(weights)]) for i in range(CALLS)], reps=10)
    row = {"us": seconds / CALLS * 1e6, "pct_bw": 100 * w.numel() * 2 * CALLS / seconds / bandwidth,
           "rel_err": err, "deterministic": torch.equal(eager, op(w)),
           "graph_equals_eager": torch.equal(outs[0], eager)}
    row["ok"] = err < 1e-2 and row["deterministic"] and row["graph_equals_eager"]
    return row


def skinny_sweep(bandwidth: float, shapes: list[str], buckets: list[int], quick: bool, cublas_only: bool,
                 done: Callable[[list[dict], dict], None]) -> None:
    """cuBLAS, the device table's config and every candidate (`cublas_only`: cuBLAS's K ranges alone, `cublas_splits`),
    per shape and M (each row bucket); prints one line per (shape, M) and, after each shape, hands `done` all rows so
    far and the winners {(N, K): {"name", M: config, ...}} (None: cuBLAS): a sweep cut short by its timeout keeps the
    shapes it finished."""
    from blockspec.kernels.skinny import skinny_config

    rows, winners = [], {}
    for name in shapes:
        n, k = SKINNY_SHAPES[name]
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                   for _ in range(max(1, math.ceil(ROTATE_BYTES / (n * k * 2))))]
        for m in buckets:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x.float(), weights[0].float())
            table = skinny_config(n, k, m, x.device)
            runs = [("cublas", None)] + ([("table", table)] if table is not None else [])
            results = []
            tiles = [] if cublas_only else candidates(m, k, quick)
            for kind, config in runs + [("candidate", c) for c in tiles + cublas_splits(k, ROLES.get(name))]:
                row = {"gemm": name, "n": n, "k": k, "m": m, "kind": kind, "config": config}
                try:
                    row.update(time_config(x, weights, ref, config, bandwidth, ROLES.get(name)))
                except Exception as exc:  # noqa: BLE001 (a config that does not fit, e.g. shared memory)
                    row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:160]}")
                results.append(row)
            rows += results
            by_kind = {r["kind"]: r for r in results if r["ok"] and r["kind"] != "candidate"}
            ok = [r for r in results if r["ok"] and r["kind"] != "cublas"]
            best = min(ok, key=lambda r: r["us"]) if ok else None
            cublas = by_kind["cublas"]
            winners.setdefault((n, k), {"name": name})[m] = (
                best["config"] if best is not None and best["us"] < cublas["us"] else None)
            cells = [f"{name:10s} M={m:2d}", f"cuBLAS {cublas['us']:7.1f} us {cublas['pct_bw']:3.0f}%"]
            if "table" in by_kind:
                cells.append(f"table {by_kind['table']['us']:7.1f} us")
            if best is not None:
                cells.append(f"best {best['us']:7.1f} us {best['pct_bw']:3.0f}% x{cublas['us'] / best['us']:.2f} "
                             f"{label(best['config'])}")
            failed = sum(not r["ok"] for r in results)
            print(" | ".join(cells) + (f" | {failed} failed" if failed else ""), flush=True)
        del weights
        torch.cuda.empty_cache()
        done(rows, winners)


def load_winners(paths: list[str], device: torch.device) -> SkinnyTable:
    """The skinny table of `device` with the winners of --skinny (or gemv_chain.py --sweep-table) results JSONs in
    place of its entries, bucket by bucket, in order, for a benchmark in the same device call to run under
    (KernelSettings.skinny_table) before they are pasted into the device's table file."""
    from blockspec.kernels import device_tables

    table = device_tables(device).skinny
    for path in paths:
        table = merged_skinny_tables(table, skinny_table_from_winners(json.loads(Path(path).read_text())["winners"]))
    return table


def paste_table(winners: list[dict]) -> str:
    """The winners as a launch table's "skinny" entries (blockspec/kernels/tables/*.json), one a line."""
    return '"skinny": [\n' + ",\n".join(f"    {json.dumps(w)}" for w in winners) + "\n]"


@functools.cache
def _zeros(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(n, device=device, dtype=dtype)


def _zero_bias(w: torch.Tensor) -> torch.Tensor:
    return _zeros(w.shape[0], w.device, w.dtype)


def variants_probe(bandwidth: float, flop_rate: float, shapes: list[str], ms: list[int]) -> list[dict]:
    """cuBLAS formulations (VARIANTS) of `shapes` at each row count of `ms`, against the floor: max(bytes moved /
    `bandwidth`, FLOPs / `flop_rate`)."""
    rows = []
    for name in shapes:
        n_out, k = SKINNY_SHAPES[name]
        copies = 8  # rotate weights so each call reads from HBM, not L2
        weights = [torch.randn(n_out, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in ms:
            floor = max((n_out * k + m * (k + n_out)) * 2 / bandwidth, 2 * m * n_out * k / flop_rate)
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, weights[0])
            for variant, fn in VARIANTS.items():
                assert torch.allclose(fn(x, weights[0]).float(), ref.float(), atol=2e-2, rtol=2e-2)
                t = graph_time(functools.partial(apply_all, fn, x, weights), reps=20)[0] / copies
                rows.append({"gemm": name, "m": m, "variant": variant, "us": t * 1e6, "floor_us": floor * 1e6,
                             "x_floor": t / floor, "TFLOPs": 2 * m * n_out * k / t / 1e12})
                print(f"{name:8s} M={m:5d} {variant:10s} {t * 1e6:8.1f} us  floor {floor * 1e6:7.1f}  "
                      f"x{t / floor:.2f}  {rows[-1]['TFLOPs']:5.0f} TFLOP/s", flush=True)
            del x, ref
        del weights
        torch.cuda.empty_cache()
    return rows


def mlp_probe(ms: list[int]) -> list[dict]:
    """The target's MLP on cuBLAS at each row count of `ms`: gate_up as F.linear, silu(gate) * up, down (the engine's
    chain) against gate_up as its transpose (weight @ x^T: another kernel choice, the activations then column-major),
    silu * up on those, down reading them transposed."""
    from blockspec.kernels.norm_rope import silu_mul

    (n_gate_up, k), (n_down, k_down) = SHAPES["gate_up"], SHAPES["down"]
    copies = 4
    gate_ups = [torch.randn(n_gate_up, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    downs = [torch.randn(n_down, k_down, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]

    def rows_major(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, gate_up)
        return F.linear(silu_mul(y[:, 0::2], y[:, 1::2]), down)

    def columns_major(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        y = torch.mm(gate_up, x.t())
        return F.linear(silu_mul(y[0::2], y[1::2]).t(), down)

    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = rows_major(x, gate_ups[0], downs[0]).float()
        for name, fn in (("rows_major", rows_major), ("columns_major", columns_major)):
            err = ((fn(x, gate_ups[0], downs[0]).float() - ref).norm() / ref.norm()).item()
            t = graph_time(lambda: [fn(x, g, d) for g, d in zip(gate_ups, downs)], reps=20)[0] / copies
            rows.append({"m": m, "chain": name, "us": t * 1e6, "rel_err": err})
            print(f"mlp M={m:5d} {name:14s} {t * 1e6:8.1f} us  rel err {err:.1e}", flush=True)
    return rows


def apply_all(fn, x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [fn(x, w) for w in weights]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--skinny", action="store_true", help="time skinny_linear configs against cuBLAS")
    parser.add_argument("--shapes", nargs="+", choices=[*SKINNY_SHAPES, "qwen35"], default=None,
                        help="with --skinny: these projections only (qwen35: Qwen3.5-4B's and its draft's; "
                             "default: all)")
    parser.add_argument("--rows", type=int, nargs="+", choices=[1, 16, 32, 64, 128, 256], default=[1, 16],
                        help="with --skinny: the row buckets to sweep")
    parser.add_argument("--quick", action="store_true", help="with --skinny: QUICK_TILES' candidates only")
    parser.add_argument("--cublas-splits-only", action="store_true",
                        help="with --skinny: no Triton tiles, only cuBLAS in K ranges that the next norm sums")
    parser.add_argument("--mlp", action="store_true",
                        help="without --skinny: also the MLP chain on cuBLAS, row- against column-major activations")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16],
                        help="without --skinny: the row counts of cuBLAS's formulations (default: the target's "
                             "projections; --shapes picks others)")
    args = parser.parse_args()
    started = time.perf_counter()
    in_graph, host = copy_bandwidth(), host_copy_bandwidth("cuda", 2.0)
    bandwidth = max(in_graph, host)  # the denominator of every %: never flatter the GEMMs
    print(f"copy bandwidth {in_graph / 1e9:.0f} GB/s in a graph, {host / 1e9:.0f} GB/s host-timed as in "
          f"engine_limit.py (read + write)", flush=True)
    record: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "copy_bandwidth_GBps": bandwidth / 1e9, "copy_bandwidth_graph_GBps": in_graph / 1e9,
                    "copy_bandwidth_host_GBps": host / 1e9, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gemm_shapes{'-skinny' if args.skinny else ''}-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def write() -> None:
        record["seconds"] = time.perf_counter() - started
        path.write_text(json.dumps(record, indent=1))

    shapes = [s for name in args.shapes or (SKINNY_SHAPES if args.skinny else SHAPES)
              for s in (QWEN35_SHAPES if name == "qwen35" else [name])]
    if args.skinny:
        import triton

        def done(rows: list[dict], winners: dict) -> None:
            record["rows"] = rows
            record["winners"] = [{"gemm": e["name"], "n": n, "k": k, **{f"m{m}": e[m] for m in args.rows}}
                                 for (n, k), e in winners.items()]
            write()

        record["triton"] = triton.__version__
        skinny_sweep(bandwidth, list(dict.fromkeys(shapes)), args.rows, args.quick, args.cublas_splits_only,
                     done)
        print(paste_table(record["winners"]))
    else:
        record["matmul_TFLOPs"] = matmul_rate("cuda") / 1e12
        record["rows"] = variants_probe(bandwidth, record["matmul_TFLOPs"] * 1e12, list(dict.fromkeys(shapes)), args.m)
        if args.mlp:
            record["mlp"] = mlp_probe(args.m)
        write()
    print(f"wrote {path} ({record['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
