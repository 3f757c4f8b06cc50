"""Where `blockspec serve`'s time goes beside its engine's (issue 26's HTTP overhead), measured on the CPU.

The target is a random 4-layer Qwen3 (hidden 64, seeded) with SmolLM2's tokenizer and chat template, decoded
greedily without a draft on one intra-op thread: its engine makes thousands of tokens/s at 32 in flight, about
what SmolLM2-135M + DFlash makes on an H100, so the server's work per step and per streamed chunk is as exposed
as it is there, and the text is detokenized by a real 49,152-token BPE. Each round serves the same requests
  - offline: the server's own engine (its BatchDecoder) with `concurrency` in flight, in this thread;
  - http, clients in another process: `concurrency` streaming openai clients in threads of a child process;
  - http, clients in this process: the same clients in threads of the server's process, sharing its GIL;
and records output tokens/s; how the engine thread's wall time splits into running on a core, waiting for one
(the machine's cores are taken) and asleep (for the GIL, for requests, for the device); and the CPU seconds
per 1,000 output tokens of the engine thread, the event loop thread and the clients. The rounds alternate, so
that other load on a shared machine falls on all three alike; the report gives the medians. Linux (/proc).

Here the engine's own compute keeps a core busy, unlike a GPU step, during which the host idles:
--device-wait-ms D makes each step first sleep D ms (GIL released), for the host's side of a GPU server.

    python -m benchmarks.serve_overhead --out DIR
    python -m benchmarks.serve_overhead --device-wait-ms 10 --out DIR
    python -m benchmarks.serve_overhead --report FILE.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.harness import seeded_normal, write_record
from benchmarks.serve_load import client_process, offline, requests_for, serve_in_thread, streamed
from blockspec.bench.report import git_commit
from blockspec.target import Target, target_from_hf

MODES = ("offline", "http, clients in another process", "http, clients in this process")


def tiny_chat_target(seed: int = 0) -> Target:
    """A random 4-layer Qwen3 with SmolLM2's tokenizer; weights at scales whose greedy text is far from constant."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from blockspec.hub import smollm2_gguf_path
    from blockspec.target.loading import gguf_as_hf_dir

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_as_hf_dir(smollm2_gguf_path())))
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         tie_word_embeddings=True, rope_theta=1e6, eos_token_id=tokenizer.eos_token_id)
    hf = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            noise = seeded_normal(seed, name, param.shape)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else
                        noise if "embed_tokens" in name else 0.3 * noise)
    return target_from_hf(hf, tokenizer, name="tiny-qwen3-smollm2-tokenizer")


def wait_like_a_device(decoder: object, seconds: float) -> None:
    """Make every step of `decoder` first sleep `seconds` (GIL released, CPU idle), as a step waits for a GPU."""
    step = decoder.step

    def step_after_the_wait() -> list:
        time.sleep(seconds)
        return step()

    decoder.step = step_after_the_wait


def thread_dir(name: str) -> str:
    (thread,) = [t for t in threading.enumerate() if t.name == name]
    return f"/proc/self/task/{thread.native_id}"


def run_and_wait_s(thread: str) -> tuple[float, float]:
    """Seconds a thread (/proc/self/task/TID) has run on a core, and waited runnable for one (schedstat)."""
    run_ns, wait_ns, _ = Path(thread, "schedstat").read_text().split()
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, every thread included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(run: Callable[[], dict], engine: str, loop: str | None = None, clients_pid: int | None = None) -> dict:
    """`run()`'s result (completion_tokens, wall_s), with what each part spent meanwhile: the engine thread's time
    on a core and waiting for one; with a server, the event loop thread's time on a core and the clients' CPU
    (their process's, or this process's less the engine and loop threads)."""
    engine_before = run_and_wait_s(engine)
    loop_before = run_and_wait_s(loop)[0] if loop else 0.0
    clients_before = process_cpu_s(clients_pid) if clients_pid else 0.0
    result = run()
    engine_run, engine_wait = (after - before for after, before in zip(run_and_wait_s(engine), engine_before))
    result.update(engine_run_s=engine_run, engine_wait_s=engine_wait)
    if loop:
        result["loop_run_s"] = run_and_wait_s(loop)[0] - loop_before
        result["clients_cpu_s"] = process_cpu_s(clients_pid) - clients_before
        if clients_pid == os.getpid():
            result["clients_cpu_s"] -= engine_run + result["loop_run_s"]
    return result


