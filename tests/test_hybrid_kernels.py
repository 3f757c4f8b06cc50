"""The kernels of hybrid (Qwen3.5) targets against the torch ops they replace: the Gated DeltaNet kernels
(kernels/gdn.py, target/gdn.py's torch path), zero-centred RMSNorms, partial RoPE, decode attention at head dim 256,
and whole greedy decodes through all of them.

Runs on a CUDA machine, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1), in fp32 there (bf16 in the
interpreter rounds its own way); skipped otherwise.
"""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

from blockspec.engine import BatchDecoder  # noqa: E402
from blockspec.kernels import attention, current_settings, use_settings  # noqa: E402
from blockspec.kernels.attention import decode_attention  # noqa: E402
from blockspec.kernels.gdn import gdn_steps  # noqa: E402
from blockspec.kernels.norm_rope import add_rms_norm, qkv_rope_store, rms_norm  # noqa: E402
from blockspec.kernels.settings import tables_for  # noqa: E402
from blockspec.layers import RMSNorm, RotaryEmbedding  # noqa: E402
from blockspec.layers import qkv_rope_store as qkv_rope_store_ops  # noqa: E402
from blockspec.target import target_from_hf  # noqa: E402
from blockspec.target.gdn import delta_rule_chunked  # noqa: E402
from conftest import build_draft, generate_in_groups  # noqa: E402
from test_hybrid import LAYER_TYPES, TEXT_SHAPE, greedy, prompts_of, randomise_, tiny_qwen35  # noqa: E402
from test_kernels import reference_attention  # noqa: E402

DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])

ROWS, PROMPT, BLOCK = 3, 12, 8


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Under the interpreter the tensors are on the CPU: let the GDN layers and the cache's commit take the kernels
    anyway (KernelSettings.fused_gdn still chooses)."""
    if INTERPRET:
        for module in ("blockspec.target.gdn", "blockspec.cache"):
            monkeypatch.setattr(f"{module}.fused_kernels_apply", lambda *tensors: True)


def tiny_target(seed: int, dtype: torch.dtype = torch.float32, **shape):
    return target_from_hf(tiny_qwen35(seed=seed, **shape)).model.to(DEVICE, dtype)


def decode_session(model, fused: bool, rollback: str) -> tuple[list[torch.Tensor], object]:
    """Prefill (the torch chunked form either way), a decode token, a verify block in which row 0 starts a new sequence
    at position 0, a ragged commit, then another decode token: the logits of each pass, and the cache."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (ROWS, PROMPT + 2 + BLOCK), generator=gen).to(DEVICE)
    cache = model.new_cache(ROWS, 48, verify_tokens=BLOCK, rollback=rollback)
    logits = []
    with torch.no_grad(), use_settings(fused_gdn=fused, fla_prefill=False):
        def run(tokens, positions, commit_follows=False):
            hidden, _ = model(tokens, positions.to(DEVICE), cache, commit_follows=commit_follows)
            logits.append(model.logits(hidden))

        run(ids[:, :PROMPT], torch.arange(PROMPT)[None].expand(ROWS, -1))
        run(ids[:, PROMPT:PROMPT + 1], torch.full((ROWS, 1), PROMPT))
        positions = PROMPT + 1 + torch.arange(BLOCK)[None].repeat(ROWS, 1)
        positions[0] = torch.arange(BLOCK)  # a new sequence in row 0
        run(ids[:, PROMPT + 1:PROMPT + 1 + BLOCK], positions, commit_follows=True)
        keep = torch.tensor([3, BLOCK, 1], device=DEVICE)
        cache.commit(keep)
        run(ids[:, -1:], (positions.to(DEVICE).gather(1, keep[:, None] - 1) + 1))
    return logits, cache


@pytest.mark.parametrize("rollback, tile, deferred", [("states", None, False), ("replay", None, False),
                                                      ("replay", None, True),
                                                      ("replay", {"value_dims": 4, "warps": 2}, True)])
