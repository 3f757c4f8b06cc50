"""Golden vectors from the public reference implementations (z-lab DFlash, AngelSlim DFlare).

Every case folder under $BLOCKSPEC_GOLDEN_DIR (default: ../shared/golden next to the repository) is checked:
- the target's tapped features for `prompt_ids` against `ctx_features_1`;
- the draft calls, in order, sharing ONE draft KV cache: hidden states and target-lm_head logits;
- each greedy speculative loop: exact output ids, and the reference's acceptance lengths as a prefix.

Select with `pytest -k golden`. New cases in the same format are picked up without code changes.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from blockspec.draft import DraftModel, load_draft
from blockspec.engine import SamplingParams, SpeculativeDecoder
from blockspec.target import Target, target_from_hf

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = Path(os.environ.get("BLOCKSPEC_GOLDEN_DIR", str(REPO_ROOT.parent / "shared" / "golden")))


def _discover() -> list[Path]:
    if not GOLDEN_DIR.is_dir():
        return []
    return sorted(p for p in GOLDEN_DIR.iterdir() if p.is_dir() and (p / "case.json").is_file())


CASES = _discover()
NO_CASES = pytest.param(None, marks=pytest.mark.skip(
    reason=f"no golden cases: {GOLDEN_DIR} does not exist or holds no <case>/case.json "
           f"(set BLOCKSPEC_GOLDEN_DIR to a folder of cases)"), id="no-golden-cases")
CASE_PARAMS = [pytest.param(c, id=c.name) for c in CASES] or [NO_CASES]
LOOP_PARAMS = [pytest.param(c, i, id=f"{c.name}-loop{i}")
               for c in CASES for i in range(len(json.loads((c / "case.json").read_text()).get("loops", [])))]
LOOP_PARAMS = LOOP_PARAMS or [pytest.param(None, None, marks=NO_CASES.marks, id="no-golden-loops")]


@dataclass
class Case:
    path: Path
    meta: dict
    tensors: dict[str, torch.Tensor]
    hf: torch.nn.Module
    target: Target
    draft: DraftModel

    @property
    def atol(self) -> float:
        return float(self.meta["atol"])

    @property
    def rtol(self) -> float:
        return float(self.meta["rtol"])


@functools.lru_cache(maxsize=None)
def load_case(path: Path) -> Case:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    meta = json.loads((path / "case.json").read_text())
    dtype = getattr(torch, meta.get("dtype", "float32"))
    tensors = load_file(str(path / "golden.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(str(path / "target"), dtype=dtype).eval()
    draft = load_draft(path / "draft", dtype=dtype).eval()
    return Case(path, meta, tensors, hf, target_from_hf(hf, name=path.name), draft)


def _close(actual: torch.Tensor, expected: torch.Tensor, case: Case, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.float(), expected.float(), atol=case.atol, rtol=case.rtol,
                               msg=lambda m: f"{case.path.name} {what}: {m}")


@pytest.mark.parametrize("case_dir", CASE_PARAMS)
def test_golden_draft_config_matches_case(case_dir):
    case = load_case(case_dir)
    cfg = case.draft.config
    assert cfg.kind == case.meta["arch"]
    assert cfg.block_size == case.meta["block_size"]
    assert cfg.target_layer_ids == list(case.meta["target_layer_ids"])
    assert cfg.mask_token_id == case.meta["mask_token_id"]
    assert case.draft.mask_embedding is None  # published layout: the mask is a target vocabulary row
    # the reference checkpoint must fit the reference target as-is
    SpeculativeDecoder(case.target, case.draft)


@pytest.mark.parametrize("case_dir", CASE_PARAMS)
def test_golden_target_taps(case_dir):
    case = load_case(case_dir)
    model = case.target.model
    ids = case.tensors["prompt_ids"]
    n = ids.shape[1]
    taps = tuple(case.meta["target_layer_ids"])
    with torch.no_grad():
        hidden, features = model(ids, torch.arange(n)[None], model.new_cache(1, n + 8), taps)
        hf_out = case.hf(ids, output_hidden_states=True)
    expected = case.tensors[case.meta["calls"][0]["features"]]
    assert features.shape == (1, n, len(taps) * model.config.hidden_size)
    _close(features, expected, case, "ctx_features_1 (target taps of prompt_ids)")
    # independent check of the tap convention: id k = output of decoder layer k = HF hidden_states[k + 1]
    h = model.config.hidden_size
    for i, k in enumerate(taps):
        _close(features[..., i * h:(i + 1) * h], hf_out.hidden_states[k + 1], case, f"tap {k} vs HF")
    _close(model.logits(hidden), hf_out.logits, case, "target logits vs HF")


@pytest.mark.parametrize("case_dir", CASE_PARAMS)
def test_golden_load_target_from_directory(case_dir):
    """blockspec's own loader on the case's HF directory gives the same taps as the reference."""
    from blockspec.target import load_target

    case = load_case(case_dir)
    target = load_target(str(case_dir / "target"), dtype="float32", tokenizer=False)
    ids = case.tensors["prompt_ids"]
    n = ids.shape[1]
    with torch.no_grad():
        _, features = target.model(ids, torch.arange(n)[None], target.model.new_cache(1, n),
                                   tuple(case.meta["target_layer_ids"]))
    _close(features, case.tensors[case.meta["calls"][0]["features"]], case, "load_target taps")


@pytest.mark.parametrize("case_dir", CASE_PARAMS)
def test_golden_draft_calls(case_dir):
    """The calls in order, on ONE draft cache: the context K/V written by call i are what call i+1 reads."""
    case = load_case(case_dir)
    target, draft = case.target.model, case.draft
    calls = case.meta["calls"]
    assert calls, "a golden case needs at least one draft call"
    block_size = case.meta["block_size"]
    mask = case.meta["mask_token_id"]
    cache = draft.new_cache(1, 512)
    cache_len = 0  # blockspec's equivalent of the reference DynamicCache length after its crop
    for index, call in enumerate(calls, 1):
        features = case.tensors[call["features"]]
        block = case.tensors[call["block"]]
        positions = case.tensors[call["positions"]]
        ctx = features.shape[1]
        assert block.shape == (1, block_size)
        assert positions.shape == (1, ctx + block_size)
        ctx_positions, block_positions = positions[:, :ctx], positions[:, ctx:]
        start = int(block_positions[0, 0])
        # cache_before: the cache holds exactly the slots before this call's first context position
        assert call["cache_before"] == cache_len
        assert int(ctx_positions[0, 0]) == call["cache_before"], "context must start where the cache ends"
        assert ctx_positions[0].tolist() == list(range(call["cache_before"], start))
        assert block_positions[0].tolist() == list(range(start, start + block_size))
        assert block[0, 1:].tolist() == [mask] * (block_size - 1)

        with torch.no_grad():
            embeds = draft.embed_block(block[:, 0], target.embed_tokens)
            assert torch.equal(embeds, target.embed_tokens(block))
            hidden = draft(embeds, block_positions, features, ctx_positions, cache)
            logits = target.logits(hidden[:, 1:])
        _close(hidden, case.tensors[call["hidden"]], case, f"call {index} draft hidden")
        _close(logits, case.tensors[call["logits"]], case, f"call {index} draft logits")

        # The reference appends context+block K/V, then crops back to the block start. blockspec's static
        # cache keeps each context K/V at the slot of its position; anything it holds at slots >= the block
        # start is rewritten by the next call (its context starts there) before being read, so its crop is
        # implicitly to the block start: check the case asks for exactly that (None: only after the last call).
        if call["crop_after"] is None:
            assert index == len(calls), "an uncropped call would leave block K/V for the next call"
        else:
            assert call["crop_after"] == start
        cache_len = start


@pytest.mark.parametrize("case_dir,loop_index", LOOP_PARAMS)
def test_golden_loop(case_dir, loop_index):
    case = load_case(case_dir)
    loop = case.meta["loops"][loop_index]
    prompt = case.tensors[loop["prompt"]][0].tolist()
    expected = case.tensors[loop["output"]][0].tolist()
    max_new = int(loop["max_new_tokens"])
    decoder = SpeculativeDecoder(case.target, case.draft)
    assert decoder.block_size == case.meta["block_size"]
    result = decoder.generate(prompt, SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True))
    assert result.finish_reason == "length"
    assert len(result.token_ids) == max_new
    assert prompt + result.token_ids == expected
    lengths = result.stats.acceptance_lengths
    golden = list(loop["acceptance_lengths"])
    assert lengths, "no speculative step was taken"
    assert all(1 <= a <= case.meta["block_size"] for a in lengths)
    # the reference loop takes one extra (wasted) step at the end: ours must be a prefix of its list
    assert lengths == golden[:len(lengths)], f"acceptance lengths {lengths} are not a prefix of {golden}"
    assert len(golden) - len(lengths) <= 1
    # the first token comes from the prefill, every step commits its acceptance length
    assert 1 + sum(lengths) >= max_new > 1 + sum(lengths[:-1])
