"""Triton kernels of the CUDA path against the plain torch code they replace.

Runs on a CUDA machine, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1, numpy < 2.3);
skipped otherwise (CI has neither).
"""

import os

import pytest
import torch

from blockspec.layers import RMSNorm, apply_rope, visible_mask

triton = pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"

from blockspec.kernels import use_settings  # noqa: E402
from blockspec.kernels.attention import decode_attention  # noqa: E402
from blockspec.kernels.launch import use_pdl  # noqa: E402
from blockspec.kernels.norm_rope import (add_partials_rms_norm, add_rms_norm, qkv_rope_store, rms_norm,  # noqa: E402
                                         silu_mul)
from blockspec.kernels.skinny import (ARGMAX_COLUMNS, argmax_rows, cublas_partials, skinny_argmax,  # noqa: E402
                                     skinny_linear, skinny_linear_unsummed)


def reference_attention(q, k, v, limits, window):
    b, nh, n, d = q.shape
    group = nh // k.shape[1]
    kk = k.repeat_interleave(group, 1).double()
    vv = v.repeat_interleave(group, 1).double()
    scores = q.double() @ kk.transpose(-1, -2) * d ** -0.5
    scores = scores.masked_fill(~visible_mask(limits, k.shape[2], window or None), float("-inf"))
    return (torch.softmax(scores, -1) @ vv).transpose(1, 2).reshape(b, n, nh * d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 4, 2, 1, 16, 100, 0), (1, 32, 8, 16, 128, 700, 0), (2, 9, 3, 16, 64, 300, 0),
                                   (1, 8, 2, 5, 32, 500, 64), (3, 4, 4, 3, 16, 90, 0), (32, 8, 2, 1, 32, 200, 0),
                                   (24, 8, 2, 8, 32, 200, 0),  # a batch: fewer key splits a row, down to one
                                   (1, 4, 1, 1, 256, 900, 0)])  # head dim 256: a combine of several warps
