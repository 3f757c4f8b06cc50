"""Greedy speculative decoding is lossless: exactly the tokens plain greedy decoding produces.

References: blockspec's own autoregressive path (SpeculativeDecoder(target, None)), which is itself checked
against Hugging Face `generate(do_sample=False)` and HF forward outputs. Drafts: random DFlash / DFlare
networks (acceptance is then mostly 1: every step rejects) and ORACLE drafts that know the true greedy
continuation and corrupt it in controlled ways, forcing exact acceptance patterns (whole block, partial,
none, a wrong slot followed by right ones, a stop token inside an accepted run, max_new_tokens mid-block).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockspec.engine import DraftProposer, SamplingParams, SpeculativeDecoder
from blockspec.errors import BlockspecError

TINY_TARGETS = ("qwen3", "llama", "qwen3-sw")  # built by the `zoo` fixture (conftest.py)

HYPOTHESIS = dict(deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                         HealthCheck.data_too_large])

Pattern = Callable[[int, int], list[bool]]  # (step index, block size) -> correctness of slots 1..B-1


def random_prompt(vocab: int, length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (length,), generator=gen).tolist()


def greedy(max_new: int, stop=(), **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, temperature=0, stop_token_ids=tuple(stop), ignore_eos=not stop,
                          **kw)


def leading_true(flags: list[bool]) -> int:
    for i, ok in enumerate(flags):
        if not ok:
            return i
    return len(flags)


def forced_lengths(pattern: Pattern, block: int, n_tokens: int) -> list[int]:
    """Acceptance lengths the loop must record to commit `n_tokens` (the prefill gives the first one)."""
    lengths: list[int] = []
    committed = 1
    while committed < n_tokens:
        accepted = leading_true(pattern(len(lengths), block))
        lengths.append(accepted + 1)
        committed += accepted + 1
    return lengths


class PatternOracle:
    """A proposer of the TRUE greedy continuation, corrupted where `pattern` says so.

    `seq[p]` is the token at position p (prompt then greedy continuation). Slot j of a block starting at
    position `start` predicts the token at position start + j. A wrong slot gets (true + 1) % vocab.
    Records every call so the test can check the context (positions + features) the draft was fed: the prompt's
    at the first block, then the committed slots of each verified block.
    """

    def __init__(self, inner: DraftProposer, prompt: list[int], continuation: list[int], pattern: Pattern,
                 vocab: int) -> None:
        self.inner, self.max_block, self.tap_layer_ids = inner, inner.max_block, inner.tap_layer_ids
        self.prompt_len = len(prompt)
        self.seq = list(prompt) + list(continuation)
        self.pattern, self.vocab = pattern, vocab
        self.starts: list[int] = []
        self.ctx_positions: list[list[int]] = []
        self.features: list[torch.Tensor] = []

    def allocate(self, max_batch: int, max_len: int) -> None:
        self.inner.allocate(max_batch, max_len)

    def join(self, first, features, positions, lengths) -> None:
        self.inner.join(first, features, positions, lengths)
        n = int(lengths[0])
        self.joined = (positions[0, :n].tolist(), features[0, :n].clone())

    def propose_greedy(self, n, block_size, last_tokens, block_positions, kv_len):
        assert n == 1
        block = block_positions.shape[1]
        start = int(block_positions[0, 0])
        assert block_positions[0].tolist() == list(range(start, start + block))
        assert int(last_tokens[0]) == self.seq[start], "a block must start with the newest committed token"
        assert start + block - 1 < len(self.seq), "oracle continuation too short for this block"
        if self.starts:  # the slots of the last verified block that were committed
            committed = start - self.starts[-1]
            positions, features = self.inner.feat_pos[0, :committed].tolist(), self.inner.feat[0, :committed].clone()
        else:
            positions, features = self.joined
        assert features.shape[0] == len(positions)
        correct = list(self.pattern(len(self.starts), block))
        assert len(correct) == block - 1
        tokens = [self.seq[start + j] if correct[j - 1] else (self.seq[start + j] + 1) % self.vocab
                  for j in range(1, block)]
        self.starts.append(start)
        self.ctx_positions.append(positions)
        self.features.append(features)
        return torch.tensor([tokens], dtype=torch.long, device=last_tokens.device)

    def observe(self, n, block_positions, features) -> None:
        self.inner.observe(n, block_positions, features)

    def settle(self, n, slots) -> None:
        self.inner.settle(n, slots)

    def move_row(self, source, dest, length) -> None:
        self.inner.move_row(source, dest, length)

    def state(self, n):
        return self.inner.state(n)


class OracleDecoder(SpeculativeDecoder):
    """One sequence decoded with a PatternOracle; `starts` and `check_context` report what it was fed."""

    def __init__(self, target, draft, prompt: list[int], continuation: list[int], pattern: Pattern,
                 block_size: int | None = None) -> None:
        self.oracle = PatternOracle(DraftProposer(draft, target.model), prompt, continuation, pattern,
                                    target.model.config.vocab_size)
        super().__init__(target, self.oracle, block_size)

    @property
    def starts(self) -> list[int]:
        return self.oracle.starts

    def check_context(self, taps: tuple[int, ...]) -> None:
        """Every committed position reached the draft exactly once, in order, with the right features."""
        oracle = self.oracle
        assert oracle.ctx_positions[0] == list(range(oracle.prompt_len))
        for prev, start, seen in zip(oracle.starts, oracle.starts[1:], oracle.ctx_positions[1:]):
            assert seen == list(range(prev, start)), "the draft must see exactly the positions committed last step"
        end = oracle.starts[-1]
        model = self.target.model
        ids = torch.tensor([oracle.seq[:end]])
        with torch.no_grad():
            _, expected = model(ids, torch.arange(end)[None], model.new_cache(1, end + 1), taps)
        got = torch.cat(oracle.features, dim=0)
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected[0], atol=2e-5 * scale, rtol=1e-4)


def run_oracle(target, draft, prompt, continuation, pattern, block, params):
    decoder = OracleDecoder(target, draft, prompt, continuation, pattern)
    result = decoder.generate(prompt, params, block_size=block)
    return decoder, result


# ---- patterns ---------------------------------------------------------------------------------------------
def all_correct(step: int, block: int) -> list[bool]:
    return [True] * (block - 1)


def all_wrong(step: int, block: int) -> list[bool]:
    return [False] * (block - 1)


def cycling_prefix(step: int, block: int) -> list[bool]:
    k = (3 * step + 1) % block  # 1, 4, 7, ...: k correct slots then wrong ones
    return [j < k for j in range(block - 1)]


def hole(step: int, block: int) -> list[bool]:
    k = (5 * step + 2) % (block - 1)  # only slot k+1 wrong: later right slots must NOT be accepted
    return [j != k for j in range(block - 1)]


def last_slot_wrong(step: int, block: int) -> list[bool]:
    return [j < block - 2 for j in range(block - 1)]


PATTERNS = {"all-correct": all_correct, "all-wrong": all_wrong, "cycling-prefix": cycling_prefix, "hole": hole,
            "last-slot-wrong": last_slot_wrong}


# ---- the target adapter and the AR reference ---------------------------------------------------------------
@pytest.mark.parametrize("name", TINY_TARGETS)
def test_target_forward_matches_hf(zoo, name):
    """Taps (id k = output of layer k) and logits equal HF's; chunked cached decoding equals one full pass."""
    tiny = zoo.target(name)
    model, cfg = tiny.target.model, tiny.config
    ids = torch.tensor([random_prompt(cfg.vocab_size, 30, seed=5)])
    taps = tuple(range(cfg.num_layers))
    with torch.no_grad():
        hidden, features = model(ids, torch.arange(30)[None], model.new_cache(1, 32), taps)
        logits = model.logits(hidden)
        ref = tiny.hf(ids, output_hidden_states=True)
        scale = float(ref.logits.abs().max())
        torch.testing.assert_close(logits, ref.logits, atol=1e-5 * scale, rtol=1e-5)
        h = cfg.hidden_size
        for k in taps[:-1]:  # HF's last hidden_states entry is post-final-norm
            expected = ref.hidden_states[k + 1]
            torch.testing.assert_close(features[..., k * h:(k + 1) * h], expected,
                                       atol=1e-5 * float(expected.abs().max()), rtol=1e-5)
        # incremental: prefill 17, then chunks of 1, 5, 1, 6 tokens through the static cache
        cache = model.new_cache(1, 40)
        pieces, at = [], 0
        for size in (17, 1, 5, 1, 6):
            chunk_hidden, _ = model(ids[:, at:at + size], torch.arange(at, at + size)[None], cache)
            pieces.append(chunk_hidden)
            at += size
        torch.testing.assert_close(model.logits(torch.cat(pieces, 1)), logits, atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("name", TINY_TARGETS)
def test_tiny_targets_are_not_degenerate(zoo, name):
    vocab = zoo.target(name).config.vocab_size
    for seed in range(3):
        out = zoo.ar(name, random_prompt(vocab, 12, seed=100 + seed), 40)
        assert len(set(out)) >= 8, f"{name}: greedy output is near-constant {out}"


@pytest.mark.parametrize("name", TINY_TARGETS)
def test_ar_and_speculative_match_hf_generate(zoo, name):
    tiny = zoo.target(name)
    vocab = tiny.config.vocab_size
    n = 24
    for index, length in enumerate((1, 9, 33)):
        prompt = random_prompt(vocab, length, seed=200 + index)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            hf_out = tiny.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                      min_new_tokens=n, pad_token_id=0)
        expected = hf_out[0, length:].tolist()
        assert len(expected) == n
        ar = SpeculativeDecoder(tiny.target, None).generate(prompt, greedy(n))
        assert ar.token_ids == expected
        assert ar.stats.acceptance_lengths == [1] * (n - 1)
        arch = ("dflash", "dflare")[index % 2]
        spec = SpeculativeDecoder(tiny.target, zoo.draft(name, arch, block_size=8)).generate(prompt, greedy(n))
        assert spec.token_ids == expected
        # block size 1 with a draft attached is plain AR decoding too
        one = SpeculativeDecoder(tiny.target, zoo.draft(name, arch, block_size=8), block_size=1)
        assert one.generate(prompt, greedy(n)).token_ids == expected


