"""Where a batched Qwen3-4B-shaped step and prefill lose time against their floors (issue 26): four probes on
random bf16 weights, one JSON.

- prefill: one joint prefill of 8 x 512 tokens (batch_throughput's join) profiled by torch op with input shapes,
  so that every kernel is named by the op that launched it;
- decode attention: the 36 layers' decode attention at 8, 16 and 32 rows (AR, 1 query; a block-8 verify, 8
  queries) under 1, 2, 4 and 8 key splits a row and 32, 64 or 128 keys a tile, as CUDA-graph replays, beside the K/V
  floor;
- a prompt alone: its prefill's wall time (host-bound) and a pure-Python loop's, before and after one cuDNN prompt
  attention has run in the process (whether cuDNN slows the host: it did not, design notes "Prefill"). Measured
  first;
- weight products: each of the target's at 32-4096 rows on cuBLAS and on cuBLASLt, and an eager call's host time.

SDPA's backends on prompt attention, beside the package's Triton kernel: benchmarks/prompt_attention.py (records
holding them from this probe, batch_probe-20261206-095936.json, still render).

    python -m benchmarks.batch_probe --out DIR
    python -m benchmarks.batch_probe --report FILE.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.harness import (copy_bandwidth, graph_ms, parser_with_common_flags, python_loop_ms, qwen3_4b_config,
                                run_and_report, run_header, sync)
from blockspec.kernels.settings import device_tables
from blockspec.target import TargetConfig, TargetModel

PROMPTS, PROMPT_TOKENS, CONTEXT, MAX_LEN = 8, 512, 640, 1024  # CONTEXT: a cell's mean (prompt + 128)
ROWS = (8, 16, 32)


def prefill_ops(model: TargetModel, device: str) -> dict:
    """One joint prefill of PROMPTS x PROMPT_TOKENS: the ops that launched kernels, by device time, with shapes."""
    from torch.profiler import ProfilerActivity, profile

    cfg = model.config
    cache = model.new_cache(PROMPTS, MAX_LEN)
    ids = torch.randint(0, cfg.vocab_size, (PROMPTS, PROMPT_TOKENS), device=device)
    positions = torch.arange(PROMPT_TOKENS, device=device).repeat(PROMPTS, 1)

    def run() -> None:
        hidden, _ = model(ids, positions, cache, kv_len=PROMPT_TOKENS)
        model.logits(hidden[:, -1])

    with torch.inference_mode():
        run()
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            run()
            sync(device)
    ops = [{"op": e.key, "shapes": str(e.input_shapes)[:160], "calls": e.count, "device_us": e.device_time_total}
           for e in prof.key_averages(group_by_input_shape=True)
           if e.key.startswith("aten::") and e.device_time_total > 0]
    kernels = [{"kernel": e.key[:90], "calls": e.count, "device_us": e.self_device_time_total}
               for e in prof.key_averages() if e.self_device_time_total > 0 and not e.key.startswith("aten::")]
    return {"ops": sorted(ops, key=lambda r: -r["device_us"])[:30],
            "kernels": sorted(kernels, key=lambda r: -r["device_us"])[:25]}


def lone_prompt_host(model: TargetModel, device: str) -> dict:
    """A prompt prefilled alone, wall ms (median of 5), and a pure-Python loop's ms, before and after one cuDNN
    prompt attention of 8 x 512 tokens runs in this process."""
    cfg = model.config
    cache = model.new_cache(1, MAX_LEN)
    ids = torch.randint(0, cfg.vocab_size, (1, PROMPT_TOKENS), device=device)
    positions = torch.arange(PROMPT_TOKENS, device=device)[None]

    def prefill_ms() -> float:
        times = []
        for _ in range(6):
            sync(device)
            started = time.perf_counter()
            with torch.inference_mode():
                model(ids, positions, cache, kv_len=PROMPT_TOKENS)
            sync(device)
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times[1:])  # the first call compiles and plans

    before = {"prefill_ms": prefill_ms(), "python_ms": python_loop_ms()}
    q = torch.randn(PROMPTS, cfg.num_heads, PROMPT_TOKENS, cfg.head_dim, device=device, dtype=torch.bfloat16)
    kv = torch.randn(PROMPTS, cfg.num_kv_heads, PROMPT_TOKENS, cfg.head_dim, device=device, dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    sync(device)
    return {"before_cudnn": before, "after_cudnn": {"prefill_ms": prefill_ms(), "python_ms": python_loop_ms()}}


def decode_attention_sweep(cfg: TargetConfig, device: str, bandwidth: float) -> list[dict]:
    """The 36 layers' decode attention at each of ROWS rows of CONTEXT keys, per (queries, splits, keys a tile)."""
    from blockspec.kernels.attention import decode_attention
    from blockspec.kernels.settings import batch_attention_config

    layers = cfg.num_layers
    shape = (layers, max(ROWS), cfg.num_kv_heads, MAX_LEN, cfg.head_dim)
    k_cache = torch.randn(shape, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn(shape, device=device, dtype=torch.bfloat16)
    table = device_tables(torch.device(device)).attention
    results = []
    for rows in ROWS:
        floor = layers * 2 * rows * cfg.num_kv_heads * CONTEXT * cfg.head_dim * 2 / bandwidth * 1e3
        for n_q, kind in ((1, "narrow"), (8, "wide")):
            q = torch.randn(rows, cfg.num_heads, n_q, cfg.head_dim, device=device, dtype=torch.bfloat16)
            limits = (CONTEXT - n_q + torch.arange(n_q, device=device)).repeat(rows, 1)
            engine, engine_splits = batch_attention_config(table[kind], rows)  # what decode_attention takes
            one_row = {k: v for k, v in table[kind].items() if k != "rows"}
            for splits in (1, 2, 4, 8):
                for block_n in (32, 64, 128):
                    config = {**one_row, "splits": splits * rows, "block_n": block_n}  # shared out: `splits` a row

                    def run(config=config, q=q, limits=limits, rows=rows) -> None:
                        for layer in range(layers):
                            decode_attention(q, k_cache[layer, :rows], v_cache[layer, :rows], limits, config=config)
                    cell = {"rows": rows, "queries": n_q, "splits": splits, "block_n": block_n,
                            "engine": splits == engine_splits and block_n == engine["block_n"]}
                    try:
                        ms = graph_ms(run, device)
                    except Exception as exc:  # a tile that does not fit: recorded, not fatal
                        results.append({**cell, "error": str(exc)[:200]})
                        continue
                    results.append({**cell, "ms": ms, "floor_ms": floor, "x_floor": ms / floor})
    return results


def host_us(fn: Callable[[], object], device: str, calls: int = 50) -> float:
    """Host microseconds a call of `fn` takes to enqueue (the median of 5 rounds of `calls`, synchronised between)."""
    rounds = []
    for _ in range(6):
        sync(device)
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - started) * 1e6 / calls)
    sync(device)
    return statistics.median(rounds[1:])


