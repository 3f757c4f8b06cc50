"""Issue 27's check at the Qwen3-4B shape: with batch-invariant kernels (`--exact`), speculative greedy tokens
equal plain decoding's, and rows decoded together equal each decoded alone, in bf16 on the GPU.

The target has the Qwen3-4B shape with random bf16 weights and an untied lm_head (a tied one makes a random
model repeat its input token; a separate one gives varied output, full of near-ties). The reference is plain
decoding of each of --prompts random prompts alone (--new-tokens tokens, the fast path of a batch of one).
  - Speculative: for DFlash and DFlare drafts (random weights, the real draft pass every step) at blocks 4, 8 and
    16, an oracle proposes the reference's tokens, right for a number of slots that follows the
    Qwen3.5-4B-DFlash card's tau for that block (benchmarks/oracle.py), so verify blocks are accepted to varied
    depths; each prompt's speculative tokens must equal its reference.
  - Batched: at each concurrency c the engine (max_batch c, block 16, the DFlash draft's own tokens) decodes 2c
    of the prompts (at most --prompts) with lengths staggered by 8 tokens, so that rows join and leave mid-run;
    each row must equal the prefix of its reference.
  - Control: the same comparisons under the default kernels for the first --control prompts (DFlash, block 16,
    and c = 8), which shows that the check can fail: without batch-invariant kernels the rows round differently.

    python -m benchmarks.exact_check --out DIR                                  # on a CUDA machine
    python -m benchmarks.exact_check --tiny --device cpu --prompts 3 --new-tokens 16 --concurrency 1 2
    python -m benchmarks.exact_check --report FILE.json                         # markdown
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from benchmarks.harness import make_draft, parser_with_common_flags, qwen3_4b_config, run_and_report, run_header
from benchmarks.oracle import OracleProposer, tau_schedule
from blockspec.engine import BatchDecoder, DraftProposer, SamplingParams, SpeculativeDecoder
from blockspec.kernels import use_settings
from blockspec.target import Target, TargetModel

CARD_TAU = {4: 3.43, 8: 5.30, 16: 6.75}  # Qwen3.5-4B-DFlash's model card, gsm8k


def exact_target(device: str, dtype: torch.dtype, tiny: bool) -> Target:
    cfg = dataclasses.replace(qwen3_4b_config(tiny), tie_word_embeddings=False)
    model = TargetModel.random(cfg, device=device, dtype=dtype, seed=0, std=0.02)
    with torch.no_grad():  # a unit-scale lm_head: logits of a few units, so the greedy choice follows the context
        model.lm_head.weight.normal_(0.0, 1.0, generator=torch.Generator(device=device).manual_seed(1))
    return Target(model=model, tokenizer=None, name="qwen3-4b-shaped-random-untied", eos_token_ids=())


def prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(16, 257, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def plain(target: Target, prompt_set: list[list[int]], new_tokens: int, max_len: int) -> list[list[int]]:
    decoder = SpeculativeDecoder(target, None, max_len=max_len)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return [decoder.generate(p, params).token_ids for p in prompt_set]


def speculative(target: Target, draft: torch.nn.Module, block: int, prompt_set: list[list[int]],
                reference: list[list[int]], max_len: int) -> dict:
    """Each prompt decoded with an oracle that accepts the card's tau of `block`; how many equal the reference."""
    oracle = OracleProposer(DraftProposer(draft, target.model), torch.zeros(max_len, dtype=torch.long),
                            tau_schedule(CARD_TAU[block]), target.model.config.vocab_size, target.device)
    decoder = SpeculativeDecoder(target, oracle, block_size=block, max_len=max_len)
    params = SamplingParams(max_new_tokens=len(reference[0]), ignore_eos=True)
    same, accepted = 0, []
    for prompt, want in zip(prompt_set, reference):
        oracle.set_reference(prompt + want)
        got = decoder.generate(prompt, params)
        same += got.token_ids == want
        accepted += got.stats.acceptance_lengths
    cell = {"identical": same, "of": len(prompt_set), "tau": sum(accepted) / max(len(accepted), 1)}
    print(f"  {draft.config.kind} block {block}: {cell}", flush=True)  # a run cut short still tells
    return cell


