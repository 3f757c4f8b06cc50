"""Output tokens/s of batched autoregressive and speculative decoding at concurrency 1-64, each cell beside its
floor, and where a step's time goes (issues 25 and 26).

Workloads (--workload, any of them in one run):
  - qwen3_4b: a Qwen3-4B-shaped target with random bf16 weights and a 5-layer DFlash draft (SPEC shapes);
    random 512-token prompts, 256 new tokens. Columns: AR (block 1); blocks 4, 8 and 16 with oracle acceptance at
    the Qwen3.5-4B-DFlash card's tau for that block (3.43, 5.30, 6.75; benchmarks/oracle.py: the real draft pass
    every step, a chosen number of its tokens accepted); and the automatic block (requests of block 16 on an engine
    with max_step_tokens, `blockspec serve`'s CUDA default), each step accepting its own block's card tau.
  - qwen35_4b: the Qwen3.5-4B-shaped hybrid target (Gated DeltaNet + gated attention, random bf16 weights) with the
    6-layer sliding-window draft shape of Qwen3.5-4B-DFlash; AR and block 8 at tau 5.30, c = 1..32, beside
    SGLang's published 2.35x over AR at c = 32 (the model card, B200).
  - smollm2: SmolLM2-135M-Instruct (--smollm2 PATH.gguf) with the shipped DFlash and DFlare drafts on gsm8k test
    questions (chat template, greedy, up to 256 new tokens): real acceptance, the same columns.
Before any timing, a random-weight workload checks the engine with the draft's own tokens: graphed greedy tokens
equal the same engine run eagerly on the same padded shapes (16 requests, 8 at a time, joining and leaving), for
AR and drafted steps; then the target is made to choose token 0 everywhere (`constant_choice`, which changes no
step's work) so that the oracle's continuation is known.

For each concurrency c the engine keeps c requests in flight (continuous batching) until 2c (at least 4) are
answered; tokens/s = output tokens / wall time, prefill included, as a server sees it; the median of --repeats.
One engine serves every column (AR requests are block-1 requests), its CUDA graphs captured before timing.
The floor of a cell is one decode step of c rows at the mean context (prompt + half the new tokens) with the
block its steps ran (benchmarks/roofline.py: bytes over the copy bandwidth, or FLOPs over the rate of an 8192^3
bf16 matmul, both measured in the same run), and the tokens/s it allows: c x tau / that step. Where the time
goes, per concurrency: the prefill of c prompts joining at once (plain and drafted, beside the device's busy time);
c live rows, and per block the whole greedy step (with its costliest kernels, timed without PDL), the same step as
the engine runs it for a row returning log-probabilities and with every row sampling, the target's weight GEMMs
alone, and the verify pass and the draft pass (each with its greedy tokens), each captured as a CUDA graph of its
own, beside its floor.

    python -m benchmarks.batch_throughput --out DIR                                 # qwen3_4b on a CUDA machine
    python -m benchmarks.batch_throughput --workload qwen35_4b --out DIR
    python -m benchmarks.batch_throughput --workload smollm2 --smollm2 PATH.gguf --data-dir DIR --out DIR
    python -m benchmarks.batch_throughput --concurrency 32 --blocks 8 --skip-check   # a quick A/B of two trees
    python -m benchmarks.batch_throughput --tiny --device cpu --concurrency 1 2      # logic check
    python -m benchmarks.batch_throughput --report FILE.json                        # markdown
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from benchmarks import roofline
from benchmarks.harness import (copy_bandwidth, gdn_kernels, graph_kernels, graph_ms, make_draft, matmul_rate,
                                parser_with_common_flags, profiled_kernels, python_loop_ms, qwen3_4b_config,
                                qwen35_4b_config, qwen35_draft, restored, run_and_report, run_header, step_ms, sync,
                                target_pass, weight_gemms)
from benchmarks.oracle import OracleProposer, constant_choice, tau_schedule
from blockspec.cache import DEFAULT_ROLLBACK, ROLLBACKS
from blockspec.draft import DraftModel
from blockspec.engine import BatchDecoder, DraftProposer, SamplingParams
from blockspec.engine.batch import MAX_PREFILL_TOKENS
from blockspec.kernels import use_settings
from blockspec.kernels.settings import device_tables
from blockspec.serve.cli import CUDA_MAX_STEP_TOKENS
from blockspec.target import Target, TargetModel

CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
CARD_TAU = {4: 3.43, 8: 5.30, 16: 6.75}  # Qwen3.5-4B-DFlash's model card, gsm8k, per block
SGLANG_C32_SPEEDUP = 2.35  # the same card: SGLang, block 8, over AR at concurrency 32 (B200)


def columns(blocks: tuple[int, ...], auto: bool) -> dict[str, int]:
    """Column name -> the block its requests ask for: AR, each block, and the automatic block (the largest)."""
    cols = {"ar": 1, **{f"b{b}": b for b in blocks}}
    if auto:
        cols["auto"] = max(blocks)
    return cols


def run_workload(engine: BatchDecoder, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 concurrency: int, block: int | None, device: str) -> dict:
    """Keep `concurrency` requests in flight until every prompt is answered (with its own params when a list;
    block None: the engine's default)."""
    per_prompt = params if isinstance(params, list) else [params] * len(prompts)
    pending = deque(enumerate(prompts))
    index, outputs = {}, [None] * len(prompts)
    tokens, steps, taus, blocks = 0, 0, [], Counter()
    join_ms, step_ms = [], []  # the host's wall time of each engine.step(): those that admitted requests, the rest
    sync(device)
    started = time.perf_counter()
    while pending or engine.has_work:
        while pending and engine.num_active + len(engine.waiting) < concurrency:
            i, prompt = pending.popleft()
            index[engine.add(prompt, per_prompt[i], block_size=block)] = i
        joining, step_started = bool(engine.waiting), time.perf_counter()
        chunks = engine.step()
        (join_ms if joining else step_ms).append((time.perf_counter() - step_started) * 1e3)
        for seq_id, chunk in chunks:
            tokens += len(chunk.token_ids)
            if chunk.result is not None:
                taus.append(chunk.result.stats.mean_acceptance_length)
                blocks.update(chunk.result.stats.step_blocks)
                outputs[index[seq_id]] = chunk.result.token_ids
        steps += 1
    sync(device)
    wall = time.perf_counter() - started
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "steps": steps,
            "tau": statistics.mean(taus), "blocks": {str(b): n for b, n in sorted(blocks.items())},
            "loop": {"joins": len(join_ms), "join_ms": sum(join_ms), "steps_ms": sum(step_ms),
                     "step_ms_median": statistics.median(step_ms) if step_ms else 0.0},
            "outputs": outputs}