def test_decode_attention_matches_reference(shape, dtype):
    b, nh, nkv, n, d, length, window = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(b, nh, n, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(b, nkv, length, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(b, nkv, length, d, generator=gen).to(DEVICE, dtype)
    start = torch.randint(0, length - n, (b,), generator=gen)
    limits = (start[:, None] + torch.arange(n)).to(DEVICE)
    out = decode_attention(q, k, v, limits, window)
    ref = reference_attention(q, k, v, limits, window)
    # the draft passes one limit per row, expanded over the block (stride 0)
    block_end = limits[:, -1:].expand_as(limits)
    shared = decode_attention(q, k, v, block_end, window)
    shared_ref = reference_attention(q, k, v, block_end.contiguous(), window)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((shared.double() - shared_ref).norm() / shared_ref.norm()).item() < tolerance
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("rows, n", [(8, 1), (7, 8), (16, 8), (32, 1)])
def test_decode_attention_under_a_tables_row_buckets_matches_reference(rows, n):
    """A table's "rows" settings (other key splits and tiles for a batch: settings.batch_attention_config) change
    how the keys are cut, not the result."""
    entry = {"splits": 16, "block_n": 64, "num_warps": 4, "rows": {"8": {"splits": 4, "block_n": 32},
                                                                   "16": {"splits": 1, "block_n": 64},
                                                                   "32": {"splits": 2, "block_n": 16}}}
    gen = torch.Generator().manual_seed(rows + n)
    q = torch.randn(rows, 8, n, 32, generator=gen).to(DEVICE)
    k, v = (torch.randn(rows, 2, 150, 32, generator=gen).to(DEVICE) for _ in range(2))
    limits = (torch.randint(n, 150, (rows, 1), generator=gen) - n + torch.arange(n)).to(DEVICE)
    with use_settings(attention_table={"narrow": entry, "wide": entry}):
        out = decode_attention(q, k, v, limits)
    ref = reference_attention(q, k, v, limits, 0)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_splits_last_program_combines_them_as_the_combine_kernel_does(dtype, monkeypatch):
    """Each (row, KV head) group's last split program to arrive combines the group's splits: the same bits as the
    combine kernel (which a launch without counters takes), gated or not, and every counter zero again after."""
    from blockspec.kernels import attention

    gen = torch.Generator().manual_seed(7)
    q = torch.randn(3, 8, 5, 32, generator=gen).to(DEVICE, dtype)
    k, v = (torch.randn(3, 2, 200, 32, generator=gen).to(DEVICE, dtype) for _ in range(2))
    limits = (torch.tensor([[40], [150], [194]]) + torch.arange(5)).to(DEVICE)
    gate = torch.randn(3, 5, 8 * 32, generator=gen).to(DEVICE, dtype)
    entry = {"splits": 16, "block_n": 16, "num_warps": 4}  # 5 splits a row for 3 rows
    with use_settings(attention_table={"narrow": entry, "wide": entry}):
        combined = [decode_attention(q, k, v, limits), decode_attention(q, k, v, limits, gate=gate)]
        assert attention._ARRIVALS[q.device].any().item() is False
        monkeypatch.setattr(attention, "ARRIVAL_SLOTS", 0)
        separately = [decode_attention(q, k, v, limits), decode_attention(q, k, v, limits, gate=gate)]
    assert all(torch.equal(a, b) for a, b in zip(combined, separately))
    ref = reference_attention(q, k, v, limits, 0)
    assert ((combined[0].double() - ref).norm() / ref.norm()).item() < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("b, n, invariant", [(1, 1, False), (2, 8, False), (32, 4, False), (2, 5, True)])
def test_an_output_gate_in_the_attention_kernel_equals_gating_its_output(b, n, invariant, dtype):
    """Qwen3.5's out * sigmoid(gate), written by the attention's last kernel (the splits' own store when there is
    one split, as with many rows; the combine otherwise; the fixed-offset splits of batch_invariant), equals the
    two torch ops on the plain output; the gate is a strided view, as it comes out of the fused qkv projection."""
    gen = torch.Generator().manual_seed(b * 10 + n)
    nh, nkv, d, length = 8, 2, 64, 300
    q = torch.randn(b, nh, n, d, generator=gen).to(DEVICE, dtype)
    k, v = (torch.randn(b, nkv, length, d, generator=gen).to(DEVICE, dtype) for _ in range(2))
    limits = (torch.randint(n, length - n, (b, 1), generator=gen) + torch.arange(n)).to(DEVICE)
    fused = torch.randn(b, n, 3 * nh * d, generator=gen).to(DEVICE, dtype) * 3
    gate = fused[..., nh * d:2 * nh * d]
    with use_settings(batch_invariant=invariant):
        plain = decode_attention(q, k, v, limits)
        gated = decode_attention(q, k, v, limits, gate=gate)
    want = plain * torch.sigmoid(gate)
    tolerance = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 1e-3, "rtol": 8e-3}
    torch.testing.assert_close(gated, want, **tolerance)


@pytest.mark.skipif(DEVICE != "cuda", reason="SDPA's CUDA kernels")
@pytest.mark.parametrize("window", [None, 40, 100])
def test_prefill_attention_from_a_prompts_start_and_after_a_cached_prefix(window):
    """Long query blocks: a prompt from its start (as many queries as slots: SDPA's causal kernel) and one after a
    cached prefix (an explicit mask) attend as the float64 reference does, sliding window or not."""
    from blockspec.layers import attention

    gen = torch.Generator().manual_seed(7)
    b, nh, nkv, d, n = 3, 8, 2, 64, 80
    k = torch.randn(b, nkv, 128, d, generator=gen).to(DEVICE, torch.bfloat16)
    v = torch.randn(b, nkv, 128, d, generator=gen).to(DEVICE, torch.bfloat16)
    q = torch.randn(b, nh, n, d, generator=gen).to(DEVICE, torch.bfloat16)
    for start in (0, 30):
        limits = (start + torch.arange(n, device=DEVICE)).expand(b, n)
        got = attention(q, k, v, limits, start + n, window)
        want = reference_attention(q, k[:, :, :start + n], v[:, :, :start + n], limits, window)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rms_norm_and_silu_mul_match_torch(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 576, generator=gen).to(DEVICE, dtype)
    norm = RMSNorm(576, 1e-5).to(DEVICE, dtype)
    norm.weight.data = torch.randn(576, generator=gen).to(DEVICE, dtype)
    x32 = x.float()
    expected = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    got = rms_norm(x, norm.weight, 1e-5)
    assert (got.float() - expected.float()).abs().max().item() <= (1e-5 if dtype == torch.float32 else 2e-2)
    gate_up = torch.randn(3, 2 * 1536, generator=gen).to(DEVICE, dtype)
    gate, up = gate_up.chunk(2, -1)
    expected = torch.nn.functional.silu(gate) * up
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (silu_mul(gate, up).float() - expected.float()).abs().max().item() <= tol
    apart = torch.randn(3, 1536, generator=gen).to(DEVICE, dtype), torch.randn(3, 1536, generator=gen).to(DEVICE, dtype)
    expected = torch.nn.functional.silu(apart[0]) * apart[1]  # separate gate and up projections (the drafts)
    assert (silu_mul(*apart).float() - expected.float()).abs().max().item() <= tol
    gate, up = gate_up[:, 0::2], gate_up[:, 1::2]  # the target's fused layout: (gate j, up j) pairs
    expected = torch.nn.functional.silu(gate) * up
    assert (silu_mul(gate, up).float() - expected.float()).abs().max().item() <= tol
    assert torch.equal(silu_mul(gate, up), silu_mul(gate.contiguous(), up.contiguous()))  # pairs round alike


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qkv_rope_store_matches_torch(qk_norm):
    gen = torch.Generator().manual_seed(1)
    b, n, nh, nkv, d, length = 2, 5, 4, 2, 16, 40
    qkv = torch.randn(b, n, (nh + 2 * nkv) * d, generator=gen).to(DEVICE)
    positions = (torch.tensor([[3], [17]]) + torch.arange(n)).to(DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = positions.float()[..., None].cpu() * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    qn = kn = None
    if qk_norm:
        qn, kn = RMSNorm(d, 1e-6).to(DEVICE), RMSNorm(d, 1e-6).to(DEVICE)
        qn.weight.data = torch.randn(d, generator=gen).to(DEVICE)
        kn.weight.data = torch.randn(d, generator=gen).to(DEVICE)
    k_cache = torch.zeros(b, nkv, length, d, device=DEVICE)
    v_cache = torch.zeros(b, nkv, length, d, device=DEVICE)
    q_src, k_src, v_src = qkv.split([nh * d, nkv * d, nkv * d], -1)  # views into one fused projection
    q = qkv_rope_store(q_src, k_src, v_src, nh, nkv, d, qn.weight if qk_norm else None,
                       kn.weight if qk_norm else None, 1e-6, cos, sin, positions, k_cache, v_cache)
    q_ref, k_ref, v_ref = qkv.split([nh * d, nkv * d, nkv * d], -1)
    q_ref, k_ref = q_ref.view(b, n, nh, d), k_ref.view(b, n, nkv, d)
    if qk_norm:
        x32 = q_ref.float()
        q_ref = qn.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6))
        x32 = k_ref.float()
        k_ref = kn.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6))
    q_ref = apply_rope(q_ref.transpose(1, 2), cos[:, None], sin[:, None])
    k_ref = apply_rope(k_ref.transpose(1, 2), cos[:, None], sin[:, None])
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    for row in range(b):
        slots = positions[row]
        torch.testing.assert_close(k_cache[row][:, slots], k_ref[row], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v_cache[row][:, slots], v_ref.view(b, n, nkv, d)[row].transpose(0, 1))
    untouched = torch.ones(length, dtype=torch.bool)
    untouched[positions[0].cpu()] = False
    assert k_cache[0][:, untouched.to(DEVICE)].abs().sum() == 0