def gemm_backends(cfg: TargetConfig, device: str) -> list[dict]:
    """Each Qwen3-4B weight product (and the lm_head) at the row counts a batch runs (32 AR rows, a 32 x 8 verify's
    256 and its draft's 224, a lone prompt's 512, a joint prefill's 4096) on cuBLAS and on cuBLASLt, torch's two BLAS
    paths on CUDA, as CUDA-graph replays (cuBLAS's heuristic left the 256-row verify's GEMMs at 1.6x their floor),
    and at 512 rows the host time of an eager call (a lone prompt's prefill is host-bound)."""
    shapes = {"qkv": ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.hidden_size),
              "o_proj": (cfg.hidden_size, cfg.num_heads * cfg.head_dim),
              "gate_up": (2 * cfg.intermediate_size, cfg.hidden_size),
              "down": (cfg.hidden_size, cfg.intermediate_size), "lm_head": (cfg.vocab_size, cfg.hidden_size)}
    previous, results = torch.backends.cuda.preferred_blas_library(), []
    try:
        for name, (n, k) in shapes.items():
            weight = torch.randn(n, k, device=device, dtype=torch.bfloat16) * k ** -0.5
            for rows in (32, 224, 256, 512, 4096):
                x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
                cell = {"gemm": name, "n": n, "k": k, "rows": rows}
                for backend in ("cublas", "cublaslt"):
                    torch.backends.cuda.preferred_blas_library(backend)
                    try:
                        cell[backend] = graph_ms(lambda: F.linear(x, weight), device)
                    except Exception as exc:  # a backend that cannot be captured: recorded
                        cell[backend] = str(exc).splitlines()[0][:120]
                    if rows == 512:  # a lone prompt's prefill is host-bound: what one eager call costs the host
                        cell[f"{backend}_host_us"] = host_us(lambda: F.linear(x, weight), device)
                results.append(cell)
    finally:
        torch.backends.cuda.preferred_blas_library(previous)
    return results