# ---- random drafts ----------------------------------------------------------------------------------------
@settings(max_examples=24, **HYPOTHESIS)
@given(name=st.sampled_from(TINY_TARGETS), arch=st.sampled_from(["dflash", "dflare"]),
       mask_embedding=st.booleans(), block=st.sampled_from([2, 4, 8, 16]), length=st.integers(1, 40),
       max_new=st.integers(1, 40), seed=st.integers(0, 10_000), trained_16=st.booleans())
def test_random_draft_is_lossless(zoo, name, arch, mask_embedding, block, length, max_new, seed, trained_16):
    target = zoo.target(name).target
    prompt = random_prompt(target.model.config.vocab_size, length, seed)
    expected = zoo.ar(name, prompt, max_new)
    draft = zoo.draft(name, arch, block_size=16 if trained_16 else block, mask_embedding=mask_embedding)
    result = SpeculativeDecoder(target, draft).generate(prompt, greedy(max_new), block_size=block)
    assert result.token_ids == expected
    assert result.finish_reason == "length"
    lengths = result.stats.acceptance_lengths
    assert all(1 <= a <= block for a in lengths)
    assert result.stats.block_size == block
    if max_new == 1:
        assert lengths == []
    else:
        assert 1 + sum(lengths) >= max_new > 1 + sum(lengths[:-1])


