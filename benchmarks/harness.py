"""What the benchmark scripts share: the common flags, the commit, an optional freshly swept skinny-GEMM
table, a hand-captured CUDA graph, the results JSON and its markdown report."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from blockspec.bench.report import git_commit
from blockspec.kernels import use_settings


def capture_graph(fn: Callable[[], object], warmups: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """`fn` captured in one CUDA graph after warm-up runs on a side stream (as the engine captures its step);
    returns the graph and what the captured call returned (its static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def write_record(record: dict, out_dir: str | Path, name: str, report: Callable[[str], str]) -> Path:
    """Write OUT/NAME-<time>.json and print its markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=1))
    print(report(str(path)))
    print(f"wrote {path}")
    return path


def run_header(args: argparse.Namespace) -> dict:
    """What every results JSON starts with: the device, torch, the commit and the time of the run."""
    cuda = args.device.startswith("cuda")
    return {"device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "commit": args.commit, "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def parser_with_common_flags(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes, for a logic check on the CPU")
    parser.add_argument("--smollm2", default=None, help="SmolLM2-135M-Instruct .gguf: also time it with real weights")
    parser.add_argument("--skinny-table", default=None,
                        help="a gemm_shapes.py --skinny results JSON: run with its winners in the skinny table")
    parser.add_argument("--commit", default=None, help="default: the checkout's ($BLOCKSPEC_GIT_COMMIT without .git)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--report", default=None, help="render a results JSON as markdown and exit")
    return parser


def run_and_report(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], dict],
                   report: Callable[[str], str], name: str) -> None:
    """Parse, run, write the record and print its markdown (or only render --report FILE)."""
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    if args.commit is None:
        args.commit = (git_commit() or "unknown")[:7]
    skinny = None
    if args.skinny_table:
        from gemm_shapes import load_winners

        skinny = load_winners(args.skinny_table, torch.device(args.device))
    with use_settings(skinny_table=skinny):  # None: the device's table
        record = run(args)
    record["skinny_table"] = ({f"{n},{k}": v for (n, k), v in skinny.items()} if skinny is not None
                              else "the device's (blockspec/kernels/tables)")
    write_record(record, args.out, name, report)