def test_context_only_store_and_add_rms_norm():
    gen = torch.Generator().manual_seed(2)
    b, n, nkv, d, length = 1, 7, 2, 16, 30
    k = torch.randn(b, n, nkv * d, generator=gen).to(DEVICE)
    v = torch.randn(b, n, nkv * d, generator=gen).to(DEVICE)
    positions = torch.arange(3, 3 + n)[None].to(DEVICE)
    cos, sin = torch.ones(b, n, d, device=DEVICE), torch.zeros(b, n, d, device=DEVICE)  # RoPE off
    k_cache = torch.zeros(b, nkv, length, d, device=DEVICE)
    v_cache = torch.zeros(b, nkv, length, d, device=DEVICE)
    assert qkv_rope_store(None, k, v, 4, nkv, d, None, None, 0.0, cos, sin, positions, k_cache, v_cache) is None
    torch.testing.assert_close(k_cache[0][:, 3:3 + n], k.view(n, nkv, d).transpose(0, 1))
    torch.testing.assert_close(v_cache[0][:, 3:3 + n], v.view(n, nkv, d).transpose(0, 1))
    x = torch.randn(4, 576, generator=gen).to(DEVICE)
    delta = torch.randn(4, 576, generator=gen).to(DEVICE)
    weight = torch.randn(576, generator=gen).to(DEVICE)
    total, normed = add_rms_norm(x, delta, weight, 1e-5)
    s32 = (x + delta).float()
    torch.testing.assert_close(total, x + delta)
    torch.testing.assert_close(normed, weight * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + 1e-5)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m", [1, 3, 16, 40, 130])
