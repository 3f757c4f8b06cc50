"""Output tokens/s of batched autoregressive vs batched speculative decoding at concurrency 1-32 (issue 7).

One run, side by side on one GPU, for two workloads:
  - a Qwen3-4B-shaped target with random bf16 weights and a 5-layer DFlash draft (SPEC shapes), with
    oracle acceptance (each sequence's steps alternately accept 5 and 6 drafts: tau 6.5, capped by the block:
    the real per-step work, a chosen number of tokens committed); random 128-token prompts, 128 new tokens;
  - SmolLM2-135M-Instruct with the shipped DFlash and DFlare drafts on held-out gsm8k test questions (chat
    template, greedy, up to 256 new tokens, real acceptance).
For each concurrency c, the engine keeps c requests in flight (continuous batching: a finished request's
row goes to the next prompt) until 2c requests (at least 4) are done; tokens/s = output tokens / wall time,
prefill included, as a server sees it. AR is BatchDecoder without a draft; speculative runs block sizes
4, 8 and 16 and the best one is reported per concurrency. Every measurement is repeated (--repeats) and the
median quoted (the SmolLM2 AR baseline is measured once and shared by both drafts' tables). CUDA graphs for
every batch size and block are captured before timing.

    python -m benchmarks.batch_throughput --smollm2 PATH.gguf --data-dir DIR --out DIR   # on a CUDA machine
    python -m benchmarks.batch_throughput --tiny --device cpu                           # logic check
    python -m benchmarks.batch_throughput --report FILE.json                            # markdown
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import torch

from benchmarks.harness import (make_draft, parser_with_common_flags, qwen3_4b_config, run_and_report, run_header,
                                sync)
from blockspec.engine import BatchDecoder, SamplingParams
from blockspec.target import Target, TargetModel

CONCURRENCY = (1, 4, 8, 16, 32)
BLOCKS = (4, 8, 16)
ORACLE = [5, 6]  # accepted drafts per step, cycled: tau 6.5


def run_workload(decoder: BatchDecoder, prompts: list[list[int]], params: SamplingParams, concurrency: int,
                 block: int, device: str) -> dict:
    """Keep `concurrency` requests in flight until every prompt is answered."""
    pending = deque(enumerate(prompts))
    index, outputs = {}, [None] * len(prompts)
    tokens, steps, taus = 0, 0, []
    sync(device)
    started = time.perf_counter()
    while pending or decoder.has_work:
        while pending and decoder.num_active + len(decoder.waiting) < concurrency:
            i, prompt = pending.popleft()
            index[decoder.add(prompt, params, block_size=block)] = i
        for seq_id, chunk in decoder.step():
            tokens += len(chunk.token_ids)
            if chunk.result is not None:
                taus.append(chunk.result.stats.mean_acceptance_length)
                outputs[index[seq_id]] = chunk.result.token_ids
        steps += 1
    sync(device)
    wall = time.perf_counter() - started
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "steps": steps,
            "tau": statistics.mean(taus), "outputs": outputs}


def ar_sweep(ar: BatchDecoder, prompts: list[list[int]], params: SamplingParams, device: str,
             repeats: int) -> dict:
    """Batched AR per concurrency: the summary (median of repeats) and the first run's outputs."""
    run_workload(ar, prompts[:4], params, 4, 1, device)  # first-call effects are not timed
    rows = {}
    for c in CONCURRENCY:
        runs = [run_workload(ar, prompts[:max(4, 2 * c)], params, c, 1, device) for _ in range(repeats)]
        rows[c] = (summarize(runs), runs[0]["outputs"])
    return rows


