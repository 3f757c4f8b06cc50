"""The head-to-head with transformers' native DFlash `generate` (benchmarks/vs_transformers.py) compares equal work:
its assistant, holding a blockspec draft's weights, computes what blockspec's draft computes, and on a tiny target
all four paths (plain and DFlash, each side) give the target's own greedy tokens."""

from __future__ import annotations

import pytest
import torch

from benchmarks.vs_transformers import PATHS, learned_mask, run_prompt, transformers_assistant
from blockspec.engine import SpeculativeDecoder
from conftest import build_draft


@pytest.mark.parametrize("mask_embedding", [False, True], ids=["mask-token", "learned-mask"])
def test_transformers_assistant_computes_the_blockspec_draft(zoo, mask_embedding):
    """One draft pass over a context of tapped features and a block [token, mask x 7] at the positions after it:
    transformers' assistant's final hidden states equal blockspec's draft's (fp32)."""
    tiny = zoo.target("qwen3")
    draft = build_draft(tiny.config, "dflash", seed=3, num_layers=2, block_size=8, mask_embedding=mask_embedding,
                        target_layer_ids=[0, 2, 4])
    assistant = transformers_assistant(draft)
    generator = torch.Generator().manual_seed(5)
    context, block = 11, draft.block_size
    features = torch.randn(1, context, 3 * tiny.config.hidden_size, generator=generator)
    embeds = draft.embed_block(torch.tensor([7]), tiny.target.model.embed_tokens)
    ctx_positions, block_positions = torch.arange(context)[None], context + torch.arange(block)[None]
    with torch.no_grad():
        want = draft(embeds, block_positions, features, ctx_positions, draft.new_cache(1, 64))
        got = assistant(noise_embeds=embeds, context_hidden_states=features,
                        position_ids=torch.arange(context + block)[None]).last_hidden_state
    assert want.abs().amax() > 0.1  # real values
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_every_path_of_the_head_to_head_gives_the_targets_greedy_tokens(zoo):
    """run_prompt on a tiny target with a random draft (a learned mask embedding, as the shipped drafts have): the four
    outputs equal plain greedy decoding, stop ids honoured; each DFlash path counts its prefill and its verifies."""
    tiny = zoo.target("qwen3")
    draft = build_draft(tiny.config, "dflash", seed=4, num_layers=2, block_size=8, mask_embedding=True)
    assistant = transformers_assistant(draft)
    prompt = [(5 * i + 3) % tiny.config.vocab_size for i in range(9)]
    want = zoo.ar("qwen3", prompt, 24)
    stop = want[17]
    expected = want[:want.index(stop) + 1]
    with learned_mask(draft):
        rows = run_prompt(prompt, tiny.hf, assistant, SpeculativeDecoder(tiny.target, None),
                          SpeculativeDecoder(tiny.target, draft), [stop], 24)
    assert set(rows) == set(PATHS)
    for name, row in rows.items():
        assert row["tokens"] == expected, name
        assert row["seconds"] > 0 and 2 <= row["forwards"] <= len(expected), name
    assert rows["transformers_ar"]["forwards"] == rows["blockspec_ar"]["forwards"] == len(expected)