def test_skinny_linear_matches_linear(m, bias, dtype):
    """Every path (one-row multiply-sum, tensor-core dot of 16 to 256 rows, more rows than a tile, a tile of more rows
    than there are, split-K with its reduce, K a multiple of the tile or not) against F.linear; two calls give
    bit-identical results."""
    gen = torch.Generator().manual_seed(m)
    base = {"block_n": 32, "block_k": 64, "num_warps": 4, "num_stages": 2}
    tiles = (1, 16) if m == 1 else (64, 128, 256) if m > 64 else (16, 32, 64) if m > 16 else (16,)
    wide = {"block_n": 64}  # a wide tile's dot takes wgmma (its M, the weight's side, is 64 or more) as the sweep's do
    configs = [None] + [{**base, "rows": rows, "split_k": split, **(wide if rows > 64 else {})} for rows in tiles
                        for split in (1, 3)]
    for n, k in ((100, 300), (48, 256)):  # 100 x 300: neither a multiple of the tiles
        x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
        w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
        b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
        expected = torch.nn.functional.linear(x.double(), w.double(), b.double() if bias else None)
        for config in configs:
            got = skinny_linear(x, w, b, config)
            assert got.dtype == dtype and got.shape == (m, n)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            assert ((got.double() - expected).norm() / expected.norm()).item() < tol, config
            assert torch.equal(got, skinny_linear(x, w, b, config))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 5, 16, 40])
def test_the_residual_norm_summing_a_split_gemms_partials_equals_the_two_kernels(m, dtype, monkeypatch):
    """add_partials_rms_norm of skinny_linear_unsummed's partial sums writes exactly what add_rms_norm of
    skinny_linear's output writes (2 and 3 K ranges, a bias or none, plain and zero-centred norms); and
    layers.linear_add_rms_norm takes that path where the table splits K, with the same bits."""
    gen = torch.Generator().manual_seed(m)
    n, k = 96, 320
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    residual = torch.randn(m, n, generator=gen).to(DEVICE, dtype)
    norm_weight = torch.randn(n, generator=gen).to(DEVICE, dtype)
    for split, bias, zero_centred in [(s, b, z) for s in (2, 3) for b in (False, True) for z in (False, True)]:
        config = {"rows": 1 if m == 1 else 16, "block_n": 32, "block_k": 64, "split_k": split, "num_warps": 4,
                  "num_stages": 2}
        b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
        parts = skinny_linear_unsummed(x, w, b, config)
        assert parts.shape == (split, m, n) and parts.dtype == torch.float32
        got = add_partials_rms_norm(residual, parts, b, norm_weight, 1e-6, zero_centred)
        want = add_rms_norm(residual, skinny_linear(x, w, b, config), norm_weight, 1e-6, zero_centred)
        for g, r in zip(got, want):
            assert g.dtype == r.dtype and torch.equal(g, r), (split, bias, zero_centred)
        assert (got[0] - residual).abs().amax() > 0.1  # the projection was added
    if DEVICE == "cuda" and dtype == torch.bfloat16:  # the layer, under a table whose entry for these rows splits K
        from blockspec import layers
        from blockspec.kernels import norm_rope

        calls = []
        original = norm_rope.add_partials_rms_norm
        monkeypatch.setattr(norm_rope, "add_partials_rms_norm", lambda *a: calls.append(a) or original(*a))
        norm = layers.RMSNorm(n, 1e-6).to(DEVICE, dtype).requires_grad_(False)
        with torch.inference_mode(), use_settings(skinny_table={(n, k): {m: config}}):
            got = layers.linear_add_rms_norm(x, w, b, residual, norm)
            want = layers.add_rms_norm(residual, layers.linear(x, w, b), norm)
        assert len(calls) == 1 and all(torch.equal(g, r) for g, r in zip(got, want))


