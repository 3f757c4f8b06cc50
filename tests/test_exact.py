"""Batch-invariant kernels (`KernelSettings.batch_invariant`, `--exact`): a row's result does not depend on how
many rows run with it nor on what they hold, so a verify row equals a one-token decode bit for bit and speculative
tokens equal plain decoding's in bf16.

Runs on a CUDA machine in bf16, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1) in fp16 and fp32
(its numpy emulation of bf16 is broken, and it runs every program alike, so there it checks the kernels' logic
-- the same tiles, offsets and order for every row count -- not the GPU's rounding); skipped otherwise.
"""

import os

import pytest
import torch

from blockspec.kernels import use_settings

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the 16-bit dtype the exact GEMM serves here

import blockspec.kernels.attention as attention_module  # noqa: E402
from blockspec.kernels.attention import decode_attention  # noqa: E402
from blockspec.kernels.norm_rope import add_rms_norm, qkv_rope_store, rms_norm, silu_mul  # noqa: E402
from blockspec.kernels.skinny import invariant_config, skinny_argmax, skinny_linear  # noqa: E402
from blockspec.layers import linear, linear_argmax  # noqa: E402
from test_kernels import reference_attention  # noqa: E402

ROWS = (1, 16, 256)


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """Under the interpreter the tensors live on the CPU: let layers.py take the kernel paths anyway."""
    if INTERPRET:
        monkeypatch.setattr("blockspec.layers.fused_kernels_apply", lambda *tensors: True)


def rows_agree(full: torch.Tensor, part: torch.Tensor) -> bool:
    return torch.equal(full[:part.shape[0]], part)


# a tiny Qwen3's projections (qkv, o_proj, gate_up, down, lm_head) and two that split K under the default config
# (64 x 512: two K ranges; 96 x 1100: two ragged ones)
SHAPES = [(128, 64), (64, 64), (256, 64), (64, 128), (97, 64), (64, 512), (96, 1100)]


@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_every_projection_gives_each_row_the_same_bits_for_1_16_and_256_rows(n, k, bias, kernels_on_cpu):
    """layers.linear and linear_argmax under batch_invariant: the first rows of a 256-row product equal the same
    rows run alone, as 16, and inside a batch in another order; the argmax equals argmax of those logits."""
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(max(ROWS), k, generator=gen).to(DEVICE, HALF)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(DEVICE, HALF)
    b = torch.randn(n, generator=gen).to(DEVICE, HALF) if bias else None
    with use_settings(batch_invariant=True):
        full = linear(x, w, b)
        assert all(rows_agree(full, linear(x[:m], w, b)) for m in ROWS[:-1])
        order = torch.randperm(max(ROWS), generator=gen).to(DEVICE)
        assert torch.equal(linear(x[order], w, b), full[order])  # the rows' places in the tiles change
        assert torch.equal(linear(x.view(16, 16, k), w, b).view(-1, n), full)  # a [rows, block] verify pass
        if not bias:
            choices = linear_argmax(x, w)
            assert torch.equal(choices, full.argmax(-1))
            assert all(rows_agree(choices, linear_argmax(x[:m], w)) for m in ROWS[:-1])
    expected = torch.nn.functional.linear(x.double(), w.double(), b.double() if bias else None)
    assert ((full.double() - expected).norm() / expected.norm()).item() < 1e-2


@pytest.mark.parametrize("dtype", [HALF, torch.float32], ids=["half", "fp32"])
def test_skinny_gemm_is_row_invariant_under_any_one_config(dtype):
    """The kernel itself (as batch_invariant launches it: one binary for every row count) under explicit configs,
    with and without split K, ragged tiles, fp32 too: 1, 16 and 256 rows, and the fused argmax likewise."""
    gen = torch.Generator().manual_seed(1)
    configs = [{"rows": 16, "block_n": 32, "block_k": 64, "split_k": split, "num_warps": 4, "num_stages": 2}
               for split in (1, 3)]
    n, k = 100, 300
    x = torch.randn(max(ROWS), k, generator=gen).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype)
    for config in configs:
        with use_settings(batch_invariant=True):
            full = skinny_linear(x, w, b, config)
            assert all(rows_agree(full, skinny_linear(x[:m], w, b, config)) for m in ROWS[:-1]), config
            if config["split_k"] == 1:
                choices = skinny_argmax(x, w, config)
                assert torch.equal(choices, skinny_linear(x, w, None, config).argmax(-1))
                assert all(rows_agree(choices, skinny_argmax(x[:m], w, config)) for m in ROWS[:-1])
        expected = torch.nn.functional.linear(x.double(), w.double(), b.double())
        assert ((full.double() - expected).norm() / expected.norm()).item() < (1e-5 if dtype == torch.float32 else 1e-2)


