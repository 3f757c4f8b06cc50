"""Log-probabilities: each committed token's under the target's own distribution at its position, and the top k
there, from the engine (greedy and sampled, alone and in a batch, with drafts accepted several per step)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.oracle import OracleProposer
from blockspec.engine import BatchDecoder, DraftProposer, SamplingParams, SpeculativeDecoder
from blockspec.errors import BlockspecError


def reference_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax of the target's logits at the positions that chose `tokens` (one plain forward)."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        hidden, _ = model(ids, torch.arange(ids.shape[1])[None], model.new_cache(1, ids.shape[1]))
        logp = torch.log_softmax(model.logits(hidden[0]).float(), -1)
    return logp[len(prompt) - 1:len(prompt) - 1 + len(tokens)]


def check(model, prompt, result, top: int) -> None:
    expected = reference_logprobs(model, prompt, result.token_ids)
    assert [lp.token_id for lp in result.logprobs] == result.token_ids
    for lp, row, token in zip(result.logprobs, expected, result.token_ids):
        assert lp.logprob == pytest.approx(float(row[token]), abs=1e-4)
        best = row.topk(top)
        assert [t for t, _ in lp.top] == best.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(best.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_match_the_targets_log_softmax(zoo, temperature):
    tiny = zoo.target("qwen3")
    model = tiny.target.model
    prompt = [5, 9, 2, 7]
    params = SamplingParams(max_new_tokens=30, temperature=temperature, seed=3, ignore_eos=True, logprobs=4)
    # an oracle proposing the target's own greedy continuation: whole blocks accepted, several tokens a step
    continuation = zoo.ar("qwen3", prompt, 60)
    oracle = OracleProposer(DraftProposer(zoo.draft("qwen3", "dflash", block_size=8), model),
                            prompt + continuation, [7, 2, 0], tiny.config.vocab_size, "cpu")
    for draft in (zoo.draft("qwen3", "dflash", block_size=8), oracle if temperature == 0 else None):
        result = SpeculativeDecoder(tiny.target, draft).generate(prompt, params)
        assert len(result.logprobs) == len(result.token_ids) == 30
        check(model, prompt, result, 4)
        if draft is oracle:
            assert result.token_ids == continuation[:30] and max(result.stats.acceptance_lengths) == 8


def test_logprobs_in_a_batch_and_streamed_chunks_line_up(zoo):
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", "dflare", block_size=8)
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6], [5]]
    params = [SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=2),
              SamplingParams(max_new_tokens=9, ignore_eos=True),  # no logprobs: a greedy row beside them
              SamplingParams(max_new_tokens=15, temperature=1.0, seed=1, ignore_eos=True, logprobs=0)]
    decoder = BatchDecoder(tiny.target, draft, max_batch=3, max_len=64)
    ids = [decoder.add(p, q) for p, q in zip(prompts, params)]
    streamed, results = {i: [] for i in ids}, {}
    while decoder.has_work:
        for seq_id, chunk in decoder.step():
            if chunk.logprobs is not None:
                assert len(chunk.logprobs) == len(chunk.token_ids)
                streamed[seq_id] += chunk.logprobs
            if chunk.result is not None:
                results[seq_id] = chunk.result
    assert results[ids[1]].logprobs is None and not streamed[ids[1]]
    for seq_id, prompt, top in ((ids[0], prompts[0], 2), (ids[2], prompts[2], 0)):
        assert streamed[seq_id] == results[seq_id].logprobs
        check(tiny.target.model, prompt, results[seq_id], top)
    alone = SpeculativeDecoder(tiny.target, draft).generate(prompts[1], params[1])
    assert results[ids[1]].token_ids == alone.token_ids


@pytest.mark.parametrize("value", [-1, 21, 2.5])
def test_logprobs_out_of_range_is_a_user_error(value):
    with pytest.raises(BlockspecError, match="logprobs must be an integer in 0..20"):
        SamplingParams(logprobs=value).validate()
