"""Every supported target family runs through blockspec's own forward exactly as transformers runs it."""

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from blockspec.draft import new_draft_for_target
from blockspec.engine import SamplingParams, SpeculativeDecoder
from blockspec.target import target_from_hf
from conftest import seeded_normal

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig(**SHAPE, attention_bias=True)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SHAPE)),  # q/k/v biases, no o bias
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**SHAPE, head_dim=16)),  # q/k norms
    # a window shorter than the prompt, so the sliding mask really cuts
    "mistral": (MistralForCausalLM, MistralConfig(**SHAPE, sliding_window=12)),
}


def build(family: str):
    cls, config = FAMILIES[family]
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = seeded_normal(0, name, p.shape)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.25 * noise)
            else:
                p.copy_(noise * (0.3 if "embed" not in name else 1.0))
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family):
    hf = build(family)
    target = target_from_hf(hf)
    if family == "qwen2":
        assert target.model.layers[0].self_attn.qkv_proj.bias is not None
        assert target.model.layers[0].self_attn.o_proj.bias is None
    if family == "mistral":
        assert target.model.layers[0].window == 12
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        expected = hf(ids).logits
    cache = target.model.new_cache(1, 64)
    with torch.inference_mode():
        hidden, _ = target.model(ids, torch.arange(30)[None], cache)
        got = target.model.logits(hidden)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_speculative_greedy_equals_transformers_greedy(family):
    hf = build(family)
    target = target_from_hf(hf)
    draft = new_draft_for_target(target.model.config, "dflare", num_layers=2, block_size=4, seed=3)
    prompt = torch.randint(0, 300, (20,)).tolist()
    result = SpeculativeDecoder(target, draft).generate(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True))
    with torch.no_grad():
        reference = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, min_new_tokens=24)
    assert result.token_ids == reference[0, 20:].tolist()
    assert len(set(result.token_ids)) > 3  # not a degenerate constant output
