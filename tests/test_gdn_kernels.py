"""The Gated DeltaNet kernels (kernels/gdn.py) against the torch path they replace (target/gdn.py), on a tiny random
Qwen3.5 target.

Runs on a CUDA machine, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1), in fp32 there (the interpreter
has no bf16 arithmetic of its own); skipped otherwise.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

from blockspec.kernels import use_settings  # noqa: E402
from blockspec.kernels.gdn import gdn_steps  # noqa: E402
from blockspec.target import target_from_hf  # noqa: E402
from test_hybrid import tiny_qwen35  # noqa: E402

ROWS, PROMPT, BLOCK = 3, 12, 8


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Under the interpreter the tensors are on the CPU: let the GDN layers and the cache's commit take the kernels
    anyway (KernelSettings.fused_gdn still chooses)."""
    if INTERPRET:
        for module in ("blockspec.target.gdn", "blockspec.cache"):
            monkeypatch.setattr(f"{module}.fused_kernels_apply", lambda *tensors: True)


def tiny_target(seed: int, dtype: torch.dtype = torch.float32):
    return target_from_hf(tiny_qwen35(seed=seed)).model.to(DEVICE, dtype)


def decode_session(model, fused: bool, rollback: str) -> tuple[list[torch.Tensor], object]:
    """Prefill (the torch chunked form either way), a decode token, a verify block in which row 0 starts a new sequence
    at position 0, a ragged commit, then another decode token: the logits of each pass, and the cache."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (ROWS, PROMPT + 2 + BLOCK), generator=gen).to(DEVICE)
    cache = model.new_cache(ROWS, 48, verify_tokens=BLOCK, rollback=rollback)
    logits = []
    with torch.no_grad(), use_settings(fused_gdn=fused):
        def run(tokens, positions):
            hidden, _ = model(tokens, positions.to(DEVICE), cache)
            logits.append(model.logits(hidden))

        run(ids[:, :PROMPT], torch.arange(PROMPT)[None].expand(ROWS, -1))
        run(ids[:, PROMPT:PROMPT + 1], torch.full((ROWS, 1), PROMPT))
        positions = PROMPT + 1 + torch.arange(BLOCK)[None].repeat(ROWS, 1)
        positions[0] = torch.arange(BLOCK)  # a new sequence in row 0
        run(ids[:, PROMPT + 1:PROMPT + 1 + BLOCK], positions)
        keep = torch.tensor([3, BLOCK, 1], device=DEVICE)
        cache.commit(keep)
        run(ids[:, -1:], (positions.to(DEVICE).gather(1, keep[:, None] - 1) + 1))
    return logits, cache


@pytest.mark.parametrize("rollback", ["states", "replay"])
def test_decode_verify_and_commit_through_the_kernels_match_the_torch_ops(kernels_on_cpu, rollback):
    model = tiny_target(seed=21)
    got_logits, got = decode_session(model, True, rollback)
    want_logits, want = decode_session(model, False, rollback)
    for g, w in zip(got_logits, want_logits):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)
    names = ["conv", "recurrent", "windows"] + (["steps"] if rollback == "states" else
                                                ["base", "tape_k", "tape_decay", "tape_u"])
    for name in names:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-5, rtol=1e-5, msg=name)
    assert got.recurrent.abs().amax() > 0.01 and got.recurrent[:, 0].abs().amax() > 0  # real states, row 0 too


def test_replay_commit_equals_the_kernels_per_position_states_bit_for_bit(kernels_on_cpu):
    model = tiny_target(seed=22)
    _, states = decode_session(model, True, "states")
    _, replay = decode_session(model, True, "replay")
    assert torch.equal(states.recurrent, replay.recurrent) and torch.equal(states.conv, replay.conv)


def test_a_verify_block_and_one_token_decodes_run_the_same_arithmetic(kernels_on_cpu):
    """The kernel's per-token work does not depend on the block: n tokens in one launch and one launch per token
    give bit-identical outputs, conv and recurrent states (row 0 starting a new sequence at position 0)."""
    model = tiny_target(seed=23)
    mixer = model.layers[0].linear_attn
    gen = torch.Generator().manual_seed(1)
    projected = torch.randn(ROWS, BLOCK, mixer.in_proj.weight.shape[0], generator=gen).to(DEVICE)
    positions = (5 + torch.arange(BLOCK))[None].repeat(ROWS, 1)
    positions[0] -= 5
    positions = positions.to(DEVICE)
    caches = [model.new_cache(ROWS, 32, verify_tokens=BLOCK) for _ in range(2)]
    for cache in caches:
        cache.keeps_steps(BLOCK)
        torch.manual_seed(2)
        cache.conv.normal_()
        cache.recurrent.normal_()
    args = (mixer.conv1d.weight, mixer.A_log, mixer.dt_bias, mixer.norm.weight, mixer.norm.eps)
    block = gdn_steps(projected, positions, *args, caches[0].gdn_layer(0))
    tokens = torch.cat([gdn_steps(projected[:, t:t + 1], positions[:, t:t + 1], *args, caches[1].gdn_layer(0))
                        for t in range(BLOCK)], dim=1)
    assert torch.equal(block, tokens)
    assert torch.equal(caches[0].recurrent[0], caches[1].recurrent[0])
    assert torch.equal(caches[0].conv[0], caches[1].conv[0])
    assert torch.equal(caches[0].steps[0, :, -1], caches[1].steps[0, :, 0])  # the last token's state, kept both ways
