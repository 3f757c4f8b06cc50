"""Where a batched cell loses time (issue 26), at c = 32 on the Qwen3-4B shape (random bf16 weights, the 5-layer
DFlash draft, oracle acceptance at the card's tau), three probes in one process:

- the loop: batch_throughput's loop ran a block-8 step in 8.03 ms of host time where the same step replayed alone
  took 7.61 (AR: 4.60 against 4.49). Each cell runs once under torch.profiler, each CUDA-graph replay split into
  its device span (first kernel's start to last kernel's end), busy time, and the idle gap before the next replay;
  beside it the same step replayed alone at the cell's first context (batch_throughput's `step_ms`);
- joins: the prefill of c prompts joining at once (a third of a speculative cell's time) with groups of 4096, 8192
  or 16384 padded tokens (`max_prefill_tokens`) and prompt attention on the Triton tiles or on SDPA's cuDNN kernel;
  then the cells again under the fastest join, beside the joins before 0fae76a (4096 tokens, Triton: "earlier joins");
- the draft's MLP at c x block rows: gate and up as two products (as GatedMLP ran them until 2026-12-07) or as
  one interleaved product with silu * up after it (GatedMLP's `stacked`), each as CUDA-graph replays.

    python -m benchmarks.loop_probe --out DIR
    python -m benchmarks.loop_probe --timeline --out DIR    # the cells alone, each one's device timeline whole
    python -m benchmarks.loop_probe --tiny --device cpu --concurrency 2     # logic check (no device timeline)
    python -m benchmarks.loop_probe --report FILE.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.batch_throughput import (CARD_TAU, card_schedules, live_rows, prefill_time,
                                        prompt_attention_settings, run_workload, warm_join)
from benchmarks.harness import (graph_ms, make_draft, parser_with_common_flags, qwen3_4b_config, restored,
                                run_and_report, run_header, step_ms, sync)
from benchmarks.oracle import OracleProposer, constant_choice
from blockspec.engine import BatchDecoder, DraftProposer, SamplingParams
from blockspec.layers import gated, linear
from blockspec.target import Target, TargetModel

PREFILL_TOKENS = (4096, 8192, 16384)
EARLIER = "earlier joins"  # 4096-token groups on the Triton tiles, the engine's joins before 0fae76a

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def replay_spans(trace: dict) -> list[dict]:
    """Per CUDA-graph launch in a chrome trace, in launch order: its device span, busy time and the idle gap after
    it before the next launch's first device event (us)."""
    launches = {e["args"]["correlation"]: e["ts"] for e in trace["traceEvents"]
                if e.get("cat") == "cuda_runtime" and e.get("name") == "cudaGraphLaunch"}
    by_launch: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for e in trace["traceEvents"]:
        if e.get("cat") in GPU_CATEGORIES and e.get("args", {}).get("correlation") in launches:
            by_launch[e["args"]["correlation"]].append((e["ts"], e["ts"] + e["dur"]))
    spans = []
    for corr in sorted(by_launch, key=lambda c: launches[c]):
        events = sorted(by_launch[corr])
        busy, reach = 0.0, events[0][0]
        for start, end in events:
            busy += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        spans.append({"start": events[0][0], "end": reach, "span_us": reach - events[0][0], "busy_us": busy,
                      "kernels": len(events)})
    for here, after in zip(spans, spans[1:]):
        here["gap_after_us"] = after["start"] - here["end"]
    return spans