def test_invariant_config_is_one_block_config_per_shape():
    """One config per weight shape whatever the rows: the table's 16-row entry where it has one (never its
    one-row entry, nor cuBLAS where it measured faster), else the default."""
    from blockspec.kernels.settings import tables_for

    h100 = tables_for("NVIDIA H100 80GB HBM3").skinny
    with use_settings(skinny_table=h100):
        assert invariant_config(19456, 2560, torch.device(DEVICE)) == h100[(19456, 2560)][16]
        assert h100[(19456, 2560)][1] != h100[(19456, 2560)][16]  # the per-row-count table would differ
        ctx_kv = invariant_config(2048, 2560, torch.device(DEVICE))  # the table keeps cuBLAS for this one
        assert h100[(2048, 2560)][16] is None and ctx_kv["rows"] == 16
        assert invariant_config(96, 1100, torch.device(DEVICE))["rows"] == 16


def attention_case(b: int, heads: int, kv_heads: int, d: int, length: int, n: int, seed: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, n, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(b, kv_heads, length, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(b, kv_heads, length, d, generator=gen).to(DEVICE, dtype)
    starts = torch.tensor([length - n - 7, 3, 260][:b])
    limits = (starts[:, None] + torch.arange(n)).to(DEVICE)
    return q, k, v, limits


@pytest.mark.parametrize("dtype", [HALF, torch.float32], ids=["half", "fp32"])
@pytest.mark.parametrize("window", [0, 100])
@pytest.mark.parametrize("group, d", [(4, 64), (3, 16)])
def test_attention_gives_each_query_the_same_bits_for_1_16_and_more_queries(dtype, window, group, d, monkeypatch):
    """A prefill of 24 queries (more than a tile: any number takes the kernel), a 16-query verify block and a
    one-token decode at the same positions agree bit for bit, as does a row alone against the same row in a
    batch of rows with other lengths, a larger cache (more idle splits), several launches (the partial sums'
    scratch budget cut down) and the draft's one-limit-per-row form; all near the float64 reference."""
    n = 24
    q, k, v, limits = attention_case(2, group, 1, d, 560, n, seed=group + d, dtype=dtype)
    with use_settings(batch_invariant=True):
        full = decode_attention(q, k, v, limits, window)
        block = decode_attention(q[:, :, 5:21], k, v, limits[:, 5:21], window)
        assert torch.equal(block, full[:, 5:21])
        for i in (0, 17, 23):
            assert torch.equal(decode_attention(q[:, :, i:i + 1], k, v, limits[:, i:i + 1], window), full[:, i:i + 1])
        alone = decode_attention(q[1:2], k[1:2], v[1:2], limits[1:2], window)
        assert torch.equal(alone, full[1:2])
        longer = [torch.cat([c, torch.randn_like(c)[:, :, :300]], 2) for c in (k, v)]
        assert torch.equal(decode_attention(q, *longer, limits, window), full)
        monkeypatch.setattr(attention_module, "SCRATCH_BYTES", 1)  # one tile of 16 queries per launch
        assert torch.equal(decode_attention(q, k, v, limits, window), full)
        shared = limits[:, -1:].expand_as(limits)  # the draft: every query of a row sees the same slots
        assert torch.equal(decode_attention(q, k, v, shared, window)[:, :16],
                           decode_attention(q[:, :, :16], k, v, shared[:, :16], window))
    reference = reference_attention(q, k, v, limits, window)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((full.double() - reference).norm() / reference.norm()).item() < tolerance


def test_norms_silu_and_rope_kernels_are_per_row():
    """RMSNorm, add + RMSNorm, silu * up and q/k norm + RoPE + cache store: one program per row (per token and
    head) with a fixed shape, so 1, 16 and 256 rows agree bit for bit without any setting."""
    gen = torch.Generator().manual_seed(3)
    x, delta = (torch.randn(max(ROWS), 576, generator=gen).to(DEVICE, HALF) for _ in range(2))
    weight = torch.rand(576, generator=gen).to(DEVICE, HALF)
    gate_up = torch.randn(max(ROWS), 2 * 384, generator=gen).to(DEVICE, HALF)
    normed, (total, added) = rms_norm(x, weight, 1e-6), add_rms_norm(x, delta, weight, 1e-6)
    act = silu_mul(gate_up[:, 0::2], gate_up[:, 1::2])
    for m in ROWS[:-1]:
        assert rows_agree(normed, rms_norm(x[:m], weight, 1e-6))
        assert all(map(rows_agree, (total, added), add_rms_norm(x[:m], delta[:m], weight, 1e-6)))
        assert rows_agree(act, silu_mul(gate_up[:m, 0::2], gate_up[:m, 1::2]))
    heads, kv_heads, d, n = 4, 2, 64, 32
    qkv = torch.randn(1, n, (heads + 2 * kv_heads) * d, generator=gen).to(DEVICE, HALF)
    cos, sin = (torch.randn(1, n, d, generator=gen).to(DEVICE, HALF) for _ in range(2))
    norms = [torch.rand(d, generator=gen).to(DEVICE, HALF) for _ in range(2)]
    positions = (torch.arange(n) + 9)[None].to(DEVICE)

    def rope(first: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = [torch.zeros(1, kv_heads, 64, d, device=DEVICE, dtype=HALF) for _ in range(2)]
        q, k, v = qkv[:, first:stop].split([heads * d, kv_heads * d, kv_heads * d], -1)
        out = qkv_rope_store(q, k, v, heads, kv_heads, d, *norms, 1e-6, cos[:, first:stop], sin[:, first:stop],
                             positions[:, first:stop], *cache)
        return out, cache[0]

    q_all, k_all = rope(0, n)
    q_one, k_one = rope(5, 6)
    assert torch.equal(q_one, q_all[:, :, 5:6]) and torch.equal(k_one[:, :, 14], k_all[:, :, 14])


def tiny_qwen3(seed: int = 0):
    """A Qwen3-shaped random target (GQA 2:1, q/k norms), varied enough that its greedy output is not one token."""
    from blockspec.target import Target, TargetConfig, TargetModel

    layers = 2
    cfg = TargetConfig("qwen3", 97, 64, 128, layers, 4, 2, 16, 1e-6, True, False, False, False, False,
                       (None,) * layers, 4096)
    model = TargetModel.random(cfg, seed=seed, std=0.3, rope_theta=10000.0)
    with torch.no_grad():
        model.embed_tokens.weight.mul_(3.0)
    return Target(model=model.to(DEVICE, HALF), tokenizer=None, name="tiny-qwen3", eos_token_ids=())


def test_a_verify_block_equals_one_token_passes_bit_for_bit(kernels_on_cpu):
    """The whole target under batch_invariant: the prompt prefilled (31 tokens: past the 16 queries of a block),
    then 16 tokens as one verify pass in a batch of 3 rows, and the same 16 tokens as 16 one-token passes of a
    lone row: the final hidden states, the greedy choices and the cached K/V agree bit for bit."""
    model = tiny_qwen3().model
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 97, (3, 31), generator=gen).to(DEVICE)
    block = torch.randint(0, 97, (3, 16), generator=gen).to(DEVICE)
    with use_settings(batch_invariant=True), torch.inference_mode():
        batched = model.new_cache(3, 64)
        lengths = [31, 20, 9]  # each row its own prompt length; the block follows it
        for row, length in enumerate(lengths):
            model(prompt[row:row + 1, :length], torch.arange(length, device=DEVICE)[None],
                  batched.rows(row, row + 1), kv_len=length)
        positions = torch.tensor(lengths, device=DEVICE)[:, None] + torch.arange(16, device=DEVICE)
        verified, _ = model(block, positions, batched, kv_len=64)
        verified_choices = model.greedy_tokens(verified)
        alone = model.new_cache(1, 64)
        model(prompt[:1], torch.arange(31, device=DEVICE)[None], alone, kv_len=31)
        steps = [model(block[:1, i:i + 1], positions[:1, i:i + 1], alone, kv_len=64)[0] for i in range(16)]
    stepped = torch.cat(steps, 1)
    assert torch.equal(verified[:1], stepped)
    assert torch.equal(verified_choices[:1], model.greedy_tokens(stepped))
    assert torch.equal(batched.k[:, :1, :, :47], alone.k[:, :, :, :47])
    assert torch.equal(batched.v[:, :1, :, :47], alone.v[:, :, :, :47])
    assert len(set(verified_choices.flatten().tolist())) > 3


@pytest.mark.skipif(DEVICE != "cuda", reason="the engine end to end on the GPU (bf16, CUDA graphs)")
@pytest.mark.parametrize("block", [4, 8, 16])
def test_speculative_tokens_equal_plain_decoding_in_bf16(block):
    """The switch's promise on the GPU: with blocks accepted to varied depths (an oracle proposes plain decoding's
    own tokens, right for a scheduled number of slots), speculative greedy tokens equal plain decoding's over 96
    tokens; and rows decoded together, graphed and padded, equal each decoded alone."""
    from benchmarks.oracle import OracleProposer
    from blockspec.draft import new_draft_for_target
    from blockspec.engine import BatchDecoder, DraftProposer, SamplingParams, SpeculativeDecoder

    target = tiny_qwen3(seed=block)
    model = target.model
    draft = new_draft_for_target(model.config, "dflash", num_layers=1, block_size=16, seed=2).to(DEVICE, HALF)
    params = SamplingParams(max_new_tokens=96, ignore_eos=True)
    gen = torch.Generator().manual_seed(block)
    prompts = [torch.randint(0, 97, (length,), generator=gen).tolist() for length in (5, 23, 40, 11)]
    with use_settings(batch_invariant=True):
        plain = [SpeculativeDecoder(target, None, max_len=256).generate(p, params).token_ids for p in prompts]
        for prompt, want in zip(prompts, plain):
            oracle = OracleProposer(DraftProposer(draft, model), prompt + want, [block - 1, 0, 2, block // 2, 1],
                                    model.config.vocab_size, DEVICE)
            got = SpeculativeDecoder(target, oracle, block_size=block, max_len=256).generate(prompt, params)
            assert got.token_ids == want
            assert max(got.stats.acceptance_lengths) == block  # whole blocks were accepted too
        batch = BatchDecoder(target, draft, max_batch=4, max_len=256, block_size=block)
        assert [r.token_ids for r in batch.generate(prompts, params)] == plain
    assert len(set(plain[0])) > 5


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_seeded_sampling_replayed_as_graphs_equals_the_eager_steps():
    """Sampling steps replayed as CUDA graphs (modes sample and sample_truncated, pipelined, rows joining and
    leaving) commit the tokens the same engine commits eagerly. Under batch_invariant no row's numbers depend on
    the rows beside it nor on the padded batch, so any difference would be the graphs'."""
    from blockspec.draft import new_draft_for_target
    from blockspec.engine import BatchDecoder, SamplingParams

    target = tiny_qwen3(seed=3)
    draft = new_draft_for_target(target.model.config, "dflash", num_layers=1, block_size=8, seed=2).to(DEVICE, HALF)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 97, (length,), generator=gen).tolist() for length in (5, 23, 40, 11, 7, 30)]
    params = [SamplingParams(max_new_tokens=m, temperature=1.0, top_p=0.9 if i % 2 else 1.0, seed=i, ignore_eos=True)
              for i, m in enumerate((40, 25, 33, 48, 20, 37))]
    with use_settings(batch_invariant=True):
        graphed = BatchDecoder(target, draft, max_batch=4, max_len=128).generate(prompts, params)
        eager = BatchDecoder(target, draft, max_batch=4, max_len=128, use_graphs=False).generate(prompts, params)
    assert [r.token_ids for r in graphed] == [r.token_ids for r in eager]
    assert len({t for r in graphed for t in r.token_ids}) > 10  # sampled, not one repeated token