@pytest.mark.parametrize("arch", ["dflash", "dflare"])
def test_random_draft_many_prompts(zoo, arch):
    """A sweep over prompt lengths 1..40 on both tiny families, trained block size 16."""
    for name in ("qwen3", "llama"):
        target = zoo.target(name).target
        decoder = SpeculativeDecoder(target, zoo.draft(name, arch, block_size=16, mask_embedding=(name == "llama")))
        for length in (1, 2, 3, 7, 16, 17, 40):
            prompt = random_prompt(target.model.config.vocab_size, length, seed=300 + length)
            result = decoder.generate(prompt, greedy(20))
            assert result.token_ids == zoo.ar(name, prompt, 20), (name, length)


def test_stream_chunks_add_up(zoo):
    target = zoo.target("qwen3").target
    prompt = random_prompt(target.model.config.vocab_size, 10, seed=7)
    decoder = SpeculativeDecoder(target, zoo.draft("qwen3", "dflash", block_size=4))
    chunks = list(decoder.stream(prompt, greedy(15)))
    assert all(c.result is None for c in chunks[:-1]) and chunks[-1].result is not None
    result = chunks[-1].result
    assert [t for c in chunks for t in c.token_ids] == result.token_ids == zoo.ar("qwen3", prompt, 15)
    assert [len(c.token_ids) for c in chunks[1:-1]] == result.stats.acceptance_lengths[:-1]