def test_decode_verify_and_commit_through_the_kernels_match_the_torch_ops(kernels_on_cpu, rollback, tile, deferred):
    """Also with a program tile other than the table's (half of an 8-dim value head a program, where the table's 8
    takes it whole: the tiling benchmarks/gdn_tiles.py varies; the last of a head's tiles applies the gated norm and
    leaves the head's arrival count at zero for the next launch), and with the commit's replay deferred to the next
    decode, which applies it before its token."""
    model = tiny_target(seed=21)
    with use_settings(gdn_tile=tile, defer_replay_rows=1 if deferred else ROWS + 1):
        got_logits, got = decode_session(model, True, rollback)
    want_logits, want = decode_session(model, False, rollback)
    for g, w in zip(got_logits, want_logits):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)
    names = ["conv", "recurrent", "windows", "arrivals"] + (["steps"] if rollback == "states" else
                                                ["tape_k", "tape_decay", "tape_u"])
    for name in names:
        torch.testing.assert_close(getattr(got, name), getattr(want, name), atol=1e-5, rtol=1e-5, msg=name)
    assert got.recurrent.abs().amax() > 0.01 and got.recurrent[:, 0].abs().amax() > 0  # real states, row 0 too
    assert (got.pending is not None) == deferred and (not deferred or not got.pending.any())  # the decode applied it


@pytest.mark.parametrize("deferred", [False, True], ids=["replayed", "deferred"])
def test_replay_commit_equals_the_kernels_per_position_states_bit_for_bit(kernels_on_cpu, deferred):
    """The replay at commit, and the replay deferred into the next decode, reach the kept states bit for bit."""
    model = tiny_target(seed=22)
    _, states = decode_session(model, True, "states")
    with use_settings(defer_replay_rows=1 if deferred else ROWS + 1):
        _, replay = decode_session(model, True, "replay")
    assert torch.equal(states.recurrent, replay.recurrent) and torch.equal(states.conv, replay.conv)