def sweep(ar_rows: dict, spec: BatchDecoder, prompts: list[list[int]], params: SamplingParams,
          device: str, repeats: int, label: str) -> dict:
    """Speculative tokens/s (median of repeats) at every block, per concurrency, beside the AR rows."""
    for block in BLOCKS:  # first-call effects (kernel compilation, allocator growth) are not timed
        run_workload(spec, prompts[:4], params, 4, block, device)
    rows = {}
    for c in CONCURRENCY:
        work = prompts[:max(4, 2 * c)]
        ar_summary, reference = ar_rows[c]
        row: dict = {"requests": len(work), "ar": ar_summary}
        for block in BLOCKS:
            runs = [run_workload(spec, work, params, c, block, device) for _ in range(repeats)]
            row[f"spec_b{block}"] = summarize(runs)
            # bf16: a 16-row verify and a 1-row step round differently, so equality is reported, not required
            row[f"spec_b{block}"]["identical_to_ar"] = sum(
                a == b for a, b in zip(runs[0]["outputs"], reference)) / len(work)
        best = max(BLOCKS, key=lambda b: row[f"spec_b{b}"]["tokens_per_s"])
        row["best_block"] = best
        row["best_speedup"] = row[f"spec_b{best}"]["tokens_per_s"] / row["ar"]["tokens_per_s"]
        rows[str(c)] = row
        print(json.dumps({label: {c: {k: (v if not isinstance(v, dict) else round(v["tokens_per_s"]))
                                      for k, v in row.items()}}}), flush=True)
    return rows


def graph_check(target: Target, draft, prompts: list[list[int]], params: SamplingParams, max_len: int,
                device: str) -> dict:
    """The CUDA-graph path against the same engine run eagerly on the same padded shapes (so the same kernels
    see the same GEMM shapes): greedy tokens must be identical, with requests joining and leaving."""
    graphed = BatchDecoder(target, draft, max_batch=8, max_len=max_len)
    eager = BatchDecoder(target, draft, max_batch=8, max_len=max_len, use_graphs=False)
    eager.pad_rows = True
    results = [run_workload(d, prompts[:16], params, 8, 16, device)["outputs"] for d in (graphed, eager)]
    same = sum(a == b for a, b in zip(*results))
    return {"requests": 16, "concurrency": 8, "identical": f"{same}/16", "ok": same == 16}


def summarize(runs: list[dict]) -> dict:
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in runs], "tokens": runs[0]["tokens"],
            "steps": runs[0]["steps"], "tau": runs[0]["tau"]}


def qwen3_4b(args: argparse.Namespace, device: str) -> dict:
    cfg = qwen3_4b_config(args.tiny)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = TargetModel.random(cfg, device=device, dtype=dtype, seed=0)
    target = Target(model=model, tokenizer=None, name="qwen3-4b-shaped-random", eos_token_ids=())
    draft = make_draft("dflash", cfg, device, dtype, args.tiny)
    prompt_len, new = (16, 24) if args.tiny else (128, 128)
    max_len = prompt_len + new + 64
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(64)]
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    ar = BatchDecoder(target, None, max_batch=max(CONCURRENCY), max_len=max_len)
    spec = BatchDecoder(target, draft, max_batch=max(CONCURRENCY), max_len=max_len)
    spec.forced_acceptance = ORACLE
    check = graph_check(target, draft, prompts, SamplingParams(max_new_tokens=48, ignore_eos=True), max_len, device)
    print(json.dumps({"graph_check": check}), flush=True)
    started = time.perf_counter()
    graphs = ar.capture_graphs((1,)) + spec.capture_graphs(BLOCKS)
    capture_s = time.perf_counter() - started
    rows = sweep(ar_sweep(ar, prompts, params, device, args.repeats), spec, prompts, params, device, args.repeats,
                 "qwen3-4b")
    return {"graph_check": check, "prompt_tokens": prompt_len, "new_tokens": new, "oracle_accepted_drafts": ORACLE,
            "graphs": graphs, "capture_s": capture_s, "concurrency": rows}