def summarize(runs: list[dict], reference: list | None) -> dict:
    """The median tokens/s of the runs, and what the first run did (steps, tau, the blocks its requests' steps
    ran, how many answers equal the AR answers)."""
    first = runs[0]
    cell = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "all_tokens_per_s": [round(r["tokens_per_s"], 1) for r in runs], "tokens": first["tokens"],
            "steps": first["steps"], "tau": first["tau"], "blocks": first["blocks"], "loop": first["loop"]}
    if reference is not None:  # bf16: a verify of many rows and a 1-row step round differently; reported
        cell["identical_to_ar"] = sum(a == b for a, b in zip(first["outputs"], reference)) / len(reference)
    return cell


@dataclass
class Floors:
    """The floors of one workload's cells: its target and draft, the mean context of a decoding row, and the
    run's measured copy bandwidth (bytes/s) and matmul rate (FLOP/s)."""
    model: TargetModel
    draft: DraftModel | None
    context: int
    bandwidth: float
    flop_rate: float

    def cell(self, concurrency: int, block: int, tau: float) -> dict:
        """One decode step of `concurrency` rows with `block`, and the tokens/s it allows at `tau`."""
        cost = roofline.step(self.model, self.draft if block > 1 else None, [self.context] * concurrency, block)
        seconds = cost.seconds(self.bandwidth, self.flop_rate)
        return {"block": block, "step_ms": seconds * 1e3, "tokens_per_s": concurrency * tau / seconds,
                "bound": "memory" if cost.bytes / self.bandwidth >= cost.flops / self.flop_rate else "compute"}

    def timed(self, ms: float, cost: roofline.Cost) -> dict:
        floor_ms = cost.seconds(self.bandwidth, self.flop_rate) * 1e3
        return {"ms": ms, "floor_ms": floor_ms, "x_floor": ms / floor_ms}


def sweep(engine: BatchDecoder, prompts: list[list[int]], params: SamplingParams, cols: dict[str, int],
          concurrency: tuple[int, ...], repeats: int, floors: Floors, device: str, label: str, ar: dict,
          parts: bool = False) -> dict:
    """Every column at every concurrency (the median of `repeats`), each cell beside its floor. `ar` holds the
    AR cell and answers per concurrency: measured here into an empty dict, reused when filled (one baseline for
    two drafts). With `parts`, where the step's time goes at each concurrency."""
    for name, block in cols.items():  # first-call effects (compilation, allocator growth) are not timed
        with step_tokens(engine, name):
            run_workload(engine, prompts[:4], params, 4, block, device)
    rows = {}
    for c in concurrency:
        started = time.perf_counter()
        work = prompts[:max(4, 2 * c)]
        row: dict = {"requests": len(work)}
        for name, block in cols.items():
            if name == "ar" and c in ar:
                row["ar"] = ar[c][0]
                continue
            with step_tokens(engine, name):
                warm_join(engine, work[:c], block)
                runs = [run_workload(engine, work, params, c, block, device) for _ in range(repeats)]
            row[name] = summarize(runs, None if name == "ar" else ar[c][1])
            if name == "ar":
                ar[c] = (row["ar"], runs[0]["outputs"])
            ran = max(row[name]["blocks"].items(), key=lambda kv: kv[1])[0] if row[name]["blocks"] else "1"
            row[name]["floor"] = floors.cell(c, int(ran), row[name]["tau"])
        if parts:
            row["prefill"] = prefill_time(engine, prompts[:c], device, 1)
            if engine.proposer is not None:
                row["prefill_drafted"] = prefill_time(engine, prompts[:c], device, engine.max_block)
            row["parts"] = where_time_goes(engine, prompts, c, tuple(b for b in cols.values() if b > 1), floors,
                                           device)
        row["seconds"] = time.perf_counter() - started  # the row's whole host time, parts included
        rows[str(c)] = row
        print(json.dumps({label: {c: {k: round(v["tokens_per_s"]) for k, v in row.items()
                                      if isinstance(v, dict) and "tokens_per_s" in v}}, "s": round(row["seconds"])}),
              flush=True)
    return rows


