"""CUDA graphs over blockspec's own kernels vs torch.compile (issue 3 asks for whichever measures faster).

One run on one GPU, Qwen3-4B-shaped target with random bf16 weights, context 512. The timed step is a target
pass over n tokens (n = 1: an autoregressive step; n = 16: a verify block) with the logits' argmax, as the
engine runs it:
  graphs            blockspec's path: our Triton kernels (skinny GEMMs, decode attention, fused norms),
                    the whole step captured in one CUDA graph by hand (what the engine does)
  compile-plain     torch.compile(mode="reduce-overhead") of the same model code with our kernels switched
                    off, i.e. plain torch ops that Inductor fuses and CUDA-graphs itself (gpt-fast's recipe)
  compile-kernels   torch.compile(mode="reduce-overhead") with our kernels left on (Dynamo traces the
                    user-defined Triton kernels)
  eager             our kernels, no graph (the launch overhead graphs remove)
Each variant's ms/step is the median over --steps replays after warm-up; compile time is reported apart.

    python -m benchmarks.compile_vs_graphs --out DIR          # on a CUDA machine
    python -m benchmarks.compile_vs_graphs --tiny --device cpu  # logic check (no graphs, compile on CPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from benchmarks.harness import (capture_graph, parser_with_common_flags, qwen3_4b_config, run_and_report, run_header,
                                sync)
from blockspec.kernels import use_settings
from blockspec.target import TargetModel

CONTEXT = 512


def make_step(model: TargetModel, cache, n: int, device: str):
    ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
    positions = (CONTEXT + torch.arange(n, device=device))[None]

    def step() -> torch.Tensor:
        hidden, _ = model(ids, positions, cache, (), kv_len=CONTEXT + n)
        return model.logits(hidden).argmax(-1)

    return step


def timed(fn, steps: int, device: str) -> float:
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hand_graph(step, device: str):
    """The step captured in one CUDA graph by hand, as the engine does (no graph on the CPU)."""
    return capture_graph(step)[0].replay if device.startswith("cuda") else step


def run(args: argparse.Namespace) -> dict:
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    cfg = qwen3_4b_config(args.tiny)
    model = TargetModel.random(cfg, device=device, dtype=dtype, seed=0)
    cache = model.new_cache(1, CONTEXT + 64)
    # the step writes the cache in place: marked as static addresses (what gpt-fast gets by holding caches
    # as module buffers), cudagraph trees accept the writes instead of skipping their CUDA graphs
    torch._dynamo.mark_static_address(cache.k)
    torch._dynamo.mark_static_address(cache.v)
    with torch.inference_mode():  # a prompt in the cache, so attention reads CONTEXT real slots
        prompt = torch.randint(0, cfg.vocab_size, (1, CONTEXT), device=device)
        model(prompt, torch.arange(CONTEXT, device=device)[None], cache, (), kv_len=CONTEXT)
    mode = "reduce-overhead" if device.startswith("cuda") else "default"
    record = {**run_header(args), "context": CONTEXT, "compile_mode": mode, "steps": args.steps, "rows": []}
    for n in args.tokens:
        with torch.inference_mode():
            step = make_step(model, cache, n, device)
            variants = {"graphs": lambda: hand_graph(step, device), "eager": lambda: step,
                        "compile-plain": lambda: torch.compile(step, mode=mode),
                        "compile-kernels": lambda: torch.compile(step, mode=mode)}
            for name in args.variants:
                build = variants[name]
                row = {"tokens": n, "variant": name}
                try:
                    # the plain variant traces and runs with our kernels off
                    with use_settings(fused_kernels=False) if name == "compile-plain" else nullcontext():
                        started = time.perf_counter()
                        fn = build()
                        for _ in range(3):  # capture / compile and warm-up, untimed
                            fn()
                        sync(device)
                        row["setup_s"] = round(time.perf_counter() - started, 1)
                        row["ms"] = timed(fn, args.steps, device) * 1e3
                except Exception as exc:  # a variant that does not build is a result, not a crash
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                record["rows"].append(row)
                print(row, flush=True)
                torch._dynamo.reset()
    return record


def report(path: str) -> str:
    r = json.loads(Path(path).read_text())
    lines = [f"Device {r['device']}, torch {r['torch']}, commit {r['commit']}, {r['date']}; Qwen3-4B-shaped "
             f"target, context {r['context']}, median of {r['steps']} steps; compile mode {r['compile_mode']}.", "",
             "| tokens per pass | variant | ms/step | setup s (capture / compile) |", "| --- | --- | --- | --- |"]
    for row in r["rows"]:
        ms = f"{row['ms']:.2f}" if "ms" in row else f"failed: {row['error'][:80]}"
        lines.append(f"| {row['tokens']} | {row['variant']} | {ms} | {row.get('setup_s', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = parser_with_common_flags(__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16],
                        help="tokens per pass to time, e.g. 1,16")
    parser.add_argument("--variants", type=lambda s: s.split(","),
                        default=["graphs", "eager", "compile-plain", "compile-kernels"])
    run_and_report(parser, run, report, "compile_vs_graphs")


if __name__ == "__main__":
    main()