def timeline(trace: dict, top: int = 8) -> dict:
    """A whole cell's device timeline from a chrome trace: its span, the time some device work ran, the time in
    kernels of graph replays and of eager launches (the joins' prefills; the costliest eager kernels by name), the
    idle time by the kinds of work on either side of each gap (graph or eager), and the longest gaps with the
    kernels around them (ms)."""
    graphs = {e["args"]["correlation"] for e in trace["traceEvents"]
              if e.get("cat") == "cuda_runtime" and e.get("name") == "cudaGraphLaunch"}
    events = sorted((e["ts"], e["ts"] + e["dur"], e.get("name", "")[:60],
                     e.get("args", {}).get("correlation") in graphs)
                    for e in trace["traceEvents"] if e.get("cat") in GPU_CATEGORIES)
    if not events:
        return {}
    kind = {True: "graph", False: "eager"}
    idle: dict[str, float] = defaultdict(float)
    gaps, busy, reach, before = [], 0.0, events[0][0], events[0]
    for event in events:
        start, end = event[0], event[1]
        if start > reach:
            label = f"{kind[before[3]]} -> {kind[event[3]]}"
            idle[label] += (start - reach) / 1e3
            gaps.append(((start - reach) / 1e3, before[2], event[2], label))
        busy += max(0.0, end - max(start, reach))
        if end >= reach:
            reach, before = end, event
    in_kind = {k: sum(e[1] - e[0] for e in events if e[3] == flag) / 1e3 for flag, k in kind.items()}
    eager: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for start, end, name, graphed in events:
        if not graphed:
            eager[name][0] += (end - start) / 1e3
            eager[name][1] += 1
    return {"span_ms": (reach - events[0][0]) / 1e3, "busy_ms": busy / 1e3, "graph_kernels_ms": in_kind["graph"],
            "eager_kernels_ms": in_kind["eager"], "idle_ms": dict(idle),
            "eager_by_kernel": sorted(([n, round(ms, 3), k] for n, (ms, k) in eager.items()), key=lambda r: -r[1])[:20],
            "longest_gaps": [{"ms": round(g, 3), "after": a, "before": b, "between": k}
                             for g, a, b, k in sorted(gaps, reverse=True)[:top]]}