@pytest.mark.skipif(DEVICE != "cuda", reason="cuBLAS's batched GEMM into fp32 (torch.bmm's out_dtype) is CUDA's")
@pytest.mark.parametrize("splits", [2, 4])
def test_cublas_k_ranges_summed_by_the_norm_are_the_product(splits):
    """cublas_partials' ranges are the products of K's equal ranges (fp64 references), so they sum to the whole;
    layers.linear_add_rms_norm under a table entry {"cublas_split_k": s} writes exactly what add_partials_rms_norm of
    them writes (a bias, a zero-centred norm), close to the unsplit cuBLAS path, and a plain `linear` there stays
    on F.linear."""
    from blockspec import layers

    gen = torch.Generator().manual_seed(splits)
    m, n, k = 130, 96, 320
    x = torch.randn(m, k, generator=gen).to(DEVICE, torch.bfloat16)
    w = torch.randn(n, k, generator=gen).to(DEVICE, torch.bfloat16)
    b = torch.randn(n, generator=gen).to(DEVICE, torch.bfloat16)
    residual = torch.randn(m, n, generator=gen).to(DEVICE, torch.bfloat16)
    parts = cublas_partials(x, w, splits)
    assert parts.shape == (splits, m, n) and parts.dtype == torch.float32
    part = k // splits
    for i in range(splits):
        want = x[:, i * part:(i + 1) * part].double() @ w[:, i * part:(i + 1) * part].double().T
        assert ((parts[i].double() - want).norm() / want.norm()).item() < 1e-5, i
    norm = layers.RMSNorm(n, 1e-6, zero_centred=True).to(DEVICE, torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n, generator=gen))
    with torch.inference_mode(), use_settings(skinny_table={(n, k): {256: {"cublas_split_k": splits}}}):
        got = layers.linear_add_rms_norm(x, w, b, residual, norm)
        plain = layers.linear(x, w, b)
    want = add_partials_rms_norm(residual, parts, b, norm.weight, 1e-6, True)
    assert all(torch.equal(g, r) for g, r in zip(got, want))
    assert torch.equal(plain, torch.nn.functional.linear(x, w, b))
    unsplit = layers.add_rms_norm(residual, plain, norm)
    for g, r in zip(got, unsplit):
        assert ((g.float() - r.float()).norm() / r.float().norm()).item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 5, 16, 40, 130])