def batched(target: Target, draft: torch.nn.Module, c: int, prompt_set: list[list[int]],
            reference: list[list[int]], max_len: int) -> dict:
    """2c prompts (at most all) through an engine of c rows, staggered lengths; how many rows equal the reference."""
    n = min(2 * c, len(prompt_set))
    lengths = [max(1, len(reference[i]) - 8 * (i % 8)) for i in range(n)]
    params = [SamplingParams(max_new_tokens=k, ignore_eos=True) for k in lengths]
    engine = BatchDecoder(target, draft, max_batch=c, max_len=max_len, block_size=16)
    results = engine.generate(prompt_set[:n], params)
    same = sum(r.token_ids == reference[i][:lengths[i]] for i, r in enumerate(results))
    print(f"  batched c = {c}: {same}/{n}", flush=True)
    return {"identical": same, "of": n}


def run(args: argparse.Namespace) -> dict:
    device, tiny = args.device, args.tiny
    dtype = torch.float32 if tiny else torch.bfloat16
    target = exact_target(device, dtype, tiny)
    cfg = target.model.config
    drafts = {kind: make_draft(kind, cfg, device, dtype, tiny) for kind in ("dflash", "dflare")}
    prompt_set = prompts(cfg.vocab_size, args.prompts)
    max_len = max(map(len, prompt_set)) + args.new_tokens + 64
    record: dict = {**run_header(args), "dtype": str(dtype), "tiny": tiny, "prompts": args.prompts,
                    "new_tokens": args.new_tokens}
    start = time.perf_counter()
    for name, exact in (("exact", True), ("default", False)):
        count = args.prompts if exact else min(args.control, args.prompts)
        if count == 0:
            continue
        subset = prompt_set[:count]
        with use_settings(batch_invariant=exact):
            reference = plain(target, subset, args.new_tokens, max_len)
            print(f"{name}: plain decoding of {count} prompts, {time.perf_counter() - start:.0f} s", flush=True)
            blocks = args.blocks if exact else [16]
            kinds = drafts if exact else {"dflash": drafts["dflash"]}
            concurrency = args.concurrency if exact else [c for c in args.concurrency if c == 8] or args.concurrency[:1]
            part = {"distinct_tokens": len({t for r in reference for t in r}),
                    "speculative": {kind: {str(b): speculative(target, d, b, subset, reference, max_len)
                                           for b in blocks} for kind, d in kinds.items()},
                    "batched": {str(c): batched(target, drafts["dflash"], c, subset, reference, max_len)
                                for c in concurrency}}
        record[name] = part
        print(name, json.dumps(part), f"{time.perf_counter() - start:.0f} s", flush=True)
    return record


def report(path: str) -> str:
    r = json.load(open(path))
    lines = [f"Device {r['device']}, torch {r['torch']}, commit {r['commit']}, {r['date']}; {r['dtype']}; "
             f"{r['prompts']} random prompts, {r['new_tokens']} new tokens each. Cells: runs whose tokens equal plain "
             f"decoding's (tau).", ""]
    parts = [(name, r[name]) for name in ("exact", "default") if name in r]
    blocks = sorted({int(b) for _, part in parts for runs in part["speculative"].values() for b in runs})
    lines += ["| kernels | draft | " + " | ".join(f"block {b}" for b in blocks) + " | batched, block 16 (c: rows) |",
              "| --- | --- | " + " | ".join("---" for _ in blocks) + " | --- |"]
    for name, part in parts:
        title = {"exact": "--exact", "default": "default (control)"}[name]
        batched = ", ".join(f"{c}: {cell['identical']}/{cell['of']}" for c, cell in part["batched"].items())
        for i, (kind, runs) in enumerate(part["speculative"].items()):
            cells = [f"{runs[str(b)]['identical']}/{runs[str(b)]['of']} ({runs[str(b)]['tau']:.2f})"
                     if str(b) in runs else "" for b in blocks]
            lines.append(f"| {title} | {kind} | " + " | ".join(cells) + f" | {batched if i == 0 else ''} |")
    lines += ["", "Distinct tokens in plain decoding's outputs: "
              + ", ".join(f"{part['distinct_tokens']} ({name})" for name, part in parts) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = parser_with_common_flags(__doc__)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16], choices=sorted(CARD_TAU))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--control", type=int, default=8, help="prompts of the default-kernel control (0: none)")
    run_and_report(parser, run, report, "exact_check")


if __name__ == "__main__":
    main()
