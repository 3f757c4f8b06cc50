"""blockspec against transformers' native DFlash `generate` on the same target and the same draft weights, in one
process, greedy: tokens/s of plain and speculative decoding on each side (the order alternating from prompt to
prompt), the tokens each verify commits, and whether all four outputs agree (each must be the target's own greedy
continuation).

transformers (5.25 and later) drafts with `generate(..., assistant_model=A, speculation_type="dflash")`, where A is its
DFlash-style assistant (`MuseGlimmerAssistantModel`: the taps' fc and norm, then layers whose keys and values see
the context and the block, bidirectionally). `transformers_assistant` loads a blockspec draft's weights into one, under
the published names; `test_vs_transformers.py` checks that it computes what blockspec's draft computes. The shipped
drafts learn their mask embedding instead of borrowing a vocabulary token's (dflash_config.mask_token_id null), so
transformers' block embedding gets that vector in its mask slots (`learned_mask`, a wrapper of one method).

    python -m benchmarks.vs_transformers --data-dir DIR --out DIR      # SmolLM2-135M + the shipped DFlash, CPU
    python -m benchmarks.vs_transformers --device cuda --target PATH.gguf --dtype bfloat16 --data-dir DIR --out DIR
    python -m benchmarks.vs_transformers --report FILE.json
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Iterator

import torch

from benchmarks.harness import parser_with_common_flags, run_and_report, run_header
from blockspec.datasets import load_samples
from blockspec.draft import MASK_EMBEDDING, DraftModel, load_draft
from blockspec.engine import SamplingParams, SpeculativeDecoder
from blockspec.hub import smollm2_gguf_path
from blockspec.layers import rope_parameters
from blockspec.shipped import DRAFTS_DIR
from blockspec.target import Target, target_from_hf
from blockspec.target.loading import gguf_as_hf_dir

PATHS = ("transformers_ar", "transformers_dflash", "blockspec_ar", "blockspec_dflash")


def transformers_assistant(draft: DraftModel) -> torch.nn.Module:
    """transformers' DFlash assistant holding `draft`'s weights: a DFlash draft (fc over the taps) whose layers attend
    bidirectionally inside the block, as transformers' do (a causal sliding layer has no counterpart there)."""
    from transformers import MuseGlimmerAssistantConfig, MuseGlimmerAssistantModel

    c = draft.config
    if c.kind != "dflash":
        raise ValueError(f"transformers' assistant is DFlash's architecture, not {c.kind}'s")
    causal = [i for i in range(c.num_layers) if c.layer_attention(i)[0]]
    if causal:  # transformers' assistant attends bidirectionally inside the block
        raise ValueError(f"draft layer {causal[0]} is causal inside the block; transformers' assistant is not")
    positions = c.raw.get("max_position_embeddings", 4096)
    config = MuseGlimmerAssistantConfig(
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=rope_parameters(c.raw),
        max_position_embeddings=positions, sliding_window=c.sliding_window or positions,  # an int, read if sliding
        layer_types=c.layer_types, block_size=c.block_size,
        mask_token_id=c.mask_token_id if c.mask_token_id is not None else 0,
        target_layer_ids=c.target_layer_ids, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    state = {name: tensor for name, tensor in draft.state_dict().items() if name != MASK_EMBEDDING}
    state["encoder.fc.weight"] = state.pop("fc.weight")
    state["encoder.output_norm_enc.weight"] = state.pop("hidden_norm.weight")
    assistant = MuseGlimmerAssistantModel(config)
    missing, unexpected = assistant.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the draft's weights and transformers' assistant differ: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    weight = draft.norm.weight
    return assistant.to(weight.device, weight.dtype).eval()


@contextlib.contextmanager
def learned_mask(draft: DraftModel) -> Iterator[None]:
    """While inside, transformers' DFlash block embeddings take `draft`'s learned mask embedding in their mask slots
    (slots 1..), where the draft has one; as they are otherwise."""
    from transformers.generation.candidate_generator import DFlashTokenCandidateGenerator as Generator

    if draft.mask_embedding is None:
        yield
        return
    embed = Generator._get_noise_embeds

    def with_learned_mask(self: Generator, noise_ids: torch.Tensor) -> torch.Tensor:
        embeds = embed(self, noise_ids)
        embeds[:, 1:] = draft.mask_embedding.to(embeds.dtype)
        return embeds

    Generator._get_noise_embeds = with_learned_mask
    try:
        yield
    finally:
        Generator._get_noise_embeds = embed


def counting_calls(module: torch.nn.Module) -> tuple[list[int], object]:
    """A counter of `module`'s forward calls (a one-element list) and the hook's handle."""
    calls = [0]
    handle = module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


def run_prompt(ids: list[int], hf: torch.nn.Module, assistant: torch.nn.Module, blockspec_ar: SpeculativeDecoder,
               blockspec_dflash: SpeculativeDecoder, eos: list[int], new_tokens: int, reverse: bool = False) -> dict:
    """Each path once on one prompt (in PATHS' order, or reversed): its tokens, seconds and target forwards (prefill +
    verifies)."""
    params = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=eos)
    prompt = torch.tensor([ids], device=hf.device)
    out: dict = {}
    calls, handle = counting_calls(hf)
    try:
        for name in reversed(PATHS) if reverse else PATHS:
            calls[0] = 0
            started = time.perf_counter()
            with torch.inference_mode():
                if name.startswith("transformers"):
                    extra = dict(assistant_model=assistant, speculation_type="dflash") if "dflash" in name else {}
                    tokens = hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos,
                                         pad_token_id=eos[0], **extra)[0, len(ids):].tolist()
                    forwards = calls[0]
                else:
                    result = (blockspec_dflash if "dflash" in name else blockspec_ar).generate(ids, params)
                    tokens, forwards = result.token_ids, 1 + len(result.stats.acceptance_lengths)
            out[name] = {"tokens": tokens, "seconds": time.perf_counter() - started, "forwards": forwards}
    finally:
        handle.remove()
    return out