def test_a_gate_up_gemm_with_silu_mul_in_its_epilogue_equals_the_two_kernels(m, dtype):
    """skinny_linear(silu_mul=True) on a fused gate_up projection ((gate j, up j) column pairs) writes exactly what
    silu_mul of its plain output writes: one-row and tensor-core tiles (a wide one of 256 rows too), ragged pairs
    (n = 100 with 32-column tiles), a bias; and linear_silu_mul takes it."""
    from blockspec.layers import linear, linear_silu_mul

    gen = torch.Generator().manual_seed(m)
    tiles = (1, 16) if m == 1 else (64, 256) if m > 64 else (16, 32) if m > 16 else (16,)
    for n, k, rows in [(n, k, rows) for n, k in ((100, 300), (64, 256)) for rows in tiles]:
        config = {"rows": rows, "block_n": 64 if rows > 64 else 32, "block_k": 64, "split_k": 1, "num_warps": 4,
                  "num_stages": 2}
        x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
        w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
        for b in (None, torch.randn(n, generator=gen).to(DEVICE, dtype)):
            plain = skinny_linear(x, w, b, config)
            want = silu_mul(plain[:, 0::2], plain[:, 1::2])
            got = skinny_linear(x, w, b, config, silu_mul=True)
            assert got.shape == (m, n // 2) and torch.equal(got, want), (n, rows, b is not None)
            assert want.abs().amax() > 0.1  # real values, not a row of zeros
    if DEVICE == "cuda":  # through the layer, with whatever tile the invariant settings give this shape
        with use_settings(batch_invariant=True):
            got, plain = linear_silu_mul(x, w), linear(x, w)
        assert torch.equal(got, silu_mul(plain[:, 0::2], plain[:, 1::2]))


@pytest.mark.parametrize("theta, scaling, dim", [(1e6, 1.0, 128), (1e4, 1.0, 64), (5e5, 1.1, 80)])
def test_rope_tables_kernel_equals_the_torch_ops_bit_for_bit(theta, scaling, dim):
    """RotaryEmbedding's one-kernel tables are the torch ops' values exactly (the same fp32 angle, libdevice's
    accurate cos/sin as torch's, the same rounding), over positions up to 40960 and a head dim that is not a power
    of two; the kernel path and the torch path give bit-identical caches and tokens."""
    from blockspec.layers import RotaryEmbedding

    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    rotary = RotaryEmbedding(inv_freq, scaling).to(DEVICE)
    gen = torch.Generator().manual_seed(dim)
    positions = torch.randint(0, 40960, (3, 17), generator=gen).to(DEVICE)
    for dtype in (torch.bfloat16, torch.float32):
        with use_settings(fused_rope=True):
            got = rotary(positions, dtype)
        with use_settings(fused_rope=False):
            want = rotary(positions, dtype)
        for g, w in zip(got, want):
            assert g.shape == w.shape == (3, 1, 17, dim) and g.dtype == dtype
            assert torch.equal(g, w), (g.float() - w.float()).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 5, 16])
def test_skinny_argmax_picks_what_argmax_of_the_logits_picks(m, dtype):
    """The lm_head with its argmax fused chooses, row by row, exactly what torch's argmax of the logits that
    skinny_linear writes chooses, ties included: weight rows repeated across column blocks (and inside one)
    make the largest logit appear several times, and the first column must win."""
    gen = torch.Generator().manual_seed(m)
    for n, k, rows in ((1000, 256, 16), (515, 300, 16), (300, 64, 1)):  # 515 x 300: ragged tiles
        if rows == 1 and m > 1:
            continue
        config = {"rows": rows, "block_n": 64, "block_k": 64, "split_k": 1, "num_warps": 4, "num_stages": 2}
        w = torch.randn(n, k, generator=gen)
        w[n - 3] = w[70] = w[5]  # ties across blocks and within the first one
        w[n - 1] = w[n - 2]
        w, x = w.to(DEVICE, dtype), torch.randn(m, k, generator=gen).to(DEVICE, dtype)
        x[0] = w[5] * 3  # row 0's largest logit is column 5's, repeated at 70 and n - 3
        logits = skinny_linear(x, w, None, config)
        got = skinny_argmax(x, w, config)
        assert got.dtype == torch.long and torch.equal(got, logits.argmax(-1)), config
        assert int(got[0]) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_argmax_rows_picks_what_torch_picks(dtype):
    """The two-pass argmax of written logits equals torch's row by row: ties inside a column block and across
    blocks (the first column wins), a row of -inf, a NaN (the largest, as in torch), a ragged last block."""
    gen = torch.Generator().manual_seed(3)
    n = 2 * ARGMAX_COLUMNS + 37
    logits = torch.randn(6, n, generator=gen).to(dtype)
    logits[1, [9, ARGMAX_COLUMNS + 3, n - 1]] = 50.0  # across blocks: column 9
    logits[2, [ARGMAX_COLUMNS + 5, ARGMAX_COLUMNS + 6]] = 50.0  # inside the second block
    logits[3] = float("-inf")
    logits[4, n - 2] = 50.0  # in the ragged last block
    logits[5, 100] = float("nan")
    got = argmax_rows(logits.to(DEVICE))
    assert got.dtype == torch.long
    assert got.tolist()[1:] == [9, ARGMAX_COLUMNS + 5, 0, n - 2, 100]
    assert torch.equal(got.cpu(), logits.argmax(-1))