def test_a_deferred_commit_moves_with_its_row_and_settles_before_a_prefill(kernels_on_cpu):
    """On the kernels' path a "replay" commit leaves its updates pending: a row that moves takes them along, the next
    verify applies them before its block (and its tape then holds the block's updates for the next commit), and a
    forward that reads the state as it stands (here a prefill continuing the rows, which takes the torch ops) applies
    them first; the states and logits equal those after eager commits (the torch ops' replay)."""
    model = tiny_target(seed=24)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 64, (ROWS, PROMPT + 2 * BLOCK + 2 * BLOCK), generator=gen).to(DEVICE)
    keep, again = torch.tensor([3, BLOCK, 1], device=DEVICE), torch.tensor([2, 1, BLOCK], device=DEVICE)
    results = []
    for deferred in (True, False):
        with torch.no_grad(), use_settings(fla_prefill=False, defer_replay_rows=1):
            cache = model.new_cache(ROWS + 1, 64, verify_tokens=BLOCK, rollback="replay")
            rows = cache.rows(0, ROWS)
            model(ids[:, :PROMPT], torch.arange(PROMPT, device=DEVICE)[None].expand(ROWS, -1), rows)
            model(ids[:, PROMPT:PROMPT + BLOCK], PROMPT + torch.arange(BLOCK, device=DEVICE)[None].expand(ROWS, -1),
                  rows, commit_follows=True)
            with use_settings(fused_gdn=deferred):
                rows.commit(keep)
            assert bool((cache.pending[:, :ROWS] == keep.int()[:, None]).all()) == deferred
            cache.copy_row(0, ROWS, PROMPT + BLOCK)  # row 0 moves to the spare row
            moved, order = cache.rows(1, ROWS + 1), [1, 2, 0]
            start = (PROMPT + keep[order])[:, None] + torch.arange(BLOCK, device=DEVICE)
            model(ids[order, PROMPT + BLOCK:PROMPT + 2 * BLOCK], start, moved, commit_follows=True)
            with use_settings(fused_gdn=deferred):
                moved.commit(again)
            start = start[:, :1] + again[:, None] + torch.arange(2 * BLOCK, device=DEVICE)
            hidden, _ = model(ids[order, PROMPT + 2 * BLOCK:], start, moved)
            assert not cache.pending[:, 1:].any()  # settled (row 0, left behind, is free)
        results.append((model.logits(hidden), cache.recurrent[:, 1:].clone(), cache.conv[:, 1:].clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert results[0][1].abs().amax() > 0.01


@pytest.mark.parametrize("defer_rows", [1, 2], ids=["every-commit", "two-rows"])
def test_an_engine_that_defers_its_commits_keeps_the_targets_own_tokens(kernels_on_cpu, defer_rows):
    """Ragged acceptance (an oracle over the target's own continuation of one prompt, three requests in two rows, so
    rows join mid-run at another point of the schedule) with every commit deferred, or those of two rows (a step of
    one row after a deferred commit of two then settles first and runs the kernel that does not defer): the tokens
    are plain decoding's, as through the torch ops."""
    from benchmarks.oracle import OracleProposer
    from blockspec.engine import DraftProposer

    target = target_from_hf(tiny_qwen35(vocab=64, seed=3))
    target.model.to(DEVICE)
    draft = build_draft(target.model.config, "dflash", seed=7, num_layers=2, block_size=8,
                        target_layer_ids=[1, 2, 4]).to(DEVICE)
    prompt, lengths = prompts_of([9], 64, seed=14)[0], (20, 13, 17)
    plain = BatchDecoder(target, None, max_batch=1, max_len=96).generate([prompt], greedy(max(lengths)))[0].token_ids
    reference = torch.tensor(prompt + plain + [0] * 64)

    def generate(fused: bool) -> list[tuple[list[int], list[int]]]:
        with use_settings(fused_gdn=fused, defer_replay_rows=defer_rows):
            oracle = OracleProposer(DraftProposer(draft, target.model), reference, [3, 0, 6, 1, 7, 2, 5], 64, DEVICE)
            decoder = BatchDecoder(target, oracle, max_batch=2, max_len=96, use_graphs=False)
            results = decoder.generate([prompt] * 3, [greedy(n) for n in lengths])
            assert decoder.target_cache.deferred_commits == [fused]
        return [(r.token_ids, r.stats.acceptance_lengths) for r in results]

    got = generate(True)
    assert got == generate(False) and [tokens for tokens, _ in got] == [plain[:n] for n in lengths]
    kept = [n for _, accepted in got for n in accepted]
    assert min(kept) == 1 and max(kept) >= 6  # ragged: steps that keep one token and steps that keep most


def mixer_launch(seed: int, rollback: str, rows: int = ROWS, tokens: int = BLOCK, **shape
                 ) -> tuple[torch.Tensor, tuple, list]:
    """A tiny target's first Gated DeltaNet layer: random projections [rows, tokens, in_proj's width], the rest of
    `gdn_steps`'s arguments, and two caches holding the same random conv and recurrent states."""
    model = tiny_target(seed=seed, **shape)
    mixer = model.layers[0].linear_attn
    gen = torch.Generator().manual_seed(seed)
    projected = torch.randn(rows, tokens, mixer.in_proj.weight.shape[0], generator=gen).to(DEVICE)
    caches = [model.new_cache(rows, 32, verify_tokens=BLOCK, rollback=rollback) for _ in range(2)]
    for cache in caches:
        cache.keeps_steps(BLOCK)
        torch.manual_seed(seed)
        cache.conv.normal_()
        cache.recurrent.normal_()
    return projected, (mixer.conv1d.weight, mixer.A_log, mixer.dt_bias, mixer.norm.weight, mixer.norm.eps), caches


def test_a_verify_block_and_one_token_decodes_run_the_same_arithmetic(kernels_on_cpu):
    """The kernel's per-token work does not depend on the block: n tokens in one launch and one launch per token
    give bit-identical outputs, conv and recurrent states (row 0 starting a new sequence at position 0)."""
    projected, args, caches = mixer_launch(23, "states")
    positions = (5 + torch.arange(BLOCK))[None].repeat(ROWS, 1)
    positions[0] -= 5
    positions = positions.to(DEVICE)
    block = gdn_steps(projected, positions, *args, caches[0].gdn_layer(0))
    tokens = torch.cat([gdn_steps(projected[:, t:t + 1], positions[:, t:t + 1], *args, caches[1].gdn_layer(0))
                        for t in range(BLOCK)], dim=1)
    assert torch.equal(block, tokens)
    assert torch.equal(caches[0].recurrent[0], caches[1].recurrent[0])
    assert torch.equal(caches[0].conv[0], caches[1].conv[0])
    assert torch.equal(caches[0].steps[0, :, -1], caches[1].steps[0, :, 0])  # the last token's state, kept both ways


@pytest.mark.parametrize("tokens", [1, BLOCK])
def test_conv_weights_held_taps_major_change_no_bit(tokens, kernels_on_cpu):
    """prepare_fast_path holds each Gated DeltaNet's conv weight taps-major (a tap's channels contiguous, which the
    inputs kernel reads as vectors): a decode and a verify through the kernels give the outputs and the conv and
    recurrent states of Hugging Face's layout, bit for bit (row 0 starting a new sequence)."""
    model = tiny_target(seed=31)
    mixer = model.layers[0].linear_attn
    before = mixer.conv1d.weight.detach().clone()
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(ROWS, tokens, model.config.hidden_size, generator=gen).to(DEVICE)
    positions = (5 + torch.arange(tokens))[None].repeat(ROWS, 1)
    positions[0] -= 5
    caches = [model.new_cache(ROWS, 32, verify_tokens=BLOCK) for _ in range(2)]
    outputs = []
    for cache in caches:
        torch.manual_seed(31)
        cache.conv.normal_()
        cache.recurrent.normal_()
        with torch.no_grad():
            outputs.append(mixer.mix(x, positions.to(DEVICE), cache))
        model.prepare_fast_path()  # the second pass reads the weight taps-major
    weight = mixer.conv1d.weight
    assert weight.stride() == (1, weight.shape[0], weight.shape[0]) and torch.equal(weight, before)
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(caches[0].conv, caches[1].conv) and torch.equal(caches[0].recurrent, caches[1].recurrent)
    assert caches[0].conv.abs().amax() > 0.01 and outputs[0].abs().amax() > 0.01


def test_ragged_rows_stop_their_states_at_their_own_length(kernels_on_cpu):
    """Prompts prefilled together are right-padded: with `lengths` each row's recurrent and conv state after the
    launch equal, bit for bit, those of its own tokens alone (a padding token leaves the state as it was)."""
    projected, args, caches = mixer_launch(24, "replay")
    positions = (5 + torch.arange(BLOCK))[None].repeat(ROWS, 1).to(DEVICE)
    lengths = torch.tensor([3, BLOCK, 5], device=DEVICE)
    gdn_steps(projected, positions, *args, caches[0].gdn_layer(0), lengths)
    for row, n in enumerate(lengths.tolist()):
        gdn_steps(projected[row:row + 1, :n], positions[row:row + 1, :n], *args,
                  caches[1].rows(row, row + 1).gdn_layer(0))
    assert torch.equal(caches[0].recurrent[0], caches[1].recurrent[0])
    assert torch.equal(caches[0].conv[0], caches[1].conv[0])
    kept = caches[0].conv.shape[-1]
    assert not torch.equal(caches[0].conv[0, 0], caches[0].windows[0, 0, -kept:].T)  # row 0 did not take the last


def test_under_batch_invariant_a_row_rounds_alike_alone_and_beside_others(kernels_on_cpu, monkeypatch):
    """Qwen3.5's 128-dim heads under the H100 table, whose tile for 8 rows and more has other warps (so another
    order of the sums over keys) than its one-row tile: with KernelSettings.batch_invariant, row 0 of 8 gives the
    output and states it gives alone, bit for bit."""
    monkeypatch.setattr("blockspec.kernels.settings.device_tables", lambda device: tables_for("NVIDIA H100"))
    rows = 8
    projected, args, caches = mixer_launch(26, "replay", rows=rows, tokens=1, linear_num_key_heads=1,
                                           linear_num_value_heads=2, linear_key_head_dim=128,
                                           linear_value_head_dim=128)
    positions = torch.full((rows, 1), 7, device=DEVICE)
    with use_settings(batch_invariant=True):
        beside = gdn_steps(projected, positions, *args, caches[0].gdn_layer(0))
        alone = gdn_steps(projected[:1], positions[:1], *args, caches[1].rows(0, 1).gdn_layer(0))
    assert torch.equal(beside[:1], alone)
    assert torch.equal(caches[0].tape_u[:, :1], caches[1].tape_u[:, :1])


def torch_chunked_as_fla(q, k, v, g, beta, scale, initial_state, output_final_state):
    """delta_rule_chunked behind flash-linear-attention's calling convention ([b, n, h, ...]; outputs, then state)."""
    state, out = delta_rule_chunked(initial_state, *(t.transpose(1, 2) for t in (q * scale, k, v, g, beta)))
    assert output_final_state
    return out.transpose(1, 2), state


@pytest.mark.parametrize("recurrence, ragged", [("torch", True), ("torch", False), pytest.param(
    "fla", True, marks=pytest.mark.skipif(DEVICE != "cuda", reason="flash-linear-attention runs on a GPU only"))])
def test_a_prefill_through_the_kernels_matches_the_torch_path(recurrence, ragged, kernels_on_cpu, monkeypatch):
    """Prompts prefilled together, right-padded (or all of n tokens): two rows starting a sequence and one
    continuing its own; where ragged, the continuing row and one starting row have fewer tokens than the conv's
    width (the new state takes the old one's last slots, or zeros). The kernels' inputs and gated norm
    around a chunked recurrence (the torch form, or flash-linear-attention's with its tf32 dots) give the torch
    path's outputs, recurrent states, and conv states (gathered from the old state where a row has few tokens)."""
    model = tiny_target(seed=25)
    mixer = model.layers[0].linear_attn
    gen = torch.Generator().manual_seed(25)
    n = 20  # more than the cache's verify window: a prefill
    x = torch.randn(ROWS, n, model.config.hidden_size, generator=gen).to(DEVICE)
    positions = torch.arange(n)[None].repeat(ROWS, 1)
    positions[2] += 7
    positions, lengths = positions.to(DEVICE), torch.tensor([2, n, 2] if ragged else [n] * ROWS, device=DEVICE)
    caches = [model.new_cache(ROWS, 48, verify_tokens=BLOCK) for _ in range(2)]
    for cache in caches:
        torch.manual_seed(25)
        cache.conv.normal_()
        cache.recurrent.normal_()
    if recurrence == "torch":
        monkeypatch.setattr("blockspec.target.gdn.chunked_kernel",
                            lambda x: torch_chunked_as_fla if current_settings().fla_prefill else None)
        tolerance = dict(atol=2e-5, rtol=1e-5)
    else:
        pytest.importorskip("fla")
        tolerance = dict(atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        got = mixer.mix(x, positions, caches[0], lengths if ragged else None)
        with use_settings(fused_gdn=False, fla_prefill=False):
            want = mixer.mix(x, positions, caches[1], lengths if ragged else None)
    for row, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(got[row, :length], want[row, :length], **tolerance)
    torch.testing.assert_close(caches[0].recurrent, caches[1].recurrent, **tolerance)
    assert torch.equal(caches[0].conv, caches[1].conv)
    assert caches[0].recurrent[0].abs().amax() > 0.01 and caches[0].conv[2].abs().amax() > 0.01


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_centred_rms_norms_match_the_torch_ops(dtype):
    gen = torch.Generator().manual_seed(3)
    for width in (576, 16):
        norm = RMSNorm(width, 1e-6, zero_centred=True).to(DEVICE, dtype)
        norm.weight.data = (0.3 * torch.randn(width, generator=gen)).to(DEVICE, dtype)
        x, delta = (torch.randn(5, width, generator=gen).to(DEVICE, dtype) for _ in range(2))
        with use_settings(fused_kernels=False):
            want = norm(x)
            want_sum = x + delta
            want_normed = norm(want_sum)
        tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(rms_norm(x, norm.weight, 1e-6, zero_centred=True), want, **tolerance)
        total, normed = add_rms_norm(x, delta, norm.weight, 1e-6, zero_centred=True)
        assert torch.equal(total, want_sum)
        torch.testing.assert_close(normed, want_normed, **tolerance)
        plain = rms_norm(x, norm.weight, 1e-6)  # the plain form is another function of the weight
        assert (plain.float() - want.float()).abs().max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("zero_centred", [True, False], ids=["zero-centred", "plain"])
def test_partial_rope_with_qk_norms_stores_what_the_torch_ops_store(zero_centred, dtype):
    """Qwen3.5's attention: RoPE on the first quarter of each head (rotate-half within it), the rest passed through,
    after per-head q/k RMSNorms; q returned, K and V stored at the positions."""
    gen = torch.Generator().manual_seed(4)
    b, n, heads, kv_heads, d, rotary, length = 2, 5, 4, 2, 32, 8, 40
    norms = [RMSNorm(d, 1e-6, zero_centred).to(DEVICE, dtype) for _ in range(2)]
    for norm in norms:
        norm.weight.data = ((0.0 if zero_centred else 1.0) + 0.3 * torch.randn(d, generator=gen)).to(DEVICE, dtype)
    qkv = torch.randn(b, n, (heads + 2 * kv_heads) * d, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
    positions = (torch.tensor([[3], [17]]) + torch.arange(n)).to(DEVICE)
    rope = RotaryEmbedding(1.0 / 1e7 ** (torch.arange(0, rotary, 2).float() / rotary)).to(DEVICE)
    cos, sin = rope(positions, dtype)
    assert cos.shape[-1] == rotary
    caches = [[torch.zeros(b, kv_heads, length, d, device=DEVICE, dtype=dtype) for _ in range(2)] for _ in range(2)]
    with use_settings(fused_kernels=False):
        want = qkv_rope_store_ops(q, k, v, heads, kv_heads, d, *norms, cos, sin, positions, *caches[0])
    got = qkv_rope_store(q, k, v, heads, kv_heads, d, norms[0].weight, norms[1].weight, 1e-6, cos, sin, positions,
                         *caches[1], zero_centred=zero_centred)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got, want, **tolerance)
    for mine, theirs in zip(caches[1], caches[0]):
        torch.testing.assert_close(mine, theirs, **tolerance)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: str(dtype)[6:])
@pytest.mark.parametrize("batch_invariant", [False, True], ids=["default", "invariant"])
@pytest.mark.parametrize("window", [0, 100])
@pytest.mark.parametrize("queries", [1, 3, 8, 16])
def test_decode_attention_at_qwen35_head_dim_256(queries, window, batch_invariant, dtype, monkeypatch):
    """Qwen3.5-4B's attention layers: 16 query and 4 KV heads of 256 dims, one token or a verify block, with a
    sliding window or not, batch-invariant or not; every one of these launches fits the H100's shared memory (one
    fp32 token at 64 keys a tile did not)."""
    if DEVICE == "cpu":  # the interpreter has no shared memory to fit: launch the tiles an H100 would
        monkeypatch.setattr(attention, "max_shared_bytes", lambda t: 232448)
    gen = torch.Generator().manual_seed(queries)
    b, length = 2, 300
    q = torch.randn(b, 16, queries, 256, generator=gen).to(DEVICE, dtype)
    k, v = (torch.randn(b, 4, length, 256, generator=gen).to(DEVICE, dtype) for _ in range(2))
    limits = (torch.tensor([[200], [290 - queries]]) + torch.arange(queries)).to(DEVICE)
    with use_settings(batch_invariant=batch_invariant):
        out = decode_attention(q, k, v, limits, window)
    want = reference_attention(q, k, v, limits, window)
    assert ((out.double() - want).norm() / want.norm()).item() < (1e-5 if dtype == torch.float32 else 1e-2)


def qwen35_shaped(dtype: torch.dtype):
    """A tiny target with Qwen3.5-4B's head shapes: attention heads of 256 (a quarter rotated), GDN heads of 128."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    shape = dict(TEXT_SHAPE, hidden_size=128, intermediate_size=256, head_dim=256, linear_key_head_dim=128,
                 linear_value_head_dim=128)
    cfg = Qwen3_5TextConfig(vocab_size=64, num_hidden_layers=len(LAYER_TYPES), layer_types=LAYER_TYPES,
                            tie_word_embeddings=False, **shape)
    hf = Qwen3_5ForCausalLM(cfg).eval()
    randomise_(hf.named_parameters(), seed=15, std=0.1)
    return target_from_hf(hf.to(DEVICE, dtype))


@pytest.mark.skipif(DEVICE != "cuda", reason="a GPU run (the interpreter takes ~13 s a forward: decode_session "
                                             "covers the GDN kernels there)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rollback", ["states", "replay"])
def test_greedy_decoding_through_the_kernels_equals_the_torch_ops_graphed_and_eager(rollback, dtype):
    """A Qwen3.5-shaped target with a DFlash draft, batched with ragged acceptance: in fp32 the tokens through the
    kernels, eager and graphed, are those of the plain torch ops; in bf16 (where the two round differently) graphed
    and eager kernel runs agree."""
    target = qwen35_shaped(dtype)
    draft = build_draft(target.model.config, "dflash", seed=7, num_layers=2, block_size=8,
                        target_layer_ids=[1, 2, 4]).to(DEVICE, dtype)
    prompts = prompts_of([7, 13, 30], 64, seed=14)
    params = [greedy(40), greedy(25), greedy(33)]

    def generate(use_graphs: bool):
        decoder = BatchDecoder(target, draft, max_batch=4, max_len=128, rollback=rollback, use_graphs=use_graphs)
        return [(r.token_ids, r.stats.acceptance_lengths) for r in decoder.generate(prompts, params)]

    eager = generate(False)
    assert generate(True) == eager
    if dtype == torch.float32:
        with use_settings(fused_kernels=False):
            assert generate(False) == eager
    assert len(set(eager[0][0])) > 8 and any(max(lengths) > 1 for _, lengths in eager)


@pytest.mark.skipif(DEVICE != "cuda", reason="flash-linear-attention runs on a GPU only (its kernels do not run under "
                                             "Triton's interpreter)")
def test_a_prefill_through_flash_linear_attention_matches_the_torch_chunked_form():
    pytest.importorskip("fla")
    from blockspec.target.gdn import delta_rule_chunked, l2_normalise, prefill_delta_rule

    gen = torch.Generator().manual_seed(16)
    b, h, n, d = 2, 8, 300, 128
    q, k = (l2_normalise(torch.randn(b, h, n, d, generator=gen)).to(DEVICE) for _ in range(2))
    v = torch.randn(b, h, n, d, generator=gen).to(DEVICE)
    g = -torch.rand(b, h, n, generator=gen).to(DEVICE)
    beta = torch.rand(b, h, n, generator=gen).to(DEVICE)
    state = torch.randn(b, h, d, d, generator=gen).to(DEVICE)
    want_state, want = delta_rule_chunked(state, q * d ** -0.5, k, v, g, beta)
    got_state, got = prefill_delta_rule(state, q * d ** -0.5, k, v, g, beta)
    for mine, theirs in ((got, want), (got_state, want_state)):
        assert mine.shape == theirs.shape
        assert ((mine.double() - theirs.double()).norm() / theirs.double().norm()).item() < 1e-2


def test_a_head_dim_with_its_own_attention_entry_launches_with_it():
    from blockspec.kernels.attention import attention_config
    from blockspec.kernels.settings import tables_for

    table = {kind: {"splits": splits, "block_n": 32, "num_warps": 4}
             for kind, splits in (("narrow", 8), ("wide", 16), ("wide_d256", 32))}
    with use_settings(attention_table=table):
        assert attention_config(16, torch.device(DEVICE), 256)["splits"] == 32
        assert attention_config(16, torch.device(DEVICE), 128)["splits"] == 16
        assert attention_config(1, torch.device(DEVICE), 256)["splits"] == 8  # no narrow_d256: the narrow entry
    assert tables_for("NVIDIA H100 80GB HBM3").attention["wide_d256"]["splits"] == 32


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
@pytest.mark.parametrize("rollback", ["states", "replay"])
def test_prompts_joining_in_small_groups_replay_a_captured_prefill(rollback, monkeypatch):
    """Groups of one or two requests join while others decode (four rows: steps of three defer their commits): each
    group is prefilled padded in the last rows, from a graph per group size and padded length captured at its first
    group, then moves to its rows (a group of two from rows 2-3 into 1-2). The same requests run twice, the second
    time replaying every graph. In fp32 every request's tokens and acceptance are the eager engine's."""
    target = qwen35_shaped(torch.float32)
    draft = build_draft(target.model.config, "dflash", seed=7, num_layers=2, block_size=8,
                        target_layer_ids=[1, 2, 4]).to(DEVICE)
    prompts = prompts_of([7, 13, 30, 100, 9, 140, 20, 11], 64, seed=17)
    params = [greedy(n) for n in (30, 12, 25, 18, 20, 15, 22, 14)]
    joins = []
    prefill = BatchDecoder._prefill_in_last_rows
    monkeypatch.setattr(BatchDecoder, "_prefill_in_last_rows",
                        lambda self, first, ids, *a: joins.append((first, len(ids), a[1])) or prefill(
                            self, first, ids, *a))

    def generate(use_graphs: bool):
        decoder = BatchDecoder(target, draft, max_batch=4, max_len=256, rollback=rollback, use_graphs=use_graphs)
        results = [r for _ in range(2) for r in generate_in_groups(decoder, prompts, params, groups=[1, 2, 1, 2, 2])]
        return [(r.token_ids, r.stats.acceptance_lengths) for r in results], decoder

    eager, _ = generate(False)
    assert not joins  # an eager engine prefills a group as it is
    graphed, decoder = generate(True)
    assert graphed == eager
    assert joins[:3] == [(0, 1, 128), (1, 2, 128), (3, 1, 128)] and sum(g for _, g, _ in joins) == 16
    assert joins[:len(joins) // 2] == joins[len(joins) // 2:]  # the second pass replayed the first's graphs
    assert all(join.graph is not None for join in decoder._join_graphs.values())
