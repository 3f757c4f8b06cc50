"""GenerationStats: the formulas, and the numbers one real generation with a tiny model records."""

from __future__ import annotations

import pytest
import torch

from blockspec.draft import DraftConfig, DraftModel
from benchmarks.oracle import OracleProposer
from blockspec.engine import DraftProposer, GenerationStats, SamplingParams, SpeculativeDecoder
from blockspec.target import target_from_hf
from conftest import seeded_normal

KEYS = {"block_size", "prompt_tokens", "generated_tokens", "acceptance_lengths", "ttft_s", "total_s", "steps",
        "mean_acceptance_length", "acceptance_histogram", "num_draft_tokens", "num_accepted_draft_tokens",
        "tpot_s", "tokens_per_s", "step_blocks", "block_size_counts"}


# ---- formulas -----------------------------------------------------------------------------------------
def test_formulas_on_known_numbers():
    stats = GenerationStats(block_size=4, prompt_tokens=7, generated_tokens=11,
                            acceptance_lengths=[1, 4, 2, 4, 3], ttft_s=0.5, total_s=2.5)
    assert stats.steps == 5
    assert stats.mean_acceptance_length == pytest.approx(14 / 5)
    assert stats.acceptance_histogram == [1, 1, 1, 2]  # index i counts length i+1
    assert stats.num_draft_tokens == 5 * 3
    assert stats.num_accepted_draft_tokens == 0 + 3 + 1 + 3 + 2
    assert stats.tpot_s == pytest.approx((2.5 - 0.5) / 10)
    assert stats.tokens_per_s == pytest.approx(11 / 2.5)


@pytest.mark.parametrize("seed", range(5))
def test_formulas_on_random_lengths(seed):
    gen = torch.Generator().manual_seed(seed)
    block = int(torch.randint(2, 17, (1,), generator=gen))
    lengths = torch.randint(1, block + 1, (int(torch.randint(1, 60, (1,), generator=gen)),), generator=gen).tolist()
    stats = GenerationStats(block_size=block, acceptance_lengths=lengths, generated_tokens=sum(lengths) + 1,
                            ttft_s=0.01, total_s=0.3)
    hist = stats.acceptance_histogram
    assert len(hist) == block and sum(hist) == stats.steps == len(lengths)
    assert all(hist[i] == lengths.count(i + 1) for i in range(block))
    assert stats.mean_acceptance_length == pytest.approx(sum(lengths) / len(lengths))
    assert stats.num_draft_tokens == len(lengths) * (block - 1)
    assert stats.num_accepted_draft_tokens == sum(lengths) - len(lengths)
    assert 0 <= stats.num_accepted_draft_tokens <= stats.num_draft_tokens
    # vLLM-style acceptance rate and tau agree: tau = 1 + accepted / steps
    assert stats.mean_acceptance_length == pytest.approx(1 + stats.num_accepted_draft_tokens / stats.steps)
    assert stats.tpot_s == pytest.approx((0.3 - 0.01) / sum(lengths))


def test_empty_and_degenerate_cases():
    stats = GenerationStats(block_size=8)
    assert stats.steps == 0 and stats.mean_acceptance_length == 0.0
    assert stats.acceptance_histogram == [0] * 8
    assert stats.num_draft_tokens == 0 and stats.num_accepted_draft_tokens == 0
    assert stats.tpot_s == 0.0 and stats.tokens_per_s == 0.0  # no division by zero
    one = GenerationStats(block_size=1, generated_tokens=1, acceptance_lengths=[], ttft_s=0.2, total_s=0.2)
    assert one.tpot_s == 0.0 and one.tokens_per_s == pytest.approx(5.0)
    ar = GenerationStats(block_size=1, generated_tokens=4, acceptance_lengths=[1, 1, 1], ttft_s=0.1, total_s=0.4)
    assert ar.num_draft_tokens == 0 and ar.num_accepted_draft_tokens == 0 and ar.acceptance_histogram == [3]
    assert ar.mean_acceptance_length == 1.0 and ar.tpot_s == pytest.approx(0.1)


def test_to_dict():
    stats = GenerationStats(block_size=3, prompt_tokens=2, generated_tokens=5, acceptance_lengths=[3, 1],
                            ttft_s=0.1, total_s=0.9)
    d = stats.to_dict()
    assert set(d) == KEYS
    for key in KEYS:
        assert d[key] == getattr(stats, key)
    assert d["acceptance_lengths"] == [3, 1] and d["acceptance_lengths"] is not stats.acceptance_lengths
    assert d["acceptance_histogram"] == [1, 0, 1] and d["steps"] == 2
    assert d["block_size_counts"] == {"3": 2} and d["num_draft_tokens"] == 4  # no per-step blocks: the request's
    import json

    assert json.loads(json.dumps(d)) == d  # plain JSON types only


