"""Load test of `blockspec serve` (issue 7): N concurrent streaming clients on loopback, every answer checked
against the same request served alone, p50/p99 latency. Bounded in count (--requests) and time (--timeout).

The server runs in this process (uvicorn on 127.0.0.1, a free port) with the given target and draft; the
clients are the official `openai` client in threads (blockspec.bench.load).

    python -m benchmarks.serve_load --out DIR                      # SmolLM2-135M + shipped DFlash, CPU
    python -m benchmarks.serve_load --report FILE.json             # markdown for docs/performance.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path

from benchmarks.harness import write_record
from blockspec.bench.load import LoadRequest, run_load
from blockspec.bench.report import git_commit

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
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--draft", default=None, help="default: the shipped draft for the target")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per request")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--report", default=None)
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    from blockspec.cli_args import load_pair
    from blockspec.hub import DEFAULT_TARGET
    from blockspec.serve.app import create_app

    target_name = args.target or DEFAULT_TARGET
    target, draft, trained = load_pair(target_name, args.draft, args.device, "auto")
    app = create_app(target, draft, served_model_name="model", max_queue=args.requests,
                     max_num_seqs=args.max_num_seqs)
    url, stop = serve_in_thread(app)
    try:
        result = run_load(url, "model", requests_for(args.requests, args.max_tokens), args.concurrency,
                          timeout_s=args.timeout)
    finally:
        stop()
    commit = (git_commit() or "unknown")[:7]
    record = {"target": target_name, "draft": args.draft or ("shipped" if trained else "untrained"),
              "device": args.device, "machine": f"{platform.machine()}, {os.cpu_count()} cores", "commit": commit,
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "max_num_seqs": args.max_num_seqs,
              "max_tokens": args.max_tokens, **result}
    write_record(record, args.out, "serve_load", report)

def report(path: str) -> str:
    r = json.loads(Path(path).read_text())
    s = r["summary"]
    return "\n".join([
        f"{r['target']} + {r['draft']} draft on {r['device']} ({r['machine']}), commit {r['commit']}, {r['date']}, "
        f"`{r['command']}`: {s['requests']} requests (max_tokens {r['max_tokens'] // 4}..{r['max_tokens']}, greedy), "
        f"{s['concurrency']} concurrent streaming clients, server batching {r['max_num_seqs']}.", "",
        "| errors | equal to single-request answers | latency p50 | latency p99 | TTFT p50 | TTFT p99 | "
        "output tok/s under load | mean latency alone |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {s['errors']} | {'all' if s['all_equal_to_single_request'] else 'NOT all: ' + str(s['mismatches'])} | "
        f"{s['latency_p50_s']:.2f} s | {s['latency_p99_s']:.2f} s | {s['ttft_p50_s']:.2f} s | "
        f"{s['ttft_p99_s']:.2f} s | {s['output_tokens_per_s']:.1f} | {s['single_request_mean_latency_s']:.2f} s |"])


if __name__ == "__main__":
    main()