def warm_join(engine: BatchDecoder, prompts: list[list[int]], block: int) -> None:
    """Admit `prompts` at once, untimed, and cancel them: the first join of a group shape compiles its kernels
    (Triton's, flash-linear-attention's), which with a cold cache landed inside a timed cell (Qwen3.5's c = 32 AR
    joins took 2.4x their warm time, and the cell's speculative / AR ratio read 2.53x where warm it is 2.08x:
    batch_throughput-20261207-023541.json)."""
    joined = [engine.add(p, SamplingParams(max_new_tokens=8, ignore_eos=True), block_size=block) for p in prompts]
    engine.admit()
    for seq_id in joined:
        engine.cancel(seq_id)


@contextlib.contextmanager
def step_tokens(engine: BatchDecoder, column: str) -> Iterator[None]:
    """The engine's max_step_tokens while inside: blockspec serve's CUDA default for the automatic column
    (the block then shrinks as the batch grows), off for the others."""
    engine.max_step_tokens = CUDA_MAX_STEP_TOKENS if column == "auto" else None
    try:
        yield
    finally:
        engine.max_step_tokens = None


def prefill_time(engine: BatchDecoder, prompts: list[list[int]], device: str, block: int) -> dict:
    """The prefill of `prompts` joining an idle engine at once with `block` (1: plain decoding; more: the proposer
    takes their taps too), `admit`: one forward per group of joiners that fits max_prefill_tokens. Timed from the
    host, the median of 3: ms in all and per prompt; then one join profiled: the device's busy ms (a join that takes
    longer waits on the host) and its costliest kernels; for a single prompt also the host functions that took
    longest (cProfile, own time). The cancels that empty the engine after each join are outside what is timed and
    profiled (their row moves copy caches)."""
    joined: list[int] = []

    def join() -> float:
        joined[:] = [engine.add(p, SamplingParams(max_new_tokens=8, ignore_eos=True), block_size=block)
                     for p in prompts]
        sync(device)
        started = time.perf_counter()
        engine.admit()
        sync(device)
        return (time.perf_counter() - started) * 1e3

    def leave() -> None:
        for seq_id in joined:
            engine.cancel(seq_id)

    times = []
    for _ in range(3):
        times.append(join())
        leave()
    ms = statistics.median(times)
    kernels = profiled_kernels(join, device, top=None)
    leave()
    out = {"prompts": len(prompts), "block": block, "ms": ms, "ms_per_prompt": ms / len(prompts),
           "device_busy_ms": sum(k["us"] for k in kernels) / 1e3, "kernels": kernels[:12]}
    if len(prompts) == 1:
        out["host_functions"] = host_functions(join)
        leave()
    return out


def host_functions(fn: Callable[[], object], top: int = 15) -> list[dict]:
    """The `top` functions by own host time in one call of `fn` (cProfile; C functions such as a kernel launch or a
    host read count as their caller's callees): where a host-bound call spends its time."""
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    rows = [{"function": f"{Path(file).name}:{line}({name})", "ms": own * 1e3, "calls": calls}
            for (file, line, name), (_, calls, own, _, _) in pstats.Stats(profiler).stats.items()]
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def where_time_goes(engine: BatchDecoder, prompts: list[list[int]], concurrency: int, blocks: tuple[int, ...],
                    floors: Floors, device: str) -> dict:
    """`concurrency` live rows (`live_rows`), and per block (1: AR) the whole greedy step, the target's weight GEMMs
    alone on its c x block rows, the verify pass with its greedy tokens and the draft pass with its greedy tokens,
    each captured as a CUDA graph of its own and timed alone, beside its floor at the rows' real contexts."""
    oracle: OracleProposer = engine.proposer
    model, n = engine.target.model, concurrency
    out: dict = {}
    with live_rows(engine, prompts[:concurrency], device):
        contexts = engine.start[:n].tolist()
        for block in (1, *blocks):
            cost = roofline.step(model, floors.draft if block > 1 else None, contexts, block)
            parts = {"step": floors.timed(step_ms(engine, n, block, device, replays=5, rounds=3), cost)}
            # the same step as the engine runs it once a row returns log-probabilities, or samples
            parts["step_scored"] = floors.timed(scored_step_ms(engine, n, block, device), cost)
            parts["step_sampled"] = floors.timed(sampled_step_ms(engine, n, block, device), cost)
            # PDL off: a kernel launched early would count its wait for the one before it as its own time
            with torch.inference_mode(), restored(engine, n), use_settings(pdl=False):
                parts["step"]["kernels"] = graph_kernels(lambda: engine.greedy_step(n, block, engine.max_len), device)
            gemms, gemm_bytes, gemm_params = weight_gemms(model, n * block)
            with torch.inference_mode():
                parts["gemms"] = floors.timed(graph_ms(gemms, device, 5, 3),
                                              roofline.Cost(gemm_bytes, 2 * n * block * gemm_params))
            if block > 1:
                block_pos = engine.start[:n, None] + engine.offsets[None, :block]
                with torch.inference_mode(), restored(engine, n):
                    verify = target_pass(engine, n, block)
                    parts["verify"] = floors.timed(graph_ms(lambda: model.greedy_tokens(verify()), device, 5, 3),
                                                   roofline.target_pass(model, contexts, block))
                    parts["draft"] = floors.timed(
                        graph_ms(lambda: oracle.inner.propose_greedy(n, block, engine.last_token[:n], block_pos,
                                                                     engine.max_len), device, 5, 3),
                        roofline.draft_pass(floors.draft, model, contexts, block))
            out[str(block)] = parts
    return out