# ---- oracle drafts: forced acceptance patterns --------------------------------------------------------------
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("name,arch,block", [("qwen3", "dflash", 8), ("llama", "dflare", 4), ("qwen3-sw", "dflare", 16),
                                             ("llama", "dflash", 16)])
def test_oracle_forced_acceptance(zoo, name, arch, block, pattern):
    target = zoo.target(name).target
    prompt = random_prompt(target.model.config.vocab_size, 11, seed=400 + block)
    n = 37
    continuation = zoo.ar(name, prompt, n + block)
    draft = zoo.draft(name, arch, block_size=block)
    decoder, result = run_oracle(target, draft, prompt, continuation, PATTERNS[pattern], block, greedy(n))
    assert result.token_ids == continuation[:n]
    assert result.finish_reason == "length"
    expected = forced_lengths(PATTERNS[pattern], block, n)
    assert result.stats.acceptance_lengths == expected
    starts = [len(prompt) + sum(expected[:i]) for i in range(len(expected))]
    assert decoder.starts == starts
    decoder.check_context(tuple(draft.config.target_layer_ids))
    if pattern == "all-correct":
        assert set(expected[:-1]) == {block}
    if pattern == "all-wrong":
        assert set(expected) == {1}


@settings(max_examples=16, **HYPOTHESIS)
@given(name=st.sampled_from(["qwen3", "llama"]), block=st.sampled_from([2, 4, 8, 16]), length=st.integers(1, 40),
       max_new=st.integers(1, 40), ks=st.lists(st.integers(0, 15), min_size=1, max_size=8),
       noise=st.lists(st.booleans(), min_size=15, max_size=15))
def test_oracle_random_patterns(zoo, name, block, length, max_new, ks, noise):
    """k correct slots, slot k+1 wrong, the rest right or wrong at random: acceptance must be exactly k+1."""
    def pattern(step: int, b: int) -> list[bool]:
        k = ks[step % len(ks)] % b
        return [j < k or (j > k and noise[j]) for j in range(b - 1)]

    target = zoo.target(name).target
    prompt = random_prompt(target.model.config.vocab_size, length, seed=length * 31 + max_new)
    continuation = zoo.ar(name, prompt, max_new + block)
    draft = zoo.draft(name, "dflash", block_size=block)
    decoder, result = run_oracle(target, draft, prompt, continuation, pattern, block, greedy(max_new))
    assert result.token_ids == continuation[:max_new]
    assert result.stats.acceptance_lengths == forced_lengths(pattern, block, max_new)
    if decoder.starts:
        decoder.check_context(tuple(draft.config.target_layer_ids))


