"""Run the benchmark: every prompt decoded plainly (block size 1) and speculatively (block size B) in the same
process, after a warm-up that is excluded from timing; prompts sharded across `torchrun` ranks.

Multi-turn sets (mt-bench, spec-bench) are conversations: before each user turn, each run appends ITS OWN
previous answer as the assistant turn (the AR run its AR answers, the speculative run its speculative ones;
under greedy decoding they coincide). Every turn is one response with its own record.

Sharding: with WORLD_SIZE > 1 (torchrun), rank r takes the samples whose global index i (over the requested
datasets, in order) has i % WORLD_SIZE == r; the records are gathered to every rank with all_gather_object
and sorted by (dataset order, index), so the records of a 2-process run equal those of a 1-process run apart
from the timing fields.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from blockspec.bench.metrics import answers_match, extract_answer
from blockspec.datasets import Sample
from blockspec.draft import DraftModel
from blockspec.engine import SamplingParams, SpeculativeDecoder
from blockspec.target import Target


@dataclass
class BenchSettings:
    max_new_tokens: int = 2048
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    enable_thinking: bool = False
    warmup_tokens: int = 64  # the warm-up decodes min(this, max_new_tokens) tokens per mode
    prompt_warmup: bool = True  # an untimed prefill of every prompt before its timed decode (see run_sample)

    def params(self, seed: int | None = None, max_new_tokens: int | None = None) -> SamplingParams:
        return SamplingParams(max_new_tokens=max_new_tokens or self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, seed=seed).validate()

    def to_dict(self) -> dict:
        return asdict(self)


def turn_seed(base: int, sample: Sample, turn: int) -> int:
    """A sampling seed per (sample, turn), independent of the sharding; the same for both runs."""
    return (base * 1_000_003 + zlib.crc32(f"{sample.dataset}/{sample.index}/{turn}".encode())) % 2**63


def _run_record(result, prompt_tokens: int) -> dict:
    s = result.stats
    return {
        "prompt_tokens": prompt_tokens,
        "generated_tokens": s.generated_tokens,
        "finish_reason": result.finish_reason,
        "steps": s.steps,
        "acceptance_lengths": list(s.acceptance_lengths),
        "tau": s.mean_acceptance_length,
        "ttft_s": s.ttft_s,
        "tpot_s": s.tpot_s if s.generated_tokens > 1 else None,
        "tokens_per_s": s.tokens_per_s,
        "total_s": s.total_s,
        "text": result.text,
        "token_ids": list(result.token_ids),
    }


def run_sample(decoder: SpeculativeDecoder, target: Target, sample: Sample, settings: BenchSettings, block_size: int,
               graded: bool) -> dict:
    """One sample: every turn decoded with block size 1 and with `block_size`, each run fed its own answers.

    With `settings.prompt_warmup`, each timed decode is preceded by an untimed prefill of the same prompt in
    the same mode (a generation of one token): one-time costs that depend on the prompt length (Triton kernels
    specialise, and compile, per shape class on their first call) then fall in neither run, instead of
    landing in the TTFT of whichever run comes first. The timed runs still do their whole prefill.
    """
    histories: dict[str, list[dict]] = {"ar": [], "spec": []}
    turns = []
    for t, user in enumerate(sample.turns):
        seed = turn_seed(settings.seed, sample, t) if settings.temperature > 0 else None
        turn: dict = {"turn": t}
        for mode, block in (("ar", 1), ("spec", block_size)):
            messages = histories[mode]
            messages.append({"role": "user", "content": user})
            prompt_ids = target.encode(messages, chat=True, enable_thinking=settings.enable_thinking)
            if settings.prompt_warmup:
                decoder.generate(prompt_ids, settings.params(seed, max_new_tokens=1), block_size=block)
            result = decoder.generate(prompt_ids, settings.params(seed), block_size=block)
            messages.append({"role": "assistant", "content": result.text})
            run = _run_record(result, len(prompt_ids))
            if graded and sample.reference is not None:
                run["answer"] = extract_answer(result.text)
                run["correct"] = answers_match(run["answer"], sample.reference)
            turn[mode] = run
        turn["outputs_equal"] = turn["ar"]["token_ids"] == turn["spec"]["token_ids"]
        turns.append(turn)
    return {"dataset": sample.dataset, "index": sample.index, "id": sample.id, "category": sample.category,
            "reference": sample.reference, "user_turns": list(sample.turns), "turns": turns}


def warm_up(decoder: SpeculativeDecoder, target: Target, sample: Sample, settings: BenchSettings,
            block_size: int) -> dict:
    """Decode the first turn of `sample` once per mode, untimed (kernels, allocator, CUDA graphs)."""
    n = min(settings.warmup_tokens, settings.max_new_tokens)
    prompt_ids = target.encode([{"role": "user", "content": sample.turns[0]}], chat=True,
                               enable_thinking=settings.enable_thinking)
    for block in (1, block_size):
        decoder.generate(prompt_ids, settings.params(seed=settings.seed, max_new_tokens=n), block_size=block)
    if torch.cuda.is_available() and target.device.type == "cuda":
        torch.cuda.synchronize(target.device)
    return {"dataset": sample.dataset, "index": sample.index, "max_new_tokens": n}


def run_samples(decoder: SpeculativeDecoder, target: Target, samples: list[Sample], settings: BenchSettings,
                block_size: int, graded: set[str], on_done: Callable[[dict], None] | None = None) -> list[dict]:
    """Records of `samples` in order (the warm-up is the caller's)."""
    records = []
    for sample in samples:
        record = run_sample(decoder, target, sample, settings, block_size, sample.dataset in graded)
        records.append(record)
        if on_done is not None:
            on_done(record)
    return records


# ---- decoder choice -----------------------------------------------------------------------------------------
def static_cache_len(target: Target, samples: list[Sample], settings: BenchSettings, block_size: int) -> int:
    """A bound on the positions any conversation of `samples` needs (a fixed cache row for the CUDA graphs).

    Each turn's prompt is at most the turns so far plus the previous answers (<= max_new_tokens each, with a
    margin for re-tokenizing their text and the template), then the answer and one block of overshoot.
    """
    need = 0
    for sample in samples:
        turns = sum(len(target.encode([{"role": "user", "content": u}], chat=True,
                                      enable_thinking=settings.enable_thinking)) for u in sample.turns)
        answers = len(sample.turns) * (settings.max_new_tokens + settings.max_new_tokens // 16 + 16)
        need = max(need, turns + answers + 2 * block_size + 16)
    return -(-need // 128) * 128


def build_decoder(target: Target, draft: DraftModel, block_size: int | None, settings: BenchSettings,
                  samples: list[Sample]) -> tuple[SpeculativeDecoder, int]:
    """The decoder and its block size. On CUDA its cache row is sized once for every sample, so that the greedy
    steps' CUDA graphs are captured once; elsewhere the row grows as requests need."""
    decoder = SpeculativeDecoder(target, draft, block_size)
    if target.device.type == "cuda":
        decoder.max_len = static_cache_len(target, samples, settings, decoder.block_size)
    return decoder, decoder.block_size


def sort_records(records: list[dict], datasets: list[str]) -> list[dict]:
    order = {name: i for i, name in enumerate(datasets)}
    return sorted(records, key=lambda r: (order[r["dataset"]], r["index"]))