def measure(args: argparse.Namespace) -> list[dict]:
    from blockspec.serve.app import create_app

    target = tiny_chat_target()
    app = create_app(target, None, served_model_name="model", max_queue=args.requests,
                     max_num_seqs=args.concurrency)
    decoder = app.state.service.worker.decoder
    if args.device_wait_ms:
        wait_like_a_device(decoder, args.device_wait_ms / 1e3)
    requests = requests_for(args.requests, args.max_tokens)
    url, stop = serve_in_thread(app)
    rounds = []
    try:
        with client_process() as clients:
            child = clients.submit(os.getpid).result()
            clients.submit(streamed, url, requests[:4], 4, args.timeout).result()  # warm both sides up
            engine, loop = thread_dir("blockspec-generate"), thread_dir("server")
            here = f"/proc/self/task/{threading.get_native_id()}"
            for _ in range(args.rounds):
                # offline while the server idles: its worker thread waits for requests and leaves the engine alone
                rows = {MODES[0]: timed(lambda: offline(decoder, target, requests, args.concurrency, "cpu"), here),
                        MODES[1]: timed(lambda: clients.submit(streamed, url, requests, args.concurrency,
                                                               args.timeout).result(), engine, loop, child),
                        MODES[2]: timed(lambda: streamed(url, requests, args.concurrency, args.timeout), engine,
                                        loop, os.getpid())}
                rounds.append(rows)
                print(json.dumps({m: round(tokens_per_s(r), 1) for m, r in rows.items()}), flush=True)
    finally:
        stop()
    return rounds


def tokens_per_s(run: dict) -> float:
    return run["completion_tokens"] / run["wall_s"]


def summarize(rounds: list[dict]) -> dict:
    """Per mode, medians over the rounds: tokens/s and its ratio to offline's in the same round; the engine
    thread's wall split into on a core / waiting for a core / asleep (for the GIL, a request or the device); and
    CPU seconds per 1,000 output tokens of the engine thread, the event loop thread and the clients."""
    out = {}
    for mode in MODES:
        rows = [r[mode] for r in rounds]
        cell = {"tokens_per_s": statistics.median(tokens_per_s(r) for r in rows),
                "over_offline": statistics.median(tokens_per_s(r[mode]) / tokens_per_s(r[MODES[0]]) for r in rounds),
                "tokens": rows[0]["completion_tokens"], "errors": sum(r.get("errors", 0) for r in rows),
                "engine_on_core": statistics.median(r["engine_run_s"] / r["wall_s"] for r in rows),
                "engine_waiting_for_core": statistics.median(r["engine_wait_s"] / r["wall_s"] for r in rows)}
        for part, key in (("engine", "engine_run_s"), ("loop", "loop_run_s"), ("clients", "clients_cpu_s")):
            if key in rows[0]:
                cell[f"{part}_cpu_s_per_1k"] = statistics.median(r[key] / r["completion_tokens"] * 1000 for r in rows)
        out[mode] = cell
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128, help="requests ask for max_tokens/4..max_tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads of the engine (one: steady timings on a busy machine)")
    parser.add_argument("--device-wait-ms", type=float, default=0,
                        help="every engine step first sleeps this long, GIL released, as it would wait for a GPU: "
                             "the host then has idle time, as an H100's host has idle cores")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed per request")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--report", default=None)
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    torch.set_num_threads(args.torch_threads)
    record = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "commit": (git_commit() or "unknown")[:7],
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "requests": args.requests,
              "concurrency": args.concurrency, "max_tokens": args.max_tokens, "torch_threads": args.torch_threads,
              "device_wait_ms": args.device_wait_ms, "rounds": measure(args)}
    record["summary"] = summarize(record["rounds"])
    write_record(record, args.out, "serve_overhead", report)


def report(path: str) -> str:
    r = json.loads(Path(path).read_text())

    def per_1k(cell: dict, part: str) -> str:
        key = f"{part}_cpu_s_per_1k"
        return f"{cell[key]:.3f}" if key in cell else "-"

    wait = f", each step after a {r['device_wait_ms']:g} ms device wait" if r["device_wait_ms"] else ""
    lines = [f"Tiny random target, SmolLM2 tokenizer, plain greedy decoding on the CPU ({r['machine']}, "
             f"{r['torch_threads']} intra-op thread{wait}), commit {r['commit']}, {r['date']}: {r['requests']} "
             f"requests (max_tokens {r['max_tokens'] // 4}..{r['max_tokens']}) at {r['concurrency']} in flight, "
             f"median of {len(r['rounds'])} alternating rounds (`{r['command']}`).", "",
             "| run | output tok/s | of offline | tokens | errors | engine thread on a core / waiting for one "
             "| CPU s per 1k tokens: engine thread | event loop | clients |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, cell in r["summary"].items():
        lines.append(f"| {mode} | {cell['tokens_per_s']:.0f} | {cell['over_offline']:.2f} | {cell['tokens']} | "
                     f"{cell['errors']} | {cell['engine_on_core']:.0%} / {cell['engine_waiting_for_core']:.0%} | "
                     f"{per_1k(cell, 'engine')} | {per_1k(cell, 'loop')} | {per_1k(cell, 'clients')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
