"""Hybrid targets (Qwen3.5: Gated DeltaNet + gated attention) against transformers' Qwen3_5ForCausalLM, and the
rollback of their recurrent state after a verify.

Tiny random configs, every weight drawn from a seeded generator -- zero-centred norms, A_log and dt_bias included
(their library inits, zeros and ones, would hide a missing `1 +` or a wrong decay). fp32 on the CPU.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from blockspec.draft import DraftConfig, DraftModel
from blockspec.engine import BatchDecoder, SamplingParams, SpeculativeDecoder
from blockspec.errors import BlockspecError
from blockspec.target import load_target, target_from_hf
from conftest import build_draft
from test_lossless import PATTERNS, OracleDecoder

# Qwen3.5's pattern (every 4th layer attends), shortened: two attention layers, the last one at the end
LAYER_TYPES = ["linear_attention"] * 2 + ["full_attention"] + ["linear_attention"] * 2 + ["full_attention"]
TEXT_SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                  max_position_embeddings=512, eos_token_id=None, bos_token_id=None, pad_token_id=None)


def randomise_(named_parameters, seed: int, std: float) -> None:
    """Every weight redrawn; zero-centred norms around 0, the gated norm around 1, A_log and dt_bias N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in named_parameters:
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith(("A_log", "dt_bias")):
                param.copy_(noise)
            elif name.endswith("linear_attn.norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("norm.weight"):
                param.copy_(0.2 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(std * noise)


def tiny_qwen35(vocab: int = 64, seed: int = 0, std: float = 0.15, layer_types: list[str] = LAYER_TYPES,
                **shape):
    """A random Qwen3_5ForCausalLM of TEXT_SHAPE updated by `shape`: std 0.15 decodes varied tokens (smaller ones
    repeat the last token)."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    cfg = Qwen3_5TextConfig(vocab_size=vocab, num_hidden_layers=len(layer_types), layer_types=layer_types,
                            tie_word_embeddings=False, **{**TEXT_SHAPE, **shape})
    hf = Qwen3_5ForCausalLM(cfg).eval()
    randomise_(hf.named_parameters(), seed, std)
    return hf


@pytest.fixture(scope="module")
def pair():
    """A tiny Qwen3.5 target (its HF model and blockspec's) with a random DFlash draft tapping GDN and attention
    layers."""
    hf = tiny_qwen35(vocab=32, seed=1)
    target = target_from_hf(hf, name="tiny-qwen3.5")
    draft = build_draft(target.model.config, "dflash", seed=7, num_layers=2, block_size=8, target_layer_ids=[1, 2, 4])
    return hf, target, draft


def prompts_of(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def greedy(max_new: int, stop=()) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, stop_token_ids=tuple(stop), ignore_eos=not stop)


# ---- the forward against transformers ------------------------------------------------------------------------
def test_config_facts():
    cfg = target_from_hf(tiny_qwen35()).model.config
    assert cfg.gdn_layers == (0, 1, 3, 4) and cfg.attn_output_gate and cfg.zero_centred_norms
    assert cfg.rotary_dim == 4 and cfg.gdn.conv_dim == 2 * 2 * 8 + 4 * 8 and cfg.hybrid


@pytest.mark.parametrize("length", [40, 9], ids=["chunked-prefill", "token-by-token-prefill"])
def test_prefill_logits_and_taps_match_transformers(length):
    hf = tiny_qwen35(std=0.12, seed=3)
    model = target_from_hf(hf).model
    ids = torch.randint(0, 64, (2, length), generator=torch.Generator().manual_seed(0))
    taps = (0, 2, 4)  # GDN, attention, GDN (the last layer's HF entry is after the final norm)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        hidden, features = model(ids, torch.arange(length)[None].expand(2, -1), model.new_cache(2, 64), taps)
        torch.testing.assert_close(model.logits(hidden), ref.logits, atol=1e-5, rtol=1e-5)
        expected = torch.cat([ref.hidden_states[k + 1] for k in taps], dim=-1)
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


def test_cached_decode_and_verify_match_transformers():
    hf = tiny_qwen35(std=0.12, seed=4)
    model = target_from_hf(hf).model
    ids = torch.randint(0, 64, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        cache = model.new_cache(2, 64, verify_tokens=16)
        model(ids[:, :20], torch.arange(20)[None].expand(2, -1), cache)
        for p in range(20, 28):  # one token at a time
            hidden, features = model(ids[:, p:p + 1], torch.full((2, 1), p), cache, (1, 2))
            torch.testing.assert_close(model.logits(hidden)[:, 0], ref.logits[:, p], atol=1e-5, rtol=1e-5)
            expected = torch.cat([ref.hidden_states[2][:, p], ref.hidden_states[3][:, p]], dim=-1)
            torch.testing.assert_close(features[:, 0], expected, atol=1e-5, rtol=1e-5)
        before = cache.recurrent.clone()
        hidden, _ = model(ids[:, 28:44], (28 + torch.arange(16))[None].expand(2, -1), cache,
                          commit_follows=True)  # a verify block
        torch.testing.assert_close(model.logits(hidden), ref.logits[:, 28:44], atol=1e-5, rtol=1e-5)
        assert torch.equal(cache.recurrent, before)  # left for commit to set once
        cache.commit(torch.tensor([16, 16]))  # keeping the whole block is the state after it
        hidden, _ = model(ids[:, 44:45], torch.full((2, 1), 44), cache)
        torch.testing.assert_close(model.logits(hidden)[:, 0], ref.logits[:, 44], atol=1e-5, rtol=1e-5)


# ---- rollback ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rollback", ["states", "replay"])
def test_rollback_to_every_accepted_length_equals_token_by_token_decoding(rollback):
    """Verify a block of B tokens, commit each row to its own length m (ragged), and the conv and recurrent
    states, and the next token's logits, are those of decoding the first m tokens one by one (up to the rounding
    of GEMMs of different heights)."""
    model = target_from_hf(tiny_qwen35(seed=5)).model
    block, rows = 8, 8
    ids = torch.randint(0, 64, (rows, 30), generator=torch.Generator().manual_seed(2))
    prompt = 12
    with torch.no_grad():
        cache = model.new_cache(rows, 40, verify_tokens=block, rollback=rollback)
        model(ids[:, :prompt], torch.arange(prompt)[None].expand(rows, -1), cache)
        reference = model.new_cache(rows, 40, verify_tokens=block)
        model(ids[:, :prompt], torch.arange(prompt)[None].expand(rows, -1), reference)
        keep = torch.arange(1, rows + 1)  # row r keeps r + 1 of the block: every length 1..B
        model(ids[:, prompt:prompt + block], (prompt + torch.arange(block))[None].expand(rows, -1), cache,
              commit_follows=True)
        cache.commit(keep)
        for r in range(rows):
            one = reference.rows(r, r + 1)
            for p in range(prompt, prompt + int(keep[r])):
                model(ids[r:r + 1, p:p + 1], torch.tensor([[p]]), one)
        torch.testing.assert_close(cache.recurrent, reference.recurrent, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.conv, reference.conv, atol=1e-5, rtol=1e-5)
        nxt = prompt + keep  # each row continues right after its kept prefix
        token = ids.gather(1, nxt[:, None])
        after, _ = model(token, nxt[:, None], cache)
        expected, _ = model(token, nxt[:, None], reference)
        torch.testing.assert_close(model.logits(after), model.logits(expected), atol=1e-5, rtol=1e-5)


def test_replay_and_per_position_states_roll_back_to_the_same_states():
    """Two verifies in a row, each followed by a commit to ragged lengths (the full block included): a "replay" cache
    holds bit for bit the states of a "states" cache (the same two roundings per update, replayed)."""
    model = target_from_hf(tiny_qwen35(seed=11)).model
    block, rows, prompt = 6, 4, 9
    ids = torch.randint(0, 64, (rows, prompt + 2 * block), generator=torch.Generator().manual_seed(12))
    caches = {mode: model.new_cache(rows, 40, verify_tokens=block, rollback=mode) for mode in ("states", "replay")}
    with torch.no_grad():
        for cache in caches.values():
            start = torch.zeros(rows, dtype=torch.long)
            model(ids[:, :prompt], torch.arange(prompt)[None].expand(rows, -1), cache)
            for keep in (torch.tensor([1, 6, 3, 5]), torch.tensor([6, 2, 1, 4])):
                pos = prompt + start[:, None] + torch.arange(block)
                model(ids.gather(1, pos - prompt + prompt // 2), pos, cache, commit_follows=True)
                cache.commit(keep)
                start += keep
    states, replay = caches["states"], caches["replay"]
    assert torch.equal(states.recurrent, replay.recurrent) and torch.equal(states.conv, replay.conv)
    assert not hasattr(replay, "steps") and not hasattr(states, "tape_u")  # each keeps only what it replays from
    with pytest.raises(BlockspecError, match="rollback 'undo'"):
        model.new_cache(1, 8, rollback="undo")


def test_greedy_batched_decoding_is_the_same_with_either_rollback(pair):
    _, target, draft = pair
    prompts = prompts_of([6, 17, 3], 32, seed=13)
    params = [greedy(m) for m in (25, 14, 30)]
    got = {mode: BatchDecoder(target, draft, max_batch=3, max_len=80, rollback=mode).generate(prompts, params)
           for mode in ("states", "replay")}
    for s, r in zip(got["states"], got["replay"]):
        assert s.token_ids == r.token_ids and s.stats.acceptance_lengths == r.stats.acceptance_lengths
    assert any(max(r.stats.acceptance_lengths) > 1 for r in got["replay"])


def test_rows_views_copy_row_and_a_reused_row_start_clean():
    model = target_from_hf(tiny_qwen35(seed=6)).model
    prompts = prompts_of([9, 5], 64, seed=3)
    with torch.no_grad():
        cache = model.new_cache(3, 32)
        for row, prompt in enumerate(prompts):
            model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache.rows(row, row + 1))
        alone = model.new_cache(1, 32)
        model(torch.tensor([prompts[1]]), torch.arange(5)[None], alone)
        torch.testing.assert_close(cache.rows(1, 2).recurrent, alone.recurrent, atol=0, rtol=0)
        cache.copy_row(1, 2, 5)  # a sequence moving rows
        for name in ("k", "conv", "recurrent"):
            torch.testing.assert_close(getattr(cache.rows(2, 3), name), getattr(alone, name), atol=0, rtol=0)
        # a new prompt prefilled into row 0 (position 0) ignores what the row held
        model(torch.tensor([prompts[1]]), torch.arange(5)[None], cache.rows(0, 1))
        torch.testing.assert_close(cache.rows(0, 1).recurrent, alone.recurrent, atol=0, rtol=0)
        torch.testing.assert_close(cache.rows(0, 1).conv, alone.conv, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="verify_tokens"):  # the prefill kept no per-token states
        cache.rows(0, 2).commit(torch.tensor([1, 1]))
    verifying = model.new_cache(2, 16, verify_tokens=4)
    with torch.no_grad():
        model(torch.tensor([prompts[1][:3]] * 2), torch.arange(3)[None].expand(2, -1), verifying)
    with pytest.raises(RuntimeError, match="commit_follows=True"):  # that forward set the states itself
        verifying.commit(torch.tensor([1, 1]))


# ---- lossless decoding -------------------------------------------------------------------------------------------
def test_greedy_speculative_equals_autoregressive_equals_transformers(pair):
    hf, target, draft = pair
    for prompt in prompts_of([7, 19, 2], 32, seed=4):
        ar = SpeculativeDecoder(target, None).generate(prompt, greedy(40))
        spec = SpeculativeDecoder(target, draft).generate(prompt, greedy(40))
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt):]
        assert spec.token_ids == ar.token_ids == theirs.tolist()
        assert len(set(ar.token_ids)) > 8  # a target that decodes varied tokens
        # with a stop id from the middle of the continuation
        stop = ar.token_ids[25]
        cut = ar.token_ids[:ar.token_ids.index(stop) + 1]
        stopped = SpeculativeDecoder(target, draft).generate(prompt, greedy(40, stop=[stop]))
        assert stopped.token_ids == cut and stopped.finish_reason == "stop"


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_oracle_acceptance_patterns_are_lossless(pair, pattern):
    """Drafts that are right where a pattern says: every acceptance length 1..B, and the rollback after it."""
    _, target, draft = pair
    prompt = prompts_of([11], 32, seed=5)[0]
    ar = SpeculativeDecoder(target, None).generate(prompt, greedy(60)).token_ids
    decoder = OracleDecoder(target, draft, prompt, ar + [0] * 16, PATTERNS[pattern])
    result = decoder.generate(prompt, greedy(60), block_size=8)
    assert result.token_ids == ar
    assert decoder.starts  # drafts were proposed
    decoder.check_context(tuple(draft.config.target_layer_ids))


@pytest.mark.parametrize("pipeline", [False, True], ids=["sync", "pipelined"])
def test_batched_decoding_with_ragged_acceptance_equals_each_sequence_alone(pair, pipeline):
    _, target, draft = pair
    prompts = prompts_of([1, 5, 23, 9, 14, 3], 32, seed=6)
    max_new = [30, 7, 41, 12, 25, 18]
    params = [greedy(m) for m in max_new]
    params[2] = greedy(41, stop=[SpeculativeDecoder(target, None).generate(prompts[2], params[2]).token_ids[20]])
    want = [SpeculativeDecoder(target, draft).generate(p, q) for p, q in zip(prompts, params)]
    decoder = BatchDecoder(target, draft, max_batch=4, max_len=96)
    decoder.pipeline = pipeline
    got = decoder.generate(prompts, params)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids and g.stats.acceptance_lengths == w.stats.acceptance_lengths
    assert got[2].finish_reason == "stop"
    assert max(max(w.stats.acceptance_lengths) for w in want) > 1  # some rows accepted drafts, others not


def test_batched_autoregressive_and_sampling_rows(pair):
    """Plain batched decoding, and a batch mixing greedy and seeded sampling rows (the eager step), as alone."""
    _, target, draft = pair
    prompts = prompts_of([4, 13, 8], 32, seed=7)
    params = [greedy(20), SamplingParams(max_new_tokens=20, temperature=1.0, seed=3, ignore_eos=True), greedy(15)]
    for d in (None, draft):
        want = [SpeculativeDecoder(target, d).generate(p, q) for p, q in zip(prompts, params)]
        got = BatchDecoder(target, d, max_batch=3, max_len=64).generate(prompts, params)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_batched_data_generation_equals_the_engine(pair):
    """Right-padded prompts of different lengths (train/generate.py) continue exactly as each alone."""
    from blockspec.train.generate import generate_batch

    _, target, _ = pair
    prompts = prompts_of([3, 11, 6], 32, seed=9)
    outs = generate_batch(target.model, prompts, [0.0] * 3, 20, stop_ids=())
    for prompt, out in zip(prompts, outs):
        assert out == SpeculativeDecoder(target, None).generate(prompt, greedy(20)).token_ids


def test_sampling_is_lossless_and_the_check_sees_a_missing_rollback(monkeypatch):
    """The statistical check of tests/test_sampling.py on a tiny Qwen3.5 target (vocabulary 8), drafting blocks of 2
    with a point-mass draft: most first steps reject their draft, whose token the recurrent state must forget
    before t3 is drawn. With the rollback switched off the same check fails (its power)."""
    from test_sampling import PROMPT, TV_VOCAB, PointMassProposer, _assert_matches, _sample_runs, exact_joint

    from blockspec.cache import HybridCache

    hf = tiny_qwen35(vocab=TV_VOCAB, seed=8, std=0.3, layer_types=LAYER_TYPES[:3])
    with torch.no_grad():
        hf.lm_head.weight.mul_(0.5)  # next-token distributions far from one-hot
    target = target_from_hf(hf)
    cfg = DraftConfig.create("dflash", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=16, vocab_size=TV_VOCAB, num_target_layers=3, block_size=4,
                             mask_token_id=0, target_layer_ids=[1, 2])
    draft = DraftModel(cfg)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, param in draft.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.5 * noise)
    decoder = SpeculativeDecoder(target, PointMassProposer(draft.eval(), target.model), block_size=2)
    params = SamplingParams(temperature=1.0, max_new_tokens=3, ignore_eos=True)
    joint = exact_joint(hf, PROMPT, params)
    assert float(joint.sum((1, 2)).max()) < 0.9  # an interesting distribution
    samples, lengths = _sample_runs(decoder, params, 1500, seed0=7000)
    hist = torch.bincount(torch.tensor(lengths), minlength=3)
    assert hist[1] > 0.5 * len(lengths) and hist[2] > 0.05 * len(lengths), hist.tolist()
    _assert_matches(samples, joint)
    monkeypatch.setattr(HybridCache, "commit", lambda self, keep: None)
    samples, _ = _sample_runs(decoder, params, 1500, seed0=7000)
    with pytest.raises(AssertionError):
        _assert_matches(samples, joint)


# ---- loading -----------------------------------------------------------------------------------------------------
def test_multimodal_checkpoint_loads_its_text_model(tmp_path):
    """The published layout: Qwen3_5ForConditionalGeneration, text weights under model.language_model., config
    nested as text_config, a vision tower and an MTP head (both dropped)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = dict(TEXT_SHAPE, vocab_size=64, num_hidden_layers=len(LAYER_TYPES), layer_types=LAYER_TYPES,
                tie_word_embeddings=False, eos_token_id=5)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=4,
                  num_position_embeddings=16)
    cg = Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text, vision_config=vision)).eval()
    randomise_(cg.named_parameters(), seed=10, std=0.12)
    cg.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("model.language_model.layers.0.linear_attn.") for k in weights)
    assert any(k.startswith("model.visual.") for k in weights)
    weights["mtp.fc.weight"] = torch.randn(32, 64)  # the published checkpoint's MTP head
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["model_type"] == "qwen3_5_text"

    target = load_target(str(tmp_path), dtype="float32")
    assert target.model.config.gdn_layers == (0, 1, 3, 4) and target.eos_token_ids[:1] == (5,)
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden, _ = target.model(ids, torch.arange(20)[None], target.model.new_cache(1, 32))
        torch.testing.assert_close(target.model.logits(hidden), cg(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_text_only_checkpoint_loads(tmp_path, pair):
    hf, target, _ = pair
    hf.save_pretrained(tmp_path)
    loaded = load_target(str(tmp_path), dtype="float32")
    prompt = prompts_of([6], 32, seed=8)[0]
    assert (SpeculativeDecoder(loaded, None).generate(prompt, greedy(12)).token_ids
            == SpeculativeDecoder(target, None).generate(prompt, greedy(12)).token_ids)


def test_unknown_target_layer_type_is_refused():
    from blockspec.target import TargetConfig

    hf = tiny_qwen35()
    config = copy.deepcopy(hf.config)
    config.layer_types = ["linear_attention", "mamba"] + LAYER_TYPES[2:]
    with pytest.raises(BlockspecError, match="'mamba'"):
        TargetConfig.from_hf(config, set(hf.state_dict()))