@pytest.mark.parametrize("block", [4, 8])
def test_stop_token_inside_accepted_run(zoo, block):
    name = "llama"
    target = zoo.target(name).target
    prompt = random_prompt(target.model.config.vocab_size, 6, seed=500)
    continuation = zoo.ar(name, prompt, 40 + block)
    # a token first appearing at index i, strictly inside a fully accepted run (not its last token)
    candidates = [i for i in range(1, 40) if continuation[i] not in continuation[:i] and (i - 1) % block != block - 1]
    assert candidates, f"no usable stop token in {continuation}"
    i = candidates[len(candidates) // 2]
    stop = continuation[i]
    draft = zoo.draft(name, "dflash", block_size=block)
    decoder = OracleDecoder(target, draft, prompt, continuation, all_correct)
    chunks = list(decoder.stream(prompt, greedy(40, stop=(stop,)), block_size=block))
    result = chunks[-1].result
    assert result.finish_reason == "stop"
    assert result.token_ids == continuation[:i + 1]
    assert chunks[-1].token_ids[-1] == stop
    assert result.stats.acceptance_lengths[-1] == block  # the whole run was accepted, then cut after the stop
    assert len(chunks[-1].token_ids) < block
    ar = SpeculativeDecoder(target, None).generate(prompt, greedy(40, stop=(stop,)))
    assert ar.token_ids == result.token_ids and ar.finish_reason == "stop"
    # the same through the target's EOS ids, and ignore_eos turns it off
    with_eos = dataclasses.replace(target, eos_token_ids=(stop,))
    eos_run = OracleDecoder(with_eos, draft, prompt, continuation, all_correct).generate(
        prompt, SamplingParams(max_new_tokens=40))
    assert eos_run.token_ids == continuation[:i + 1] and eos_run.finish_reason == "stop"
    ignored = OracleDecoder(with_eos, draft, prompt, continuation, all_correct).generate(
        prompt, SamplingParams(max_new_tokens=40, ignore_eos=True))
    assert ignored.token_ids == continuation[:40] and ignored.finish_reason == "length"


def test_stop_token_as_first_token(zoo):
    target = zoo.target("qwen3").target
    prompt = random_prompt(target.model.config.vocab_size, 5, seed=510)
    first = zoo.ar("qwen3", prompt, 1)[0]
    result = SpeculativeDecoder(target, zoo.draft("qwen3", "dflare", block_size=8)).generate(
        prompt, greedy(30, stop=(first,)))
    assert result.token_ids == [first] and result.finish_reason == "stop"
    assert result.stats.acceptance_lengths == []


def test_stop_token_equal_to_mask_token(zoo):
    """A stop id that is also the draft's mask id must only stop on a COMMITTED token (SPEC 8)."""
    name = "qwen3"
    target = zoo.target(name).target
    prompt = random_prompt(target.model.config.vocab_size, 8, seed=520)
    continuation = zoo.ar(name, prompt, 40)
    i = max(range(2, 40), key=lambda k: continuation[k] not in continuation[:k])  # some first occurrence
    assert continuation[i] not in continuation[:i]
    stop = continuation[i]
    draft = zoo.custom_draft(name, "dflash", seed=3, block_size=8, mask_token_id=stop)
    result = SpeculativeDecoder(target, draft).generate(prompt, greedy(40, stop=(stop,)))
    assert result.token_ids == continuation[:i + 1] and result.finish_reason == "stop"


@pytest.mark.parametrize("max_new", [1, 2, 5, 9, 12, 17, 26])
def test_max_new_tokens_mid_block(zoo, max_new):
    block = 8
    target = zoo.target("qwen3").target
    prompt = random_prompt(target.model.config.vocab_size, 13, seed=600)
    continuation = zoo.ar("qwen3", prompt, 26 + block)
    draft = zoo.draft("qwen3", "dflare", block_size=block)
    _, result = run_oracle(target, draft, prompt, continuation, all_correct, block, greedy(max_new))
    assert len(result.token_ids) == max_new
    assert result.token_ids == continuation[:max_new]
    assert result.finish_reason == "length"
    assert result.stats.acceptance_lengths == [block] * ((max_new - 1 + block - 1) // block)
    assert result.stats.generated_tokens == max_new


@pytest.mark.parametrize("block", [1, 2, 4, 8])
def test_block_size_below_trained(zoo, block):
    """generate(block_size=b) with a draft trained for 16 runs b-token blocks, losslessly."""
    target = zoo.target("qwen3").target
    prompt = random_prompt(target.model.config.vocab_size, 10, seed=700)
    draft = zoo.draft("qwen3", "dflash", block_size=16)
    decoder = SpeculativeDecoder(target, draft)
    result = decoder.generate(prompt, greedy(20), block_size=block)
    assert result.token_ids == zoo.ar("qwen3", prompt, 20)
    assert result.stats.block_size == block
    assert all(1 <= a <= block for a in result.stats.acceptance_lengths)
    if block > 1:  # and the proposal path sees b-slot blocks (oracle: every block fully accepted)
        continuation = zoo.ar("qwen3", prompt, 20 + block)
        oracle, forced = run_oracle(target, draft, prompt, continuation, all_correct, block, greedy(20))
        assert forced.token_ids == continuation[:20]
        assert forced.stats.acceptance_lengths == forced_lengths(all_correct, block, 20)


def _context_case(zoo):
    target = zoo.target("qwen3").target
    limit = target.model.config.max_position_embeddings
    prompt = random_prompt(target.model.config.vocab_size, limit - 20, seed=800)
    return target, limit, prompt


def test_request_beyond_the_context_is_refused(zoo):
    target, limit, prompt = _context_case(zoo)
    for draft in (None, zoo.draft("qwen3", "dflash", block_size=16)):
        with pytest.raises(BlockspecError) as excinfo:
            SpeculativeDecoder(target, draft).generate(prompt, greedy(21))  # prompt + new = limit + 1
        message = str(excinfo.value)
        assert "\n" not in message and "max_new_tokens" in message and str(limit) in message


def test_request_that_fits_the_context_is_served_at_every_block_size(zoo):
    target, limit, prompt = _context_case(zoo)
    ar = SpeculativeDecoder(target, None).generate(prompt, greedy(20))  # prompt + new == limit
    spec = SpeculativeDecoder(target, zoo.draft("qwen3", "dflash", block_size=16)).generate(prompt, greedy(20))
    assert spec.token_ids == ar.token_ids and len(ar.token_ids) == 20


def test_block_size_above_trained_refused(zoo):
    target = zoo.target("qwen3").target
    decoder = SpeculativeDecoder(target, zoo.draft("qwen3", "dflash", block_size=8))
    with pytest.raises(BlockspecError, match="block size 16"):
        decoder.generate([1, 2, 3], greedy(4), block_size=16)


# ---- SmolLM2-135M-Instruct (the README default target) -----------------------------------------------------
SMOL_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
                "Give me three tips for writing clean Python code.")
SMOL_N = 40


@pytest.fixture(scope="module")
def smol_ar(smollm2):
    """Prompt ids and plain greedy continuations (EOS ignored), one AR run per prompt."""
    ar = SpeculativeDecoder(smollm2, None)
    out = {}
    for text in SMOL_PROMPTS:
        ids = smollm2.encode(text)
        out[text] = (ids, ar.generate(ids, SamplingParams(max_new_tokens=SMOL_N, ignore_eos=True)).token_ids)
    return out


def _until_eos(tokens: list[int], eos: tuple[int, ...]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + 1]
    return tokens


def test_smollm2_ar_is_sensible(smollm2, smol_ar):
    assert smollm2.eos_token_ids, "the default target must know its EOS id"
    ids, tokens = smol_ar[SMOL_PROMPTS[0]]
    answer = _until_eos(tokens, smollm2.eos_token_ids)
    assert "Paris" in smollm2.tokenizer.decode(answer, skip_special_tokens=True)
    assert answer[-1] in smollm2.eos_token_ids  # it ends its answer inside the budget
    for text in SMOL_PROMPTS[1:]:
        assert len(set(smol_ar[text][1])) >= 10


@pytest.mark.parametrize("prompt", SMOL_PROMPTS[:2])
def test_smollm2_random_mask_embedding_draft(smollm2, smollm2_draft, smol_ar, prompt):
    ids, tokens = smol_ar[prompt]
    expected = _until_eos(tokens[:24], smollm2.eos_token_ids)
    result = SpeculativeDecoder(smollm2, smollm2_draft).generate(ids, SamplingParams(max_new_tokens=24))
    assert result.token_ids == expected
    assert result.finish_reason == ("stop" if expected[-1] in smollm2.eos_token_ids else "length")
    assert result.text == smollm2.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("pattern", ["all-correct", "cycling-prefix", "hole"])
def test_smollm2_oracle(smollm2, smollm2_draft, smol_ar, pattern):
    ids, tokens = smol_ar[SMOL_PROMPTS[2]]
    block = smollm2_draft.block_size
    n = SMOL_N - block
    decoder, result = run_oracle(smollm2, smollm2_draft, ids, tokens, PATTERNS[pattern], block,
                                 SamplingParams(max_new_tokens=n, ignore_eos=True))
    assert result.token_ids == tokens[:n]
    assert result.stats.acceptance_lengths == forced_lengths(PATTERNS[pattern], block, n)
    decoder.check_context(tuple(smollm2_draft.config.target_layer_ids))


def test_smollm2_eos_inside_accepted_run(smollm2, smollm2_draft, smol_ar):
    ids, tokens = smol_ar[SMOL_PROMPTS[0]]
    expected = _until_eos(tokens, smollm2.eos_token_ids)
    block = smollm2_draft.block_size
    assert len(expected) + block <= len(tokens)
    decoder = OracleDecoder(smollm2, smollm2_draft, ids, tokens, all_correct)
    chunks = list(decoder.stream(ids, SamplingParams(max_new_tokens=SMOL_N)))
    result = chunks[-1].result
    assert result.token_ids == expected and result.finish_reason == "stop"
    # EOS came inside a fully accepted block: the tokens after it in that block were dropped
    assert result.stats.acceptance_lengths[-1] == block
    assert len(chunks[-1].token_ids) < block
    assert "".join(c.text for c in chunks) == result.text
    assert result.text == smollm2.tokenizer.decode(expected, skip_special_tokens=True)


def test_smollm2_stop_string(smollm2, smollm2_draft, smol_ar):
    ids, tokens = smol_ar[SMOL_PROMPTS[0]]
    params = SamplingParams(max_new_tokens=SMOL_N, stop_strings=("France",))
    ar = SpeculativeDecoder(smollm2, None).generate(ids, params)
    decoder = OracleDecoder(smollm2, smollm2_draft, ids, tokens, all_correct)
    chunks = list(decoder.stream(ids, params))
    spec = chunks[-1].result
    assert spec.finish_reason == ar.finish_reason == "stop"
    assert spec.token_ids == ar.token_ids == tokens[:len(spec.token_ids)]
    assert "France" in smollm2.tokenizer.decode(spec.token_ids)
    assert "France" not in spec.text and spec.text == ar.text
    assert "".join(c.text for c in chunks) == spec.text
