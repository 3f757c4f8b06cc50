"""Skinny GEMMs of the decode step (M = 1 or 16 rows) at Qwen3-4B shapes: which formulation reaches the
memory-bandwidth floor? Each variant is timed as CUDA-graph replays (no Python launch cost), median of
many, with the weights rotated so the L2 cache does not serve them.

    python benchmarks/gemm_shapes.py      # on a CUDA machine; prints a table, writes JSON to --out
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (2560, 6144), "o_proj": (4096, 2560), "gate_up": (2560, 19456), "down": (9728, 2560)}
VARIANTS = {
    "linear": lambda x, w: F.linear(x, w),
    "transposed": lambda x, w: torch.mm(w, x.t()).t(),
}


def graph_time(fn, reps: int = 50) -> float:
    """Median seconds per call of `fn` captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    n = 1 << 28
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    bandwidth = 2 * n * 2 / graph_time(lambda: dst.copy_(src))
    rows = []
    for name, (k, n_out) in SHAPES.items():
        copies = 8  # rotate weights so each call reads from HBM, not L2
        weights = [torch.randn(n_out, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        floor = n_out * k * 2 / bandwidth
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, weights[0])
            for variant, fn in VARIANTS.items():
                assert torch.allclose(fn(x, weights[0]).float(), ref.float(), atol=2e-2, rtol=2e-2)
                t = graph_time(lambda: [fn(x, w) for w in weights]) / copies
                rows.append({"gemm": name, "m": m, "variant": variant, "us": t * 1e6, "floor_us": floor * 1e6,
                             "x_floor": t / floor})
                print(f"{name:8s} M={m:2d} {variant:10s} {t * 1e6:7.1f} us  floor {floor * 1e6:6.1f}  "
                      f"x{t / floor:.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_bandwidth_GBps": bandwidth / 1e9, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    (out / f"gemm_shapes-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
