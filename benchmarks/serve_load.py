"""Load test of `blockspec serve` (issues 7 and 26): N concurrent streaming clients on loopback, every answer checked
against the same request served alone; output tokens/s, latency, TTFT and TPOT at p50 and p99. Bounded in count
(--requests) and time (--timeout).

The server runs in this process (uvicorn on 127.0.0.1, a free port) with the given target and draft; the
clients are the official `openai` client in threads (blockspec.bench.load) of another process, so that their
parsing of every chunk does not take the GIL from the server they measure. With --overhead-concurrency C the same
first 2C requests are then served at C clients, and, once the server has stopped, decoded offline by the server's
own engine (its BatchDecoder, the same graphs) with C in flight: the HTTP overhead is how much fewer output
tokens/s the clients saw than the engine makes alone. Beside it, the same 2C requests streamed from threads of the
server's own process: what a load generator sharing the server's GIL costs it.

    python -m benchmarks.serve_load --out DIR                      # SmolLM2-135M + shipped DFlash, CPU
    python -m benchmarks.serve_load --device cuda --requests 128 --concurrency 64 --max-num-seqs 64 \\
        --max-tokens 256 --overhead-concurrency 32 --out DIR       # issue 26's run on a GPU
    python -m benchmarks.serve_load --report FILE.json             # markdown for docs/performance.md
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from benchmarks.harness import write_record
from blockspec.bench.load import LoadRequest, new_client, percentile, run_load, stream_all
from blockspec.bench.report import git_commit
from blockspec.cli_args import add_exact_arg, kernel_settings, load_pair

TOPICS = ("a lighthouse", "the moon", "bread", "a lost key", "rain", "a library", "trains", "a garden")


def requests_for(count: int, max_tokens: int) -> list[LoadRequest]:
    """Distinct prompts with lengths spread over [max_tokens / 4, max_tokens]."""
    return [LoadRequest(f"Write a few sentences about {TOPICS[i % len(TOPICS)]} (note {i}).",
                        max(1, max_tokens // 4 + (i * 37) % (max_tokens - max_tokens // 4 + 1)))
            for i in range(count)]


def serve_in_thread(app) -> tuple[str, callable]:
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="server")
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(30)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}/v1", stop


def client_process() -> ProcessPoolExecutor:
    """One fresh process for the load generator (spawned: a fork of a process with threads and a model is unsafe)."""
    return ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))


def streamed(url: str, requests: list[LoadRequest], concurrency: int, timeout_s: float) -> dict:
    """Output tokens/s of every request streamed at once from `concurrency` client threads (no reference pass)."""
    answers, wall_s = stream_all(new_client(url, timeout_s=timeout_s), "model", requests, concurrency, timeout_s)
    tokens = sum(a.completion_tokens for a in answers if a.error is None)
    return {"errors": sum(a.error is not None for a in answers), "completion_tokens": tokens, "wall_s": wall_s,
            "output_tokens_per_s": tokens / wall_s}


def tpot(load: dict) -> dict:
    """Time per output token after the first, per answer: p50 and p99 over the answers of more than one token."""
    values = [(a["latency_s"] - a["ttft_s"]) / (a["completion_tokens"] - 1) for a in load["answers"]
              if a["error"] is None and a["ttft_s"] and a["completion_tokens"] > 1]
    return {"tpot_p50_s": percentile(values, 50), "tpot_p99_s": percentile(values, 99)} if values else {}


def offline(decoder, target, requests: list[LoadRequest], concurrency: int, device: str) -> dict:
    """The requests decoded by the server's engine directly, `concurrency` in flight: greedy, each its own
    max_tokens, the prompts chat-templated as the server does; twice, the second the figure. A first pass may pay
    one-off costs that the HTTP passes before it paid already (kernels compiled for the joint prefill of all
    `concurrency` prompts, say), which would count against the engine; both passes are recorded."""
    from benchmarks.batch_throughput import run_workload
    from blockspec.engine import SamplingParams

    prompts = [target.encode(r.prompt) for r in requests]
    params = [SamplingParams(max_new_tokens=r.max_tokens, temperature=0.0) for r in requests]
    first, run = (run_workload(decoder, prompts, params, concurrency, None, device) for _ in range(2))
    return {"requests": len(requests), "concurrency": concurrency, "completion_tokens": run["tokens"],
            "wall_s": run["wall_s"], "output_tokens_per_s": run["tokens_per_s"],
            "first_pass_tokens_per_s": first["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--draft", default=None, help="default: the shipped draft for the target")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-step-tokens", type=int, default=None,
                        help="as for `blockspec serve` (default: its default for the device)")
    parser.add_argument("--overhead-concurrency", type=int, default=None,
                        help="also serve the first 2C requests at C clients and decode them offline with the "
                             "server's engine at C in flight: the HTTP overhead")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per request")
    add_exact_arg(parser)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--report", default=None)
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    from blockspec.kernels import use_settings
    from blockspec.hub import DEFAULT_TARGET
    from blockspec.serve.app import create_app
    from blockspec.serve.cli import step_token_budget

    target_name = args.target or DEFAULT_TARGET
    target, draft, trained = load_pair(target_name, args.draft, args.device, "auto")
    step_tokens = step_token_budget(args.max_step_tokens, target.device.type)
    settings = kernel_settings(args.exact, target)
    app = create_app(target, draft, served_model_name="model", max_queue=args.requests,
                     max_num_seqs=args.max_num_seqs, max_step_tokens=step_tokens, kernel_settings=settings)
    requests = requests_for(args.requests, args.max_tokens)
    url, stop = serve_in_thread(app)
    try:
        with client_process() as clients:
            result = clients.submit(run_load, url, "model", requests, args.concurrency,
                                    timeout_s=args.timeout).result()
            result["summary"].update(tpot(result))
            if args.overhead_concurrency:
                c = args.overhead_concurrency
                at_c = clients.submit(run_load, url, "model", requests[:2 * c], c, timeout_s=args.timeout).result()
                # the same clients in threads of this process, sharing the server's GIL: what a load generator
                # beside the server costs it, next to the fair measurement
                result["overhead"] = {"http": {**at_c["summary"], **tpot(at_c)},
                                      "http_clients_in_server_process": streamed(url, requests[:2 * c], c,
                                                                                 args.timeout)}
    finally:
        stop()
    if args.overhead_concurrency:
        overhead = result["overhead"]
        with use_settings(settings):  # the server's kernels, as its worker thread runs them
            overhead["offline"] = offline(app.state.service.worker.decoder, target, requests[:2 * c], c, args.device)
        overhead["http_over_offline"] = (overhead["http"]["output_tokens_per_s"]
                                         / overhead["offline"]["output_tokens_per_s"])
    commit = (git_commit() or "unknown")[:7]
    record = {"target": target_name, "draft": args.draft or ("shipped" if trained else "untrained"),
              "device": args.device, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "commit": commit,
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "max_num_seqs": args.max_num_seqs,
              "max_step_tokens": step_tokens, "max_tokens": args.max_tokens, "exact": args.exact, **result}
    write_record(record, args.out, "serve_load", report)


def report(path: str) -> str:
    r = json.loads(Path(path).read_text())
    s = {**tpot(r), **r["summary"]}  # (runs before TPOT was summarised kept every answer's timings)
    lines = [
        f"{r['target']} + {r['draft']} draft on {r['device']} ({r['machine']}), commit {r['commit']}, {r['date']}, "
        f"`{r['command']}`: {s['requests']} requests (max_tokens {r['max_tokens'] // 4}..{r['max_tokens']}, greedy), "
        f"{s['concurrency']} concurrent streaming clients, server batching {r['max_num_seqs']}"
        + (f", max_step_tokens {r['max_step_tokens']}" if r.get("max_step_tokens") else "")
        + (", batch-invariant kernels (--exact)." if r.get("exact") else "."), "",
        "| clients | errors | equal to single-request answers | output tok/s | latency p50 | latency p99 | TTFT p50 | "
        "TTFT p99 | TPOT p50 | TPOT p99 | mean latency alone |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", load_row(s)]
    if "overhead" in r:
        o, off = r["overhead"], r["overhead"]["offline"]
        lines += [load_row(o["http"]), "", f"HTTP overhead at {off['concurrency']} concurrent requests (the first "
                                           f"{off['requests']}): "
                      f"{o['http']['output_tokens_per_s']:.1f} output tok/s through the server against "
                      f"{off['output_tokens_per_s']:.1f} from its engine offline ({off['completion_tokens']} tokens "
                      f"offline, {o['http']['completion_tokens']} served): {fewer_or_more(o['http_over_offline'])} "
                      f"(goal <= 10% fewer: {'met' if o['http_over_offline'] >= 0.9 else 'missed'})."
                      + (f" Its first offline pass (the figure is the second's): {off['first_pass_tokens_per_s']:.1f} "
                         "tok/s."
                         if "first_pass_tokens_per_s" in off else "")]
        if "http_clients_in_server_process" in o:
            same = o["http_clients_in_server_process"]
            lines[-1] += (f" The same clients in threads of the server's process (sharing its GIL): "
                          f"{same['output_tokens_per_s']:.1f} output tok/s, "
                          f"{fewer_or_more(same['output_tokens_per_s'] / off['output_tokens_per_s'])}.")
    return "\n".join(lines)


def fewer_or_more(ratio: float) -> str:
    """A throughput over its reference, as "N% fewer" or "N% more"."""
    return f"{abs(1 - ratio) * 100:.1f}% {'fewer' if ratio <= 1 else 'more'}"


def load_row(s: dict) -> str:
    def ms(key: str) -> str:
        return f"{s[key] * 1e3:.1f} ms" if key in s else "-"

    equal = "all" if s["all_equal_to_single_request"] else "NOT all: " + str(s["mismatches"])
    return (f"| {s['concurrency']} | {s['errors']} | {equal} | {s['output_tokens_per_s']:.1f} | "
            f"{s['latency_p50_s']:.2f} s | {s['latency_p99_s']:.2f} s | {s['ttft_p50_s']:.2f} s | "
            f"{s['ttft_p99_s']:.2f} s | {ms('tpot_p50_s')} | {ms('tpot_p99_s')} | "
            f"{s['single_request_mean_latency_s']:.2f} s |")


if __name__ == "__main__":
    main()