def run(args) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    source = Path(args.target) if args.target else smollm2_gguf_path()
    folder = gguf_as_hf_dir(source) if source.suffix == ".gguf" else source
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
    target: Target = target_from_hf(hf, tokenizer, name=source.name)  # shares hf's weights
    draft = load_draft(args.draft, device=args.device, dtype=dtype)
    assistant = transformers_assistant(draft)
    generation_eos = hf.generation_config.eos_token_id
    eos = list(dict.fromkeys([*target.eos_token_ids,
                              *([generation_eos] if isinstance(generation_eos, int) else generation_eos or [])]))
    samples, _ = load_samples(args.dataset, args.data_dir, args.max_samples + 1)
    prompts = [target.encode(sample.turns[0]) for sample in samples]
    # one cache row long enough for every prompt: a decoder that grew it mid-run would build (and on CUDA capture)
    # its engine again inside a timed prompt
    max_len = max(map(len, prompts)) + args.max_new_tokens + 2 * draft.block_size
    decoders = (SpeculativeDecoder(target, None, max_len=max_len), SpeculativeDecoder(target, draft, max_len=max_len))
    rows = []
    with learned_mask(draft):
        run_prompt(prompts[0], hf, assistant, *decoders, eos, min(16, args.max_new_tokens))  # warm-up, untimed
        for i, ids in enumerate(prompts[1:]):  # alternate the order, so that a drift in the machine's speed cancels
            rows.append(run_prompt(ids, hf, assistant, *decoders, eos, args.max_new_tokens, reverse=i % 2 == 1))
            print(json.dumps({name: round(len(r["tokens"]) / r["seconds"], 1) for name, r in rows[-1].items()}),
                  flush=True)
    return {**run_header(args), "threads": torch.get_num_threads(), "dtype": args.dtype, "dataset": args.dataset,
            "max_new_tokens": args.max_new_tokens, "target": folder.name, "draft": Path(args.draft).name,
            "transformers": transformers.__version__, "prompts": rows}


def report(path: str) -> str:
    record = json.loads(Path(path).read_text())
    rows = record["prompts"]
    identical = sum(len({tuple(row[name]["tokens"]) for name in PATHS}) == 1 for row in rows)

    def median_rate(name: str) -> float:
        return statistics.median(len(row[name]["tokens"]) / row[name]["seconds"] for row in rows)

    def per_verify(name: str) -> float:  # tokens a verify commits (the prefill gives the first)
        return sum(len(row[name]["tokens"]) - 1 for row in rows) / sum(row[name]["forwards"] - 1 for row in rows)

    base = median_rate("transformers_ar")
    lines = [f"Device {record['device']} ({record['threads']} threads), torch {record['torch']}, transformers "
             f"{record['transformers']}, commit {record['commit']}, {record['date']}; {record['target']} + "
             f"{record['draft']}, {record['dataset']}, {len(rows)} prompts, greedy, up to {record['max_new_tokens']} "
             f"new tokens, {record.get('dtype', 'float32')}. All four outputs identical: {identical}/{len(rows)}.", "",
             "| path | tok/s (median) | tokens a verify commits | over transformers AR |",
             "| --- | --- | --- | --- |"]
    for name in PATHS:
        rate = median_rate(name)
        lines.append(f"| {name.replace('_', ' ')} | {rate:.1f} | {per_verify(name):.2f} | {rate / base:.2f}x |")
    lines += ["", f"blockspec over transformers: AR {median_rate('blockspec_ar') / base:.2f}x, DFlash "
                  f"{median_rate('blockspec_dflash') / median_rate('transformers_dflash'):.2f}x."]
    return "\n".join(lines)


def main() -> None:
    parser = parser_with_common_flags(__doc__)
    parser.set_defaults(device="cpu")
    parser.add_argument("--target", default=None,
                        help="an HF model folder or a .gguf file (default: SmolLM2-135M-Instruct's GGUF)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="both sides' weights (in bfloat16 a verify and a plain token may round apart)")
    parser.add_argument("--draft", default=str(DRAFTS_DIR / "smollm2-135m-instruct-dflash"))
    parser.add_argument("--dataset", default="gsm8k")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--max-samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    run_and_report(parser, run, report, "vs_transformers")


if __name__ == "__main__":
    main()