# ---- one real generation ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    vocab = 16
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.copy_(1.0 if name.endswith("norm.weight") else 0.3 * seeded_normal(4, name, param.shape))
    target = target_from_hf(hf)
    dcfg = DraftConfig.create("dflash", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                              num_kv_heads=1, head_dim=16, vocab_size=vocab, num_target_layers=2, block_size=4,
                              mask_token_id=0)
    draft = DraftModel(dcfg).init_weights(seed=1, std=0.3)
    yield target, draft
    torch.set_num_threads(old_threads)


def _check_real(stats: GenerationStats, result, prompt_len: int, block: int, max_new: int) -> None:
    assert stats.block_size == block
    assert stats.prompt_tokens == prompt_len
    assert stats.generated_tokens == len(result.token_ids) == max_new
    assert 0 < stats.ttft_s <= stats.total_s
    assert all(1 <= n <= block for n in stats.acceptance_lengths)
    assert sum(stats.acceptance_histogram) == stats.steps == len(stats.acceptance_lengths)
    # The prefill's first token is not a verify step, so it is not in acceptance_lengths; the last step may
    # commit more tokens than max_new_tokens leaves room for (the overshoot is truncated).
    committed = 1 + sum(stats.acceptance_lengths)
    assert committed >= stats.generated_tokens
    if stats.steps:
        assert committed - stats.acceptance_lengths[-1] < stats.generated_tokens  # the last step was needed
    assert stats.tokens_per_s == pytest.approx(stats.generated_tokens / stats.total_s)
    if stats.generated_tokens > 1:
        assert stats.tpot_s == pytest.approx((stats.total_s - stats.ttft_s) / (stats.generated_tokens - 1))
    assert set(stats.to_dict()) == KEYS


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("max_new", [1, 2, 9, 30])
def test_real_generation_stats(tiny, temperature, max_new):
    target, draft = tiny
    prompt = [3, 1, 4, 1, 5]
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new, seed=0, ignore_eos=True)
    result = SpeculativeDecoder(target, draft).generate(prompt, params)
    _check_real(result.stats, result, len(prompt), 4, max_new)
    assert result.finish_reason == "length"
    ar = SpeculativeDecoder(target, None).generate(prompt, params)
    _check_real(ar.stats, ar, len(prompt), 1, max_new)
    assert ar.stats.steps == max_new - 1 and ar.stats.num_draft_tokens == 0
    assert ar.stats.mean_acceptance_length == (1.0 if max_new > 1 else 0.0)


def test_real_generation_accepts_drafts_sometimes(tiny):
    """A draft that proposes the target's own greedy continuation is always fully accepted: tau == B."""
    target, draft = tiny
    prompt = [3, 1, 4, 1, 5]
    params = SamplingParams(temperature=0.0, max_new_tokens=25, ignore_eos=True)
    reference = SpeculativeDecoder(target, None).generate(prompt, params).token_ids

    oracle = OracleProposer(DraftProposer(draft, target.model), prompt + reference, [draft.block_size - 1],
                            target.model.config.vocab_size, "cpu")
    result = SpeculativeDecoder(target, oracle).generate(prompt, params)
    assert result.token_ids == reference
    stats = result.stats
    _check_real(stats, result, len(prompt), 4, 25)
    assert stats.acceptance_lengths == [4] * stats.steps and stats.steps == 6  # 1 + 6*4 = 25
    assert stats.mean_acceptance_length == 4.0
    assert stats.num_accepted_draft_tokens == stats.num_draft_tokens == 18
    assert stats.acceptance_histogram == [0, 0, 0, 6]


def test_stream_stats_match_chunks(tiny):
    target, draft = tiny
    params = SamplingParams(temperature=1.0, max_new_tokens=20, seed=5, ignore_eos=True)
    chunks = list(SpeculativeDecoder(target, draft).stream([2, 7, 1], params))
    stats = chunks[-1].result.stats
    # every chunk after the first is one verify step; only the last may be truncated
    sizes = [len(c.token_ids) for c in chunks]
    assert sizes[0] == 1 and sum(sizes) == stats.generated_tokens == 20
    assert sizes[1:-1] == stats.acceptance_lengths[:-1]
    assert sizes[-1] <= stats.acceptance_lengths[-1]