@contextlib.contextmanager
def live_rows(engine: BatchDecoder, prompts: list[list[int]], device: str) -> Iterator[None]:
    """Inside: a row per prompt, prefilled and two steps on, the oracle accepting nothing (so that each replay of a
    step moves a row by one position); after, the rows cancelled and the card's schedules back."""
    oracle: OracleProposer = engine.proposer
    ids = [engine.add(p, SamplingParams(max_new_tokens=64, ignore_eos=True), block_size=oracle.max_block)
           for p in prompts]
    oracle.set_schedule([0])
    try:
        while engine.waiting:
            engine.step()
        engine.step()
        sync(device)
        yield
    finally:
        for seq_id in ids:
            engine.cancel(seq_id)
        oracle.set_schedule(card_schedules(oracle.max_block))


def scored_step_ms(engine: BatchDecoder, n: int, block: int, device: str, rounds: int = 5) -> float:
    """A step of live rows [0, n) as the engine runs one with a row that returns log-probabilities: not pipelined,
    the logits written and read (`logits_step`), timed from the host; the median of `rounds`."""
    times = []
    with torch.inference_mode(), restored(engine, n):
        for _ in range(rounds):
            sync(device)
            started = time.perf_counter()
            engine.logits_step(n, block, {})
            sync(device)
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def sampled_step_ms(engine: BatchDecoder, n: int, block: int, device: str) -> float:
    """The step of live rows [0, n) with every row sampling at temperature 1 (`sampling_step`, mode "sample"),
    captured as a CUDA graph of its own. Acceptance is capped at 0 drafts, so that each replay moves a row by one
    position (the work of a step does not depend on what it accepts)."""
    with torch.inference_mode(), restored(engine, n):
        state, settings = engine.row_state[:, :n].clone(), engine.row_settings[:, :n].clone()
        engine.cap[:n], engine.temperature[:n], engine.top_p[:n] = 0, 1.0, 1.0
        try:
            return graph_ms(lambda: engine.sampling_step(n, block, engine.max_len, "sample"), device, 5, 3)
        finally:
            engine.row_state[:, :n], engine.row_settings[:, :n] = state, settings


def card_schedules(max_block: int) -> dict[int, list[int]]:
    """Each block's accepted drafts per step at the card's tau (a block the card does not list: see OracleProposer)."""
    return {b: tau_schedule(tau) for b, tau in CARD_TAU.items() if b <= max_block}


def graph_check(target: Target, draft: DraftModel, prompts: list[list[int]], blocks: tuple[int, ...], max_len: int,
                device: str, requests: int = 16, new_tokens: int = 48) -> dict:
    """The CUDA-graph path against the same engine run eagerly on the same padded shapes (so the same kernels
    see the same GEMM shapes), with the draft's own tokens: the tokens must be identical, with requests joining
    and leaving, for every block in `blocks` (1: AR), greedy, and (at the largest block) seeded sampling at
    temperature 1, half of the requests with a top-p. The sampled run is under batch_invariant: pipelined, the
    graphed engine admits a joiner a step later, and with the default kernels the padded batch it then runs in
    rounds its logits otherwise, which moves a sampled token now and then where greedy ties stay rare."""
    greedy = [SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)] * requests
    sampled = [SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, temperature=1.0,
                              top_p=0.9 if i % 2 else 1.0, seed=i) for i in range(requests)]
    concurrency = requests // 2
    out = {}
    for name, block, params in [(str(b), b, greedy) for b in blocks] + [(f"sampled {max(blocks)}", max(blocks),
                                                                          sampled)]:
        with use_settings(batch_invariant=params is sampled):
            graphed = BatchDecoder(target, draft, max_batch=concurrency, max_len=max_len)
            eager = BatchDecoder(target, draft, max_batch=concurrency, max_len=max_len, use_graphs=False)
            eager.pad_rows = graphed.pad_rows  # rounded up to the graph sizes on CUDA
            results = [run_workload(d, prompts[:requests], params, concurrency, block, device)["outputs"]
                       for d in (graphed, eager)]
        out[name] = f"{sum(a == b for a, b in zip(*results))}/{len(results[0])}"
    return {"requests": requests, "concurrency": concurrency, "identical": out,
            "ok": all(v == f"{requests}/{requests}" for v in out.values())}