def run(args: argparse.Namespace) -> dict:
    device = args.device
    record = run_header(args)
    bandwidth = copy_bandwidth(device, 1.0)
    cfg = qwen3_4b_config(args.tiny)
    model = TargetModel.random(cfg, device, torch.bfloat16)
    model.prepare_fast_path()
    record.update(copy_bandwidth_GBps=bandwidth / 1e9, lone_prompt=lone_prompt_host(model, device),
                  prefill=prefill_ops(model, device),
                  decode_attention=decode_attention_sweep(cfg, device, bandwidth),
                  gemm_backends=gemm_backends(cfg, device))
    return record


def report(path: str) -> str:
    r = json.load(open(path))
    lines = [f"Device {r['device']}, torch {r['torch']}, commit {r['commit']}, {r['date']}; copy bandwidth "
             f"{r['copy_bandwidth_GBps']:.0f} GB/s.", "", "Prefill of 8 x 512 tokens, ops by device time (with the "
             "kernels they launched):", "", "| op | shapes | calls | device ms |", "| --- | --- | --- | --- |"]
    lines += [f"| {o['op']} | {o['shapes']} | {o['calls']} | {o['device_us'] / 1e3:.2f} |" for o in r["prefill"]["ops"]]
    lines += ["", "| kernel | calls | device ms |", "| --- | --- | --- |"]
    lines += [f"| {k['kernel']} | {k['calls']} | {k['device_us'] / 1e3:.2f} |" for k in r["prefill"]["kernels"]]
    if "lone_prompt" in r:
        before, after = r["lone_prompt"]["before_cudnn"], r["lone_prompt"]["after_cudnn"]
        lines += ["", f"A prompt alone: prefill {before['prefill_ms']:.1f} ms before any cuDNN attention ran in the "
                  f"process, {after['prefill_ms']:.1f} after; a pure-Python loop {before['python_ms']:.1f} / "
                  f"{after['python_ms']:.1f} ms."]
    if "prompt_attention" in r:
        lines += ["", f"Prompt attention, one layer ({r['prompt_attention']['causal_gflop']:.1f} GFLOP):", ""]
        lines += [f"- {name}: {v}" for name, v in r["prompt_attention"].items() if name != "causal_gflop"]
    lines += ["", f"Decode attention, 36 layers, context {CONTEXT}:", "",
              "| rows | queries | splits a row | keys a tile | ms | x floor |", "| --- | --- | --- | --- | --- | --- |"]
    for d in r["decode_attention"]:
        cell = f"{d['ms']:.3f} | {d['x_floor']:.2f}" if "ms" in d else f"{d['error'][:60]} | "
        lines.append(f"| {d['rows']} | {d['queries']} | {d['splits']} | {d['block_n']}"
                     f"{' (engine)' if d['engine'] else ''} | {cell} |")
    if "gemm_backends" in r:
        lines += ["", "Weight products, ms (cuBLAS / cuBLASLt):", "", "| product | rows | cuBLAS | cuBLASLt |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {g['gemm']} ({g['n']} x {g['k']}) | {g['rows']} | " + " | ".join(
            (f"{g[b]:.4f}" if isinstance(g[b], float) else g[b])
            + (f" (host {g[b + '_host_us']:.0f} us)" if b + "_host_us" in g else "") for b in ("cublas", "cublaslt"))
            + " |" for g in r["gemm_backends"]]
    return "\n".join(lines)


def main() -> None:
    run_and_report(parser_with_common_flags(__doc__), run, report, "batch_probe")


if __name__ == "__main__":
    main()