@pytest.mark.parametrize("arch", ["dflash", "dflare"])
def test_draft_fp32_through_kernels_matches_torch(arch, monkeypatch):
    """A whole draft pass (stacked q/k/v, the context's k/v rows, biases, fc, MLP) through the kernels equals the
    plain torch pass (its fp32 projections stay on F.linear: layers.linear takes the skinny GEMM for 16-bit
    weights only)."""
    from conftest import build_draft
    from test_static_engine import tiny_target

    c = tiny_target().model.config
    draft = build_draft(c, arch, seed=3, num_layers=2, block_size=8, attention_bias=True,
                        target_layer_ids=[0, 1, 2] if arch == "dflare" else None)
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 8, c.hidden_size, generator=gen)
    features = torch.randn(1, 5, len(draft.config.target_layer_ids) * c.hidden_size, generator=gen)
    with torch.no_grad():
        expected = draft(embeds, torch.arange(5, 13)[None], features, torch.arange(5)[None], draft.new_cache(1, 32))
        if INTERPRET:  # CPU tensors: let the kernel paths run anyway
            monkeypatch.setattr("blockspec.layers.fused_kernels_apply", lambda *tensors: True)
        draft = draft.to(DEVICE)
        got = draft(embeds.to(DEVICE), torch.arange(5, 13, device=DEVICE)[None], features.to(DEVICE),
                    torch.arange(5, device=DEVICE)[None], draft.new_cache(1, 32))
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a Hopper or later GPU")
@pytest.mark.parametrize("prefetch", [0, 2])
def test_pdl_chain_in_cuda_graph_equals_plain_launches(prefetch):
    """With programmatic dependent launch every kernel may start before the one it reads from has finished;
    its griddepcontrol.wait must still order the memory, and a skinny GEMM's weight prefetch before that wait
    changes nothing. A chain of dependent kernels (skinny GEMMs with and without split-K, add+RMSNorm,
    silu*mul, RMSNorm, decode attention fed by the chain), eager and captured in a CUDA graph and replayed on
    new inputs, equals the plain launches bit for bit."""
    gen = torch.Generator().manual_seed(7)
    dtype = torch.bfloat16
    rows, hidden, inter, heads, kv_heads, d, length = 16, 512, 1024, 8, 2, 64, 300
    w_in = (0.05 * torch.randn(hidden, hidden, generator=gen)).to(DEVICE, dtype)
    w_up = (0.05 * torch.randn(2 * inter, hidden, generator=gen)).to(DEVICE, dtype)
    w_down = (0.05 * torch.randn(heads * d, inter, generator=gen)).to(DEVICE, dtype)
    norm_w = torch.rand(hidden, generator=gen).to(DEVICE, dtype)
    k = torch.randn(1, kv_heads, length, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(1, kv_heads, length, d, generator=gen).to(DEVICE, dtype)
    limits = (length - rows + torch.arange(rows)).view(1, rows).to(DEVICE)
    split = {"rows": 16, "block_n": 32, "block_k": 64, "split_k": 4, "num_warps": 4, "num_stages": 2}

    def chain(x):
        h = skinny_linear(x, w_in)
        total, normed = add_rms_norm(x, h, norm_w, 1e-6)
        act = silu_mul(*skinny_linear(normed, w_up, config=split).chunk(2, -1))
        q = rms_norm(skinny_linear(act, w_down), torch.ones(heads * d, device=DEVICE, dtype=dtype), 1e-6)
        attn = decode_attention(q.view(1, rows, heads, d).transpose(1, 2), k, v, limits)
        return total + skinny_linear(attn.view(rows, heads * d), w_down.T.contiguous()[:hidden])

    inputs = [torch.randn(rows, hidden, generator=gen).to(DEVICE, dtype) for _ in range(3)]
    with use_settings(pdl=False):
        expected = [chain(x) for x in inputs]
    with use_settings(pdl=True, prefetch_tiles=prefetch):
        assert use_pdl(inputs[0])
        assert torch.equal(chain(inputs[0]), expected[0])
        static = inputs[0].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            chain(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(static)
    for x, want in zip(inputs[::-1], expected[::-1]):
        static.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.skipif(DEVICE != "cuda", reason="the flow kernel (Gluon) runs on a GPU only")
def test_flow_kernel_decodes_a_token_as_the_per_op_kernels_do():
    """One decode token of a Qwen3-shaped target (random bf16 weights, a 200-token context) through the flow
    kernel and through the per-op kernels: the final hidden states and the new k and v in the cache agree within
    bf16 rounding, the flow kernel is no further from the same model in fp32 than the per-op kernels are (a wrong
    head, residual or norm in the kernel would be off by far more), no program gave up waiting, and a rerun is
    bit-exact."""
    from test_flow_adapter import qwen3_config

    from blockspec.cache import KVCache
    from blockspec.target import TargetModel
    from blockspec.target.flow import FlowDecode, flow_unsupported

    cfg, context = qwen3_config(), 200
    model = TargetModel.random(cfg, device=DEVICE, dtype=torch.bfloat16, seed=5, std=0.02)
    reason = flow_unsupported(model)
    if reason is not None:
        pytest.skip(f"the flow kernel does not apply here: {reason}")
    exact = TargetModel.random(cfg, device=DEVICE, dtype=torch.float32, seed=5, std=0.02)
    exact.load_state_dict(model.state_dict())
    prompt = torch.randint(0, cfg.vocab_size, (1, context + 1), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    token, position = prompt[:, -1:], torch.full((1, 1), context, device=DEVICE)

    def prefilled(net: TargetModel) -> KVCache:
        cache = net.new_cache(1, context + 8)
        net(prompt[:, :-1], torch.arange(context, device=DEVICE)[None], cache)
        return cache

    with torch.inference_mode():
        want = exact(token, position, prefilled(exact))[0]
        # the model was never prepared, so its forward takes the per-op kernels; the flow kernel is built apart below
        per_op_cache = prefilled(model)
        per_op = model(token, position, per_op_cache)[0]
        flow = FlowDecode(model)
        runs = []
        for _ in range(2):
            cache = prefilled(model)
            runs.append((model.norm(flow(model.embed_tokens(token), position, cache).view(1, 1, -1)), cache))
    (got, flow_cache), (again, _) = runs
    assert not flow.failed.item()
    assert torch.equal(got, again)
    assert relative_error(got, per_op) < 0.05
    assert relative_error(got, want) < 1.5 * relative_error(per_op, want) + 5e-3
    for stored, per_op_stored in ((flow_cache.k, per_op_cache.k), (flow_cache.v, per_op_cache.v)):
        assert relative_error(stored[:, :, :, context], per_op_stored[:, :, :, context]) < 0.05
        assert torch.equal(stored[:, :, :, :context], per_op_stored[:, :, :, :context])  # the context untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tiles", [(128, 64, 8, 3), (64, 32, 4, 2)])
def test_prompt_attention_equals_causal_attention_over_the_cache(tiles, dtype):
    """kernels.attention.prompt_attention: prompts of 150 tokens (whole key blocks before the diagonal, a partial last
    block of queries and of keys), a GQA group of 3, q in the engine's [b, n, heads, d] memory order, with and without
    Qwen3.5's output gate; on CUDA, layers.attention takes it for a prompt from its start where the table lists tiles
    for the head dim."""
    from blockspec.kernels.attention import prompt_attention
    from blockspec.layers import attention

    block_m, block_n, warps, stages = tiles
    config = {"block_m": block_m, "block_n": block_n, "num_warps": warps, "num_stages": stages}
    gen = torch.Generator().manual_seed(7)
    b, n, heads, d = 2, 150, 6, 32
    q = torch.randn(b, n, heads, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    k_cache, v_cache = (torch.randn(b, 2, 176, d, generator=gen).to(DEVICE, dtype) for _ in range(2))
    gate = torch.randn(b, n, heads * d, generator=gen).to(DEVICE, dtype)
    limits = torch.arange(n, device=DEVICE).expand(b, n)
    expected = reference_attention(q, k_cache[:, :, :n], v_cache[:, :, :n], limits, 0)
    out = prompt_attention(q, k_cache, v_cache, config)
    gated = prompt_attention(q, k_cache, v_cache, config, gate=gate)
    if DEVICE == "cuda":
        with use_settings(attention_table={"narrow": {}, "wide": {}, f"prompt_d{d}": config}):
            assert torch.equal(attention(q, k_cache, v_cache, limits, n, gate=gate), gated)
    assert out.shape == (b, n, heads * d)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((out.double() - expected).norm() / expected.norm()).item() < tolerance
    expected_gated = expected * torch.sigmoid(gate.double())
    assert ((gated.double() - expected_gated).norm() / expected_gated.norm()).item() < tolerance