def smollm2(args: argparse.Namespace, device: str) -> dict:
    from blockspec.draft import load_draft
    from blockspec.shipped import shipped_draft_dir
    from blockspec.target import load_target
    from blockspec.datasets import load_dataset

    target = load_target(args.smollm2, device=device, dtype="auto")
    prompts = [target.encode([{"role": "user", "content": s.turns[0]}])
               for s in load_dataset("gsm8k", args.data_dir)[0][:64]]
    params = SamplingParams(max_new_tokens=256)
    max_len = max(len(p) for p in prompts) + 256 + 64
    ar = BatchDecoder(target, None, max_batch=max(CONCURRENCY), max_len=max_len)
    ar.capture_graphs((1,))
    ar_rows = ar_sweep(ar, prompts, params, device, args.repeats)  # one AR baseline for both drafts
    out = {"prompts": "gsm8k test, first 64 questions", "max_new_tokens": 256, "dtype": str(target.dtype)}
    for kind in ("dflash", "dflare"):
        draft = load_draft(str(shipped_draft_dir(f"smollm2-135m-instruct-{kind}")), device=device, dtype=target.dtype)
        spec = BatchDecoder(target, draft, max_batch=max(CONCURRENCY), max_len=max_len)
        spec.capture_graphs(BLOCKS)
        out[kind] = sweep(ar_rows, spec, prompts, params, device, args.repeats, f"smollm2-{kind}")
        del spec
    return out


def run(args: argparse.Namespace) -> dict:
    device = args.device
    record = {**run_header(args), "command": " ".join(sys.argv), "repeats": args.repeats,
              "concurrency": CONCURRENCY, "blocks": BLOCKS}
    with torch.inference_mode():
        record["qwen3_4b"] = qwen3_4b(args, device)
        if args.smollm2:
            record["smollm2"] = smollm2(args, device)
    return record


def report(path: str) -> str:
    r = json.loads(Path(path).read_text())
    lines = [f"Device {r['device']}, torch {r['torch']}, commit {r['commit']}, {r['date']}; median of "
             f"{r['repeats']} runs per cell. Command: `{r['command']}`", ""]

    def table(title: str, rows: dict) -> None:
        blocks = r["blocks"]
        lines.extend([title, "", "| concurrency | AR tok/s | " + " | ".join(f"spec B={b} tok/s (tau)" for b in blocks)
                      + " | best block | best speedup |",
                      "| --- | --- | " + " | ".join("---" for _ in blocks) + " | --- | --- |"])
        for c, row in rows.items():
            cells = [f"{row[f'spec_b{b}']['tokens_per_s']:.0f} ({row[f'spec_b{b}']['tau']:.2f})" for b in r["blocks"]]
            lines.append(f"| {c} | {row['ar']['tokens_per_s']:.0f} | " + " | ".join(cells)
                         + f" | {row['best_block']} | {row['best_speedup']:.2f}x |")
        lines.append("")

    q = r["qwen3_4b"]
    lines.extend([f"CUDA graphs vs the same engine run eagerly on the same shapes (16 greedy requests, 8 at a time, "
                  f"joining and leaving): {q['graph_check']['identical']} identical.", ""])
    table(f"Qwen3-4B-shaped random bf16 target, 5-layer DFlash, oracle acceptance {q['oracle_accepted_drafts']} "
          f"drafts per step (tau 6.5, capped at the block), {q['prompt_tokens']}-token prompts, "
          f"{q['new_tokens']} new tokens:", q["concurrency"])
    if "smollm2" in r:
        s = r["smollm2"]
        for kind in ("dflash", "dflare"):
            table(f"SmolLM2-135M-Instruct ({s['dtype']}), shipped {kind} draft, {s['prompts']}, greedy, up to "
                  f"{s['max_new_tokens']} new tokens (real acceptance):", s[kind])
    return "\n".join(lines)


def main() -> None:
    parser = parser_with_common_flags(__doc__)
    parser.add_argument("--data-dir", default=None,
                        help="folder holding gsm8k/test.jsonl (default: blockspec.datasets.default_data_dir())")
    parser.add_argument("--repeats", type=int, default=3)
    run_and_report(parser, run, report, "batch_throughput")

if __name__ == "__main__":
    main()
