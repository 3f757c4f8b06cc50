"""blockspec against llama.cpp on the CPU, on the same GGUF and the same prompt tokens, greedy: tokens/s of
blockspec's plain and speculative decoding (the shipped DFlash) and of llama.cpp's plain decoding, prompt by prompt
in one run (the order alternating), each on as many threads as torch uses.

llama.cpp computes with the GGUF's quantized weights (Q4_1 dot products against 8-bit activations) where blockspec
dequantizes them to fp32, so their answers may part ways after a near-tie: the report counts the prompts on which
llama.cpp's tokens equal blockspec's (blockspec's two paths must agree). llama.cpp runs in a child process of a
Python that has llama-cpp-python (built for this CPU: `python -m venv V && V/bin/pip install
llama-cpp-python==0.3.36`), timed there, from the prompt's tokens to the last new token.

    python -m benchmarks.vs_llamacpp --llama-python V/bin/python --data-dir DIR --out DIR
    python -m benchmarks.vs_llamacpp --report FILE.json
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from benchmarks.harness import parser_with_common_flags, run_and_report, run_header
from blockspec.datasets import load_samples
from blockspec.draft import load_draft
from blockspec.engine import SamplingParams, SpeculativeDecoder
from blockspec.hub import smollm2_gguf_path
from blockspec.shipped import DRAFTS_DIR
from blockspec.target import load_target

PATHS = ("llamacpp_ar", "blockspec_ar", "blockspec_dflash")


# The child, run by a Python with llama-cpp-python (and maybe no torch): load the GGUF (argv: path, threads, context),
# then for each JSON line {"ids", "new_tokens", "eos"} on stdin decode greedily and answer {"tokens", "seconds"}.
LLAMA_CHILD = """
import json, sys, time
import llama_cpp
path, threads, context = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(path, n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)
print(json.dumps({"version": llama_cpp.__version__}), flush=True)
for line in sys.stdin:
    ask = json.loads(line)
    tokens, started = [], time.perf_counter()
    for token in llm.generate(ask["ids"], top_k=1, temp=0.0, reset=True):
        if token in ask["eos"]:
            break
        tokens.append(token)
        if len(tokens) == ask["new_tokens"]:
            break
    print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - started}), flush=True)
"""


def run(args) -> dict:
    if not args.llama_python:
        raise SystemExit("--llama-python: name a Python that has llama-cpp-python (see this module's docstring)")
    torch.manual_seed(0)
    gguf = Path(args.target) if args.target else smollm2_gguf_path()
    target = load_target(str(gguf), device="cpu", dtype="float32")
    draft = load_draft(args.draft, device="cpu", dtype=torch.float32)
    samples, _ = load_samples(args.dataset, args.data_dir, args.max_samples + 1)
    prompts = [target.encode(sample.turns[0]) for sample in samples]
    max_len = max(map(len, prompts)) + args.max_new_tokens + 2 * draft.block_size
    decoders = {"blockspec_ar": SpeculativeDecoder(target, None, max_len=max_len),
                "blockspec_dflash": SpeculativeDecoder(target, draft, max_len=max_len)}
    threads = torch.get_num_threads()
    child = subprocess.Popen([args.llama_python, "-c", LLAMA_CHILD, str(gguf), str(threads), str(max_len)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    version = json.loads(child.stdout.readline())["version"]
    eos = list(target.eos_token_ids)

    def decode(name: str, ids: list[int], new_tokens: int) -> dict:
        if name == "llamacpp_ar":
            child.stdin.write(json.dumps({"ids": ids, "new_tokens": new_tokens, "eos": eos}) + "\n")
            child.stdin.flush()
            return json.loads(child.stdout.readline())
        started = time.perf_counter()
        result = decoders[name].generate(ids, SamplingParams(max_new_tokens=new_tokens, stop_token_ids=eos))
        return {"tokens": result.token_ids, "seconds": time.perf_counter() - started}

    rows = []
    try:
        for name in PATHS:  # warm-up, untimed
            decode(name, prompts[0], min(16, args.max_new_tokens))
        for i, ids in enumerate(prompts[1:]):  # alternate the order, so that a drift in the machine's speed cancels
            order = PATHS if i % 2 == 0 else tuple(reversed(PATHS))
            rows.append({name: decode(name, ids, args.max_new_tokens) for name in order})
            print(json.dumps({name: round(len(r["tokens"]) / r["seconds"], 1) for name, r in rows[-1].items()}),
                  flush=True)
    finally:
        child.stdin.close()
        child.wait(timeout=60)
    return {**run_header(args), "threads": threads, "dataset": args.dataset, "max_new_tokens": args.max_new_tokens,
            "target": gguf.name, "draft": Path(args.draft).name, "llama_cpp_python": version, "prompts": rows}


def report(path: str) -> str:
    record = json.loads(Path(path).read_text())
    rows = record["prompts"]
    agree = sum(row["blockspec_ar"]["tokens"] == row["blockspec_dflash"]["tokens"] for row in rows)
    same_as_llamacpp = sum(row["llamacpp_ar"]["tokens"] == row["blockspec_ar"]["tokens"] for row in rows)

    def median_rate(name: str) -> float:
        return statistics.median(len(row[name]["tokens"]) / row[name]["seconds"] for row in rows)

    base = median_rate("llamacpp_ar")
    lines = [f"Device {record['device']} ({record['threads']} threads), torch {record['torch']}, llama-cpp-python "
             f"{record['llama_cpp_python']}, commit {record['commit']}, {record['date']}; {record['target']} + "
             f"{record['draft']}, {record['dataset']}, {len(rows)} prompts, greedy, up to {record['max_new_tokens']} "
             f"new tokens. blockspec AR = DFlash: {agree}/{len(rows)}; llama.cpp's tokens = blockspec's: "
             f"{same_as_llamacpp}/{len(rows)} (quantized arithmetic there, fp32 here).", "",
             "| path | tok/s (median) | over llama.cpp AR |", "| --- | --- | --- |"]
    for name in PATHS:
        rate = median_rate(name)
        lines.append(f"| {name.replace('_', ' ')} | {rate:.1f} | {rate / base:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = parser_with_common_flags(__doc__)
    parser.set_defaults(device="cpu")
    parser.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python installed")
    parser.add_argument("--target", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct's GGUF)")
    parser.add_argument("--draft", default=str(DRAFTS_DIR / "smollm2-135m-instruct-dflash"))
    parser.add_argument("--dataset", default="gsm8k")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--max-samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    run_and_report(parser, run, report, "vs_llamacpp")


if __name__ == "__main__":
    main()
