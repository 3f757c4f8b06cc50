"""Seen vs held-out prompts: tau of a draft on gsm8k train questions (whose target answers it trained on)
against gsm8k test questions (never seen), same settings, one run. A large gap means the draft learned the
training answers better than the kind of text: more distinct prompts, not more steps, is then the lever.

    python -m benchmarks.draft_generalization --prompts 12 --out benchmarks/results     # CPU, fp32
    python -m benchmarks.draft_generalization --report benchmarks/results/draft_generalization-*.json
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks.harness import parser_with_common_flags, run_and_report, run_header
from blockspec.datasets import load_dataset
from blockspec.draft import load_draft
from blockspec.engine import SamplingParams, SpeculativeDecoder
from blockspec.hub import DEFAULT_TARGET
from blockspec.shipped import shipped_draft_dir
from blockspec.target import load_target
from blockspec.train.data import gsm8k_prompts


def run(args) -> dict:
    device = args.device
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    target = load_target(args.target, device=device, dtype=dtype)
    seen = [p.messages for p in gsm8k_prompts(args.prompts)]
    held_out = [[{"role": "user", "content": s.turns[0]}] for s in load_dataset("gsm8k")[0][:args.prompts]]
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    record = {**run_header(args), "dtype": dtype, "target": args.target, "prompts": args.prompts,
              "max_new_tokens": args.max_new_tokens, "rows": []}
    for name in args.drafts.split(","):
        draft = load_draft(shipped_draft_dir(name), device=device, dtype=target.dtype)
        decoder = SpeculativeDecoder(target, draft, max_len=4096)
        row = {"draft": name}
        for label, prompts in (("gsm8k-train", seen), ("gsm8k-test", held_out)):
            taus = [decoder.generate(target.encode(m), params).stats.mean_acceptance_length for m in prompts]
            row[label] = {"tau": statistics.mean(taus), "per_prompt": [round(t, 3) for t in taus]}
            print(name, label, round(row[label]["tau"], 3), flush=True)
        record["rows"].append(row)
    return record


def report(path: str) -> str:
    import json

    r = json.loads(Path(path).read_text())
    lines = [f"Device {r['device']} ({r['dtype']}), torch {r['torch']}, commit {r['commit']}, {r['date']}; "
             f"greedy, {r['max_new_tokens']} new tokens, the first {r['prompts']} questions of each set.", "",
             "| draft | tau, gsm8k train (seen in training) | tau, gsm8k test (held out) | gap |",
             "| --- | --- | --- | --- |"]
    for row in r["rows"]:
        seen, held = row["gsm8k-train"]["tau"], row["gsm8k-test"]["tau"]
        lines.append(f"| {row['draft']} | {seen:.2f} | {held:.2f} | {seen - held:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = parser_with_common_flags(__doc__)
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--drafts", default="smollm2-135m-instruct-dflash,smollm2-135m-instruct-dflare")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    run_and_report(parser, run, report, "draft_generalization")


if __name__ == "__main__":
    main()