def random_weights(args: argparse.Namespace, name: str, model: TargetModel, draft: DraftModel, blocks: tuple[int, ...],
                   concurrency: tuple[int, ...], bandwidth: float, flop_rate: float,
                   rollback: str = DEFAULT_ROLLBACK) -> dict:
    """A random-weight workload: the checks with the draft's own tokens, then the sweep with oracle acceptance at
    the card's tau per block, and the parts of the step per concurrency (a hybrid target's cache rolling back by
    `rollback`)."""
    device = args.device
    target = Target(model=model, tokenizer=None, name=f"{name}-shaped-random", eos_token_ids=())
    prompt_len, new = (16, 24) if args.tiny else (args.prompt_tokens, args.new_tokens)
    max_len = prompt_len + new + 2 * draft.block_size + 64  # the parts' replays run past the longest request
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, model.config.vocab_size, (prompt_len,), generator=gen).tolist()
               for _ in range(max(16, 2 * max(concurrency)))]
    tiny_check = {"requests": 8, "new_tokens": 16} if args.tiny else {}  # tiny shapes are a logic check
    check = None if args.skip_check else graph_check(target, draft, prompts, (1, max(blocks)), max_len, device,
                                                     **tiny_check)
    print(json.dumps({f"{name} graph_check": check}), flush=True)
    constant_choice(model)
    oracle = OracleProposer(DraftProposer(draft, model), torch.zeros(max_len, dtype=torch.long),
                            card_schedules(draft.block_size), model.config.vocab_size, device)
    engine = BatchDecoder(target, oracle, max_batch=max(concurrency), max_len=max_len, rollback=rollback,
                          max_prefill_tokens=args.max_prefill_tokens)
    started = time.perf_counter()
    graphs = engine.capture_graphs((1, *blocks), modes=("greedy",))
    capture_s = time.perf_counter() - started
    floors = Floors(model, draft, prompt_len + new // 2, bandwidth, flop_rate)
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    cols = columns(blocks, auto=len(blocks) > 1)
    rows = sweep(engine, prompts, params, cols, concurrency, args.repeats, floors, device, name, {}, parts=True)
    return {"check": check, "prompt_tokens": prompt_len, "new_tokens": new, "columns": cols,
            "card_tau": {str(b): t for b, t in CARD_TAU.items() if b in blocks}, "graphs": graphs,
            "capture_s": capture_s, "concurrency": rows}


def qwen3_4b(args: argparse.Namespace, concurrency: tuple[int, ...], bandwidth: float, flop_rate: float) -> dict:
    cfg = qwen3_4b_config(args.tiny)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = TargetModel.random(cfg, device=args.device, dtype=dtype, seed=0)
    draft = make_draft("dflash", cfg, args.device, dtype, args.tiny)
    return random_weights(args, "qwen3_4b", model, draft, tuple(args.blocks or (4, 8, 16)), concurrency, bandwidth,
                          flop_rate)


def qwen35_4b(args: argparse.Namespace, concurrency: tuple[int, ...], bandwidth: float, flop_rate: float) -> dict:
    """The hybrid workload with each of --rollback in turn (the first, the default, is the record's; the others go
    under "by_rollback"), on one target and draft."""
    cfg = qwen35_4b_config(args.tiny)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = TargetModel.random(cfg, device=args.device, dtype=dtype, seed=0, rope_theta=1e7)
    # drafted at block 8 (as SGLang serves it): what the cache keeps for rollback is sized by the block
    blocks = tuple(args.blocks or (8,))
    draft = qwen35_draft(cfg, args.device, dtype, args.tiny, block_size=max(blocks))
    runs = {rollback: {**random_weights(args, "qwen35_4b", model, draft, blocks, concurrency, bandwidth, flop_rate,
                                        rollback), "rollback": rollback, "sglang_c32_speedup": SGLANG_C32_SPEEDUP,
                       "gdn_prefill": gdn_kernels(args.device)}
            for rollback in args.rollback}
    first, *others = runs.values()
    return {**first, "by_rollback": {r["rollback"]: r for r in others}} if others else first


def smollm2(args: argparse.Namespace, concurrency: tuple[int, ...], bandwidth: float, flop_rate: float) -> dict:
    from blockspec.datasets import load_dataset
    from blockspec.draft import load_draft
    from blockspec.shipped import shipped_draft_dir
    from blockspec.target import load_target

    target = load_target(args.smollm2, device=args.device, dtype="auto")
    questions = load_dataset("gsm8k", args.data_dir)[0][:max(4, 2 * max(concurrency))]
    prompts = [target.encode([{"role": "user", "content": s.turns[0]}]) for s in questions]
    new = 24 if args.tiny else 256
    params = SamplingParams(max_new_tokens=new)
    max_len = max(len(p) for p in prompts) + new + 64
    out: dict = {"prompts": f"gsm8k test, first {len(prompts)} questions", "max_new_tokens": new,
                 "dtype": str(target.dtype)}
    ar: dict = {}  # one AR baseline for both drafts
    for kind in args.drafts:
        draft = load_draft(str(shipped_draft_dir(f"smollm2-135m-instruct-{kind}")), device=args.device,
                           dtype=target.dtype)
        engine = BatchDecoder(target, draft, max_batch=max(concurrency), max_len=max_len,
                              max_prefill_tokens=args.max_prefill_tokens)
        cols = columns((4, 8, 16), auto=True)
        engine.capture_graphs(tuple(cols.values()), modes=("greedy",))
        context = statistics.mean(map(len, prompts)) + new // 2
        floors = Floors(target.model, draft, int(context), bandwidth, flop_rate)
        out[kind] = sweep(engine, prompts, params, cols, concurrency, args.repeats, floors, args.device,
                          f"smollm2-{kind}", ar)
        del engine
    return out


WORKLOADS = {"qwen3_4b": (qwen3_4b, CONCURRENCY), "qwen35_4b": (qwen35_4b, CONCURRENCY[:-1]),
             "smollm2": (smollm2, CONCURRENCY)}


def prompt_attention_settings(kernel: str, device: str) -> contextlib.AbstractContextManager:
    """Kernel settings with head dim 128's prompt attention as the device table has it ("table"), on its Triton
    tiles for any number of prompts ("triton"), or on SDPA's cuDNN kernel ("cudnn")."""
    if kernel == "table" or not device.startswith("cuda"):
        return use_settings()
    table = device_tables(torch.device(device)).attention
    tiles = {k: v for k, v in table["prompt_d128"].items() if k != "batch"}
    return use_settings(attention_table={**table, "prompt_d128": tiles if kernel == "triton" else {"sdpa": kernel}})


def run(args: argparse.Namespace) -> dict:
    device = args.device
    bandwidth = copy_bandwidth(device, 0.05 if args.tiny else 2.0)
    flop_rate = matmul_rate(device, 256 if args.tiny else 8192)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s, bf16 matmul {flop_rate / 1e12:.0f} TFLOP/s", flush=True)
    record = {**run_header(args), "command": " ".join(sys.argv), "repeats": args.repeats,
              "copy_bandwidth_GBps": bandwidth / 1e9, "matmul_TFLOPs": flop_rate / 1e12,
              "max_step_tokens": CUDA_MAX_STEP_TOKENS, "python_loop_ms": python_loop_ms()}
    with torch.inference_mode(), prompt_attention_settings(args.prompt_attention, device):
        for name in args.workload:
            build, default = WORKLOADS[name]
            record[name] = build(args, tuple(args.concurrency or default), bandwidth, flop_rate)
    return record


# ---- the report ---------------------------------------------------------------------------------------------
def report(path: str) -> str:
    r = json.loads(Path(path).read_text())
    lines = [f"Device {r['device']}, torch {r['torch']}, commit {r['commit']}, {r['date']}; copy bandwidth "
             f"{r['copy_bandwidth_GBps']:.0f} GB/s, bf16 matmul {r['matmul_TFLOPs']:.0f} TFLOP/s; median of "
             f"{r['repeats']} runs per cell"
             + (f"; the host: a pure-Python loop in {r['python_loop_ms']:.0f} ms" if "python_loop_ms" in r else "")
             + f". Command: `{r['command']}`", "",
             "Each cell: measured tokens/s / the floor's tokens/s (floor over measured), tau; the floor is one decode "
             "step of c rows at the mean context with the block the cell ran, its bytes over the copy bandwidth or "
             "its FLOPs over the matmul rate (C: compute-bound).", ""]
    if "qwen3_4b" in r:
        q = r["qwen3_4b"]
        lines += [f"Qwen3-4B-shaped random bf16 target, 5-layer DFlash, oracle acceptance at the card's tau per block "
                  f"({card_text(q)}), {q['prompt_tokens']}-token prompts, {q['new_tokens']} new tokens; auto: "
                  f"requests of block 16 with max_step_tokens {r['max_step_tokens']}. {check_text(q)}", "",
                  *table(q["concurrency"], q["columns"]), "", *goals_qwen3(q), "", *loop_lines(q["concurrency"]),
                  *parts_table(q["concurrency"])]
    if "qwen35_4b" in r:
        for q in (r["qwen35_4b"], *r["qwen35_4b"].get("by_rollback", {}).values()):
            lines += ["", f"Qwen3.5-4B-shaped random bf16 hybrid target, 6-layer sliding-window draft shape, oracle "
                          f"acceptance at tau {card_text(q)}, {q['prompt_tokens']}-token prompts, "
                          f"{q['new_tokens']} new tokens, rollback by {q.get('rollback', 'states')}; the prefill's "
                          f"Gated DeltaNet on {q.get('gdn_prefill', 'not recorded')}. {check_text(q)}", "",
                      *table(q["concurrency"], q["columns"]), "", *goals_qwen35(q), "", *loop_lines(q["concurrency"]),
                      *parts_table(q["concurrency"])]
    if "smollm2" in r:
        s = r["smollm2"]
        for kind in [k for k in ("dflash", "dflare") if k in s]:
            lines += ["", f"SmolLM2-135M-Instruct ({s['dtype']}), shipped {kind} draft, {s['prompts']}, greedy, up to "
                          f"{s['max_new_tokens']} new tokens (real acceptance; auto: block 16 requests with "
                          f"max_step_tokens {r['max_step_tokens']}):", "",
                      *table(s[kind], {"ar": 1, "b4": 4, "b8": 8, "b16": 16, "auto": 16})]
    return "\n".join(lines)


def card_text(q: dict) -> str:
    return ", ".join(f"block {b}: {t}" for b, t in q["card_tau"].items())


def check_text(q: dict) -> str:
    c = q["check"]
    if c is None:
        return "The graphs-against-eager check was skipped (--skip-check)."
    cases = ", ".join(f"{'AR' if b == '1' else b if b.startswith('sampled') else 'block ' + b} {same}"
                      for b, same in c["identical"].items())
    return (f"CUDA graphs vs the same engine run eagerly on the same shapes ({c['requests']} requests, "
            f"{c['concurrency']} at a time, the draft's own tokens; greedy, and seeded sampling at the largest "
            f"block under batch-invariant kernels): identical {cases}.")


def cell_text(cell: dict) -> str:
    floor, measured = cell["floor"], cell["tokens_per_s"]
    text = f"{measured:.0f} / {floor['tokens_per_s']:.0f} ({floor['tokens_per_s'] / measured:.1f}x"
    text += ", C)" if floor["bound"] == "compute" else ")"
    return text if floor["block"] == 1 else text + f", tau {cell['tau']:.2f}"


def table(rows: dict, cols: dict) -> list[str]:
    names = [n for n in cols if n != "ar"]
    labels = ["auto" if n == "auto" else f"B={cols[n]}" for n in names]
    lines = ["| c | AR | " + " | ".join(f"{label} (its block)" if label == "auto" else label for label in labels)
             + " | best / AR |", "| --- | --- | " + " | ".join("---" for _ in names) + " | --- |"]
    for c, row in rows.items():
        cells = [cell_text(row[n]) + (f" at B={row[n]['floor']['block']}" if n == "auto" else "") for n in names]
        best = max(names, key=lambda n: row[n]["tokens_per_s"])
        speedup = row[best]["tokens_per_s"] / row["ar"]["tokens_per_s"]
        lines.append(f"| {c} | {cell_text(row['ar'])} | " + " | ".join(cells)
                     + f" | {speedup:.2f}x ({labels[names.index(best)]}) |")
    return lines


def loop_lines(rows: dict) -> list[str]:
    """Where each cell's wall time went in its own loop (recorded since 2026-12-06): the engine.step() calls that
    admitted requests (their prefills), and the others (pipelined steps), each as the host timed them."""
    cells = [f"c = {c} {'AR' if name == 'ar' else name}: {cell['loop']['joins']} joins {cell['loop']['join_ms']:.0f} ms"
             f" + steps {cell['loop']['steps_ms']:.0f} ms (median {cell['loop']['step_ms_median']:.2f})"
             for c, row in rows.items() for name, cell in row.items() if isinstance(cell, dict) and "loop" in cell]
    return ["The cells' loops, host-timed: the steps that admitted requests (with their prefills) and the others: "
            + "; ".join(cells) + ".", ""] if cells else []


def over_graphed(rows: dict, key: str) -> str:
    """'c x block: ms (its ratio to the graphed step)' for every cell of the report with the part `key`."""
    return ", ".join(f"{c} x {'AR' if block == '1' else block}: {parts[key]['ms']:.2f} "
                     f"({parts[key]['ms'] / parts['step']['ms']:.1f}x)"
                     for c, row in rows.items() for block, parts in row.get("parts", {}).items() if key in parts)


def parts_table(rows: dict) -> list[str]:
    lines = ["Where a step's time goes: c live rows, each part captured as a CUDA graph of its own and timed alone: "
             "ms (its floor, x floor); weight GEMMs: the target's, alone, on the step's c x block rows.", "",
             "| c | block | whole step | weight GEMMs | verify pass | draft pass |",
             "| --- | --- | --- | --- | --- | --- |"]

    def part(m: dict | None) -> str:
        return f"{m['ms']:.2f} ({m['floor_ms']:.2f}, {m['x_floor']:.2f}x)" if m else ""

    for c, row in rows.items():
        for block, parts in row.get("parts", {}).items():
            lines.append(f"| {c} | {'AR' if block == '1' else block} | {part(parts['step'])} | "
                         f"{part(parts.get('gemms'))} | {part(parts.get('verify'))} | {part(parts.get('draft'))} |")
    joins = (("prefill", "plain decoding"), ("prefill_drafted", "drafted (the draft stores their context too)"))
    for key, label in joins:
        prefills = [f"{c}: {row[key]['ms']:.1f} ({row[key]['ms_per_prompt']:.1f}"
                    + (f"; {row[key]['device_busy_ms']:.1f})" if "device_busy_ms" in row[key] else ")")
                    for c, row in rows.items() if key in row]
        if prefills:
            lines += ["", f"Prefill of c prompts joining at once, {label}, ms (per prompt; the device busy, ms): "
                      + ", ".join(prefills) + "."]
    scored = over_graphed(rows, "step_scored")
    if scored:
        lines += ["", "A step as the engine runs it once a row returns log-probabilities (not pipelined, the logits "
                  "written and read), ms (over the graphed greedy step): " + scored + "."]
    sampled = over_graphed(rows, "step_sampled")
    if sampled:
        lines += ["", "The step with every row sampling (temperature 1; a CUDA graph), ms (over the graphed greedy "
                  "step): " + sampled + "."]
    profiled = [row["prefill"] for row in rows.values() if "kernels" in row.get("prefill", {})]
    if profiled:
        costliest = ", ".join(f"{k['kernel'][:48]} {k['us'] / 1e3:.1f} ms ({k['launches']:.0f})"
                              for k in profiled[-1]["kernels"][:8])
        lines.append(f"Its costliest kernels at c = {profiled[-1]['prompts']}, device time (launches): {costliest}.")
    alone = [row[key] for row in rows.values() for key in ("prefill", "prefill_drafted") if key in row
             and "host_functions" in row[key]]
    for join in alone:
        functions = ", ".join(f"{f['function']} {f['ms']:.1f} ms ({f['calls']})" for f in join["host_functions"][:8])
        lines.append(f"One prompt joining (block {join['block']}), host time by function (cProfile, own): {functions}.")
    return lines


def verdict(value: float, goal: float, at_most: bool) -> str:
    met = value <= goal if at_most else value >= goal
    short = abs(value / goal - 1) * 100
    return "met" if met else f"missed by {short:.0f}%" if short >= 1 else f"missed by {short:.2f}%"


def goals_qwen3(q: dict) -> list[str]:
    rows = q["concurrency"]
    lines = ["Goals (issue 26):"]
    # the step as the cell's loop ran it (its median, over the floor at the cell's mean context), and as a graph of
    # its own timed alone at the prompts' end
    looped = [(c, row["ar"]["loop"]["step_ms_median"] / row["ar"]["floor"]["step_ms"]) for c, row in rows.items()
              if int(c) <= 32 and "loop" in row["ar"]]
    alone = [(c, row["parts"]["1"]["step"]["x_floor"]) for c, row in rows.items() if int(c) <= 32 and "parts" in row]
    measures = [("in the cells' loops (median step)", looped), ("alone (a graph at the prompts' end)", alone)]
    texts = [f"{where} worst {x:.2f}x at c = {c}: {verdict(x, 1.3, at_most=True)}"
             for where, ratios in measures if ratios for c, x in [max(ratios, key=lambda cx: cx[1])]]
    if texts:
        lines.append("- batched AR decode step within 1.3x of its floor at c <= 32: " + "; ".join(texts) + ".")
    spec = [n for n in q["columns"] if n != "ar"]

    def best(row: dict) -> float:
        return max(row[n]["tokens_per_s"] for n in spec) / row["ar"]["tokens_per_s"]

    if "32" in rows:
        lines.append(f"- speculative / AR >= 2.3x at c = 32: {best(rows['32']):.2f}x: "
                     f"{verdict(best(rows['32']), 2.3, at_most=False)}.")
    below = [c for c, row in rows.items() if best(row) <= 1]
    lines.append("- speculative above AR at every c up to 64: "
                 + ("met." if not below else f"missed at c = {', '.join(below)}."))
    return lines


def goals_qwen35(q: dict) -> list[str]:
    rows = q["concurrency"]
    if "b8" not in rows.get("32", {}):
        return []
    speedup = rows["32"]["b8"]["tokens_per_s"] / rows["32"]["ar"]["tokens_per_s"]
    return [f"At c = 32, block 8 over AR: {speedup:.2f}x, beside SGLang's {q['sglang_c32_speedup']}x (B200, the "
            f"model card): {verdict(speedup, q['sglang_c32_speedup'], at_most=False)}."]


def main() -> None:
    parser = parser_with_common_flags(__doc__)
    parser.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=["qwen3_4b"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="default: 1-64 (qwen35_4b: 1-32)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--data-dir", default=None,
                        help="folder holding gsm8k/test.jsonl (default: blockspec.datasets.default_data_dir())")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--blocks", type=int, nargs="+", choices=sorted(CARD_TAU), default=None, help=(
                        "the random workloads' drafted blocks (default 4 8 16; qwen35_4b: 8): fewer, a shorter run"))
    parser.add_argument("--skip-check", action="store_true",
                        help="leave out the graphed-against-eager check before timing (an A/B of two trees)")
    parser.add_argument("--rollback", nargs="+", choices=ROLLBACKS, default=[DEFAULT_ROLLBACK],
                        help="qwen35_4b: how the hybrid cache rolls back, each in turn (default: the engine's)")
    parser.add_argument("--drafts", nargs="+", choices=("dflash", "dflare"), default=["dflash", "dflare"],
                        help="smollm2: the shipped drafts to run, each in turn")
    parser.add_argument("--max-prefill-tokens", type=int, default=MAX_PREFILL_TOKENS,
                        help="padded tokens of one joint prefill (BatchDecoder's max_prefill_tokens)")
    parser.add_argument("--prompt-attention", choices=("table", "triton", "cudnn"), default="table",
                        help="head dim 128's prompt attention: the device table's, its Triton tiles, or SDPA's cuDNN")
    run_and_report(parser, run, report, "batch_throughput")


if __name__ == "__main__":
    main()