def profiled_cell(engine: BatchDecoder, prompts: list[list[int]], params: SamplingParams, c: int, block: int,
                  device: str, profile: bool = True) -> dict:
    """The cell timed plainly (the slower of two runs), then (`profile`) one run under the profiler, split per graph
    replay."""
    from torch.profiler import ProfilerActivity, profile

    warm_join(engine, prompts[:c], block)
    run_workload(engine, prompts, params, c, block, device)  # warm
    runs = sorted((run_workload(engine, prompts, params, c, block, device) for _ in range(2)),
                  key=lambda r: r["tokens_per_s"])
    plain = runs[0]
    cell = {"tokens_per_s": plain["tokens_per_s"], "all_tokens_per_s": [r["tokens_per_s"] for r in runs],
            "loop": plain["loop"], "steps": plain["steps"]}
    if not profile or not device.startswith("cuda"):
        return cell
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_workload(engine, prompts, params, c, block, device)
        sync(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    cell["timeline"] = timeline(trace)
    spans = replay_spans(trace)
    if not spans:  # the profiler did not link graph kernels to their launch: say what it recorded instead
        names = defaultdict(int)
        for e in trace["traceEvents"]:
            names[(e.get("cat"), e.get("name", "")[:40])] += 1
        cell["trace_events"] = sorted(([*k, n] for k, n in names.items()), key=lambda r: -r[2])[:30]
        return cell
    full = [s for s in spans if s["kernels"] == statistics.mode(s["kernels"] for s in spans)]  # the c-row graph
    gaps = [s["gap_after_us"] for s in full if "gap_after_us" in s]
    cell["profiled"] = {
        "replays": len(spans), "full_replays": len(full), "kernels_a_replay": full[0]["kernels"] if full else 0,
        "span_ms_median": statistics.median(s["span_us"] for s in full) / 1e3,
        "busy_ms_median": statistics.median(s["busy_us"] for s in full) / 1e3,
        "gap_ms_median": statistics.median(gaps) / 1e3 if gaps else None,
        "gap_ms_p90": sorted(gaps)[int(0.9 * len(gaps))] / 1e3 if gaps else None,
        "spans_ms": [round(s["span_us"] / 1e3, 3) for s in full],
        "gaps_ms": [round(g / 1e3, 3) for g in gaps],
    }
    return cell


def alone_ms(engine: BatchDecoder, prompts: list[list[int]], c: int, block: int, device: str) -> float:
    """The same step of c live rows as a graph replayed alone (as batch_throughput's parts time it)."""
    with live_rows(engine, prompts[:c], device), restored(engine, c):
        return step_ms(engine, c, block, device, replays=5, rounds=3)


def join_variants(engine: BatchDecoder, prompts: list[list[int]], block: int, device: str) -> dict:
    """The prefill of `prompts` joining at once under each group size and prompt attention kernel."""
    out = {}
    for tokens in PREFILL_TOKENS:
        for kernel in ("triton", "cudnn"):
            engine.max_prefill_tokens = tokens
            with prompt_attention_settings(kernel, device):
                timed = prefill_time(engine, prompts, device, block)
            out[f"{tokens} {kernel}"] = {k: timed[k] for k in ("ms", "ms_per_prompt", "device_busy_ms")}
    return out


def draft_mlp_ms(draft: torch.nn.Module, rows: int, device: str) -> dict:
    """The draft's first MLP on `rows` rows: gate and up as two products, and as GatedMLP runs them."""
    mlp = draft.layers[0].mlp
    x = torch.randn(rows, mlp.gate_proj.in_features, device=device, dtype=mlp.gate_proj.weight.dtype)

    def separate() -> torch.Tensor:
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        return linear(gated(linear(x, gate.weight, gate.bias), linear(x, up.weight, up.bias)), down.weight, down.bias)

    torch.testing.assert_close(mlp(x), separate(), rtol=2e-2, atol=2e-2)
    return {"rows": rows, "separate_ms": graph_ms(separate, device), "stacked_ms": graph_ms(lambda: mlp(x), device)}


def run(args: argparse.Namespace) -> dict:
    device = args.device
    cfg = qwen3_4b_config(args.tiny)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = TargetModel.random(cfg, device=device, dtype=dtype, seed=0)
    draft = make_draft("dflash", cfg, device, dtype, args.tiny)
    prompt_len, new = (16, 24) if args.tiny else (512, 256)
    max_len = prompt_len + new + 2 * draft.block_size + 64
    gen = torch.Generator().manual_seed(0)
    record = {**run_header(args), "prompt_tokens": prompt_len, "new_tokens": new, "cells": {}, "joins": {},
              "draft_mlp": {}}
    with torch.inference_mode():
        constant_choice(model)
        oracle = OracleProposer(DraftProposer(draft, model), torch.zeros(max_len, dtype=torch.long),
                                card_schedules(draft.block_size), cfg.vocab_size, device)
        engine = BatchDecoder(Target(model=model, tokenizer=None, name="qwen3_4b-shaped-random", eos_token_ids=()),
                              oracle, max_batch=max(args.concurrency), max_len=max_len)
        engine.capture_graphs(tuple(args.blocks), modes=("greedy",))
        params = SamplingParams(max_new_tokens=new, ignore_eos=True)
        default_prefill = engine.max_prefill_tokens
        for c in args.concurrency:
            prompts = [torch.randint(0, cfg.vocab_size, (prompt_len,), generator=gen).tolist() for _ in range(2 * c)]
            if args.timeline:  # the engine's own joins, each cell profiled whole
                for block in args.blocks:
                    cell = profiled_cell(engine, prompts, params, c, block, device)
                    record["cells"][f"c{c} b{block}"] = cell
                    print(json.dumps({f"c{c} b{block}": {k: v for k, v in cell.items() if k != "profiled"}}),
                          flush=True)
                continue
            joins = join_variants(engine, prompts[:c], max(args.blocks), device)
            best = min(joins, key=lambda k: joins[k]["ms"])
            record["joins"][str(c)] = {"variants": joins, "fastest": best}
            print(json.dumps({f"c{c} joins": {k: round(v["ms"], 1) for k, v in joins.items()}}), flush=True)
            tokens, kernel = best.split()
            variants = {EARLIER: (4096, "triton"), "fastest join": (int(tokens), kernel)}
            for label, (prefill, join_kernel) in variants.items():
                engine.max_prefill_tokens = prefill
                for block in args.blocks:
                    with prompt_attention_settings(join_kernel, device):
                        cell = profiled_cell(engine, prompts, params, c, block, device, profile=label == EARLIER)
                    if label == EARLIER:
                        cell["alone_ms"] = alone_ms(engine, prompts, c, block, device)
                    record["cells"][f"c{c} b{block} {label}"] = cell
                    print(json.dumps({f"c{c} b{block} {label}": {k: v for k, v in cell.items() if k != "profiled"}}),
                          flush=True)
            engine.max_prefill_tokens = default_prefill
            record["draft_mlp"][str(c)] = draft_mlp_ms(draft, c * max(args.blocks), device)
            print(json.dumps({f"c{c} draft_mlp": record["draft_mlp"][str(c)]}), flush=True)
    return record


def report(path: str) -> str:
    record = json.loads(Path(path).read_text())
    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else ""

    lines = [f"Device {record['device']}, torch {record['torch']}, commit {record['commit']}, {record['date']}.", "",
             "| cell | tok/s | joins ms | loop step ms (host) | replay span ms | busy ms "
             "| idle gap after, median / p90 ms | step alone ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, cell in record["cells"].items():
        p = cell.get("profiled", {})
        lines.append(f"| {name} | {cell['tokens_per_s']:.0f} | {cell['loop']['join_ms']:.1f} "
                     f"| {cell['loop']['step_ms_median']:.3f} | {fmt(p.get('span_ms_median'))} "
                     f"| {fmt(p.get('busy_ms_median'))} | {fmt(p.get('gap_ms_median'))} / {fmt(p.get('gap_ms_p90'))} "
                     f"| {fmt(cell.get('alone_ms'))} |")
    for name, cell in record["cells"].items():
        t = cell.get("timeline")
        if t:
            lines += ["", f"{name}, the whole cell on the device: span {t['span_ms']:.1f} ms, busy {t['busy_ms']:.1f} "
                      f"(graph kernels {t['graph_kernels_ms']:.1f}, eager {t['eager_kernels_ms']:.1f}); idle "
                      + ", ".join(f"{k} {v:.2f}" for k, v in t["idle_ms"].items()) + "; longest gaps: "
                      + "; ".join(f"{g['ms']:.3f} ({g['between']}: {g['after'][:30]} | {g['before'][:30]})"
                                  for g in t["longest_gaps"])]
    for c, joins in record["joins"].items():
        lines += ["", f"{c} prompts joining at once, by padded tokens a group and prompt attention kernel (ms; device "
                  f"busy ms); fastest: {joins['fastest']}:", "",
                  " | ".join(f"{k}: {v['ms']:.1f} ({v['device_busy_ms']:.1f})" for k, v in joins["variants"].items())]
    for c, mlp in record["draft_mlp"].items():
        lines.append(f"\nThe draft's MLP on {mlp['rows']} rows: gate and up apart {mlp['separate_ms']:.4f} ms, "
                     f"stacked {mlp['stacked_ms']:.4f} ms.")
    return "\n".join(lines)


def main() -> None:
    parser = parser_with_common_flags(__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 8], choices=[1, *sorted(CARD_TAU)])
    parser.add_argument("--timeline", action="store_true",
                        help="only the cells under the engine's own joins, each profiled whole (timeline: where the "
                             "device idles)")
    run_and_report(parser, run, report, "loop_probe")


if __name__ == "__main__":
    main()
