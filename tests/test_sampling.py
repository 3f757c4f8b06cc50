"""The sampling rules are exact: speculative sampling commits tokens distributed exactly as the target alone.

Statistical checks use a total-variation bound derived from the sample size (`tv_bound`): for an empirical
distribution of n i.i.d. draws over m outcomes, E[TV] <= 0.5 * sqrt((m - 1) / n) (Cauchy-Schwarz on
sum_i sqrt(p_i (1 - p_i) / n)), and TV has bounded differences 1/n, so by McDiarmid
P(TV > E[TV] + t) <= exp(-2 n t^2). All randomness is seeded, so the tests are deterministic; the bound only
says the chosen seeds are not lucky. Each exactness test is paired with a deliberately BIASED rule run
through the same harness and the same bound, which must fail it: the tests have power.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from blockspec.draft import DraftConfig, DraftModel
from blockspec.engine import BatchDecoder, DraftProposer, SamplingParams, SpeculativeDecoder
from blockspec.engine.acceptance import (DRAFT_NOT_FINITE, TARGET_NOT_FINITE, accept_rows, accept_sampled,
                                         greedy_accepted)
from blockspec.engine.sampling import RowSampling, draw, draw_uniforms, sample, warp
from blockspec.errors import BlockspecError
from blockspec.target import target_from_hf
from conftest import seeded_normal


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny matmuls are ~100x slower with 2 intra-op threads on a busy 2-core box; restore afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def warped_probs(logits: torch.Tensor, params: SamplingParams | list[SamplingParams]) -> torch.Tensor:
    """`warp` under SamplingParams: one for every row of `logits` (or a single row [V]), or one per row."""
    rows = [params] * logits.shape[0] if isinstance(params, SamplingParams) else list(params)
    if logits.dim() == 1:
        return warped_probs(logits[None], rows[:1])[0]
    return warp(logits, RowSampling.of(rows, logits.device))


# ---- statistics helpers ---------------------------------------------------------------------------------
DELTA = 1e-5  # the probability a bound below may be exceeded by chance


def mcdiarmid_margin(n: int, delta: float = DELTA) -> float:
    """An empirical TV of n draws falls more than this below its mean with probability <= delta."""
    return math.sqrt(math.log(1 / delta) / (2 * n))


def tv_bound(n: int, m: int, delta: float = DELTA) -> float:
    """TV(empirical, true) stays below this with probability >= 1 - delta (n draws, m outcomes)."""
    return 0.5 * math.sqrt((m - 1) / n) + mcdiarmid_margin(n, delta)


def empirical(samples: torch.Tensor, m: int) -> torch.Tensor:
    return torch.bincount(samples.long().flatten(), minlength=m).double() / samples.numel()


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a.double().flatten() - b.double().flatten()).abs().sum())


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Goodness of fit; cells expected below `min_expected` are pooled; an impossible outcome seen -> 0."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    n = float(counts.sum())
    probs = probs / probs.sum()
    if bool(((probs == 0) & (counts > 0)).any()):
        return 0.0
    keep = probs > 0  # impossible cells were checked above; they carry no information
    counts, expected = counts[keep], probs[keep] * n
    order = torch.argsort(expected)
    counts, expected = counts[order].tolist(), expected[order].tolist()
    # pool the smallest cells until the pooled cell is large enough; then keep the rest as they are
    obs, exp = [0.0], [0.0]
    for c, e in zip(counts, expected):
        if exp[0] < min_expected or e < min_expected:
            obs[0] += c
            exp[0] += e
        else:
            obs.append(c)
            exp.append(e)
    if len(obs) < 2:
        return 1.0
    statistic = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    # the chi-square survival function with k - 1 degrees of freedom, Q((k - 1) / 2, statistic / 2)
    half_dof = torch.tensor((len(obs) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(half_dof, torch.tensor(statistic / 2, dtype=torch.float64)))


@pytest.mark.parametrize("statistic, dof, pvalue", [(3.841459, 1, 0.05), (11.070498, 5, 0.05),
                                                    (23.209251, 10, 0.01), (7.0, 7, 0.428880)])
def test_chi2_pvalue_matches_the_chi_square_table(statistic, dof, pvalue):
    # observed counts whose statistic against a uniform expectation is exactly `statistic`
    cells, n = dof + 1, 1000.0
    expected = n / cells
    deviation = math.sqrt(statistic * expected / 2)
    counts = torch.tensor([expected + deviation, expected - deviation] + [expected] * (cells - 2))
    assert chi2_pvalue(counts, torch.full((cells,), 1 / cells)) == pytest.approx(pvalue, rel=1e-4)


# ---- the acceptance rule in isolation -------------------------------------------------------------------
V = 6
# Target rows p_j (prefix-independent, different per position) and draft rows q_j. Edge cases built in:
# p0[5] = 0 < q0[5] (a draft token the target never emits), q0[4] = 0 < p0[4] (a token only the residual can
# produce), q2 == p2 (always accepted there), p1[4] = 0.
P_ROWS = torch.tensor([
    [0.40, 0.25, 0.15, 0.10, 0.10, 0.00],
    [0.05, 0.10, 0.40, 0.25, 0.00, 0.20],
    [0.20, 0.20, 0.20, 0.15, 0.15, 0.10],
    [0.10, 0.30, 0.05, 0.05, 0.30, 0.20],
])
Q_ROWS = torch.tensor([
    [0.10, 0.10, 0.20, 0.30, 0.00, 0.30],
    [0.30, 0.30, 0.10, 0.10, 0.20, 0.00],
    [0.20, 0.20, 0.20, 0.15, 0.15, 0.10],
])
N_RUNS = 20_000


def simulate(accept_fn, k: int, draft_probs: torch.Tensor | None, fixed_draft: list[int] | None = None,
             n: int = N_RUNS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n independent verify steps of a k-token draft, as n rows of one call; returns the committed sequences
    completed to k+1 tokens [n, k+1] and the accepted counts [n].

    Draft tokens are drawn from `draft_probs` (or fixed, for a point-mass draft). After `a` accepted drafts and
    the returned token, positions a+1..k are filled with fresh draws from the target rows -- what a correct
    continuation produces -- so the completed sequence must be distributed as p_0 x p_1 x ... x p_k.
    """
    target_probs = P_ROWS[:k + 1]
    gen_draft = torch.Generator().manual_seed(10_000 + seed)
    if draft_probs is not None:
        drafts = torch.stack([torch.multinomial(draft_probs[j], n, replacement=True, generator=gen_draft)
                              for j in range(k)], dim=1)
    else:
        drafts = torch.tensor(fixed_draft, dtype=torch.long).expand(n, k)
    fill = torch.stack([torch.multinomial(target_probs[j], n, replacement=True, generator=gen_draft)
                        for j in range(k + 1)], dim=1)
    draws = torch.rand(n, k + 1, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q = draft_probs.expand(n, k, V) if draft_probs is not None else None
    accepted, tokens = accept_fn(drafts.reshape(n, k), q, target_probs.expand(n, k + 1, V),
                                 torch.full((n,), k), draws)
    assert accepted.dtype == tokens.dtype == torch.long and accepted.shape == tokens.shape == (n,)
    assert bool(((accepted >= 0) & (accepted <= k)).all())
    slots = torch.arange(k + 1)
    out = torch.where(slots < accepted[:, None], torch.cat([drafts.reshape(n, k), fill[:, :1]], dim=1), fill)
    out[torch.arange(n), accepted] = tokens
    return out, accepted


def assert_exact(seqs: torch.Tensor, k: int) -> None:
    n = seqs.shape[0]
    bound_1 = tv_bound(n, V)
    for j in range(k + 1):
        d = tv(empirical(seqs[:, j], V), P_ROWS[j])
        assert d < bound_1, f"position {j}: TV {d:.4f} >= {bound_1:.4f}"
    bound_2 = tv_bound(n, V * V)
    for j in range(k):
        pair = empirical(seqs[:, j] * V + seqs[:, j + 1], V * V)
        d = tv(pair, torch.outer(P_ROWS[j], P_ROWS[j + 1]))
        assert d < bound_2, f"pair ({j},{j + 1}): TV {d:.4f} >= {bound_2:.4f}"
    if V ** (k + 1) <= 216:  # the full joint while it stays small
        code = torch.zeros(n, dtype=torch.long)
        joint = torch.ones(1, dtype=torch.float64)
        for j in range(k + 1):
            code = code * V + seqs[:, j]
            joint = torch.outer(joint, P_ROWS[j].double()).flatten()
        d = tv(empirical(code, V ** (k + 1)), joint)
        assert d < tv_bound(n, V ** (k + 1)), f"joint of {k + 1} tokens: TV {d:.4f}"


def expected_mean_accepted(k: int, draft_probs: torch.Tensor | None, fixed_draft: list[int] | None) -> float:
    """E[a] = sum_j P(a > j) with P(accept at j) = sum_x min(p_j, q_j) (independent rows)."""
    if draft_probs is not None:
        beta = torch.minimum(P_ROWS[:k], draft_probs[:k]).sum(-1)
    else:
        beta = torch.stack([P_ROWS[j, fixed_draft[j]] for j in range(k)])
    return float(torch.cumprod(beta.double(), 0).sum())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_accept_sampled_is_exact_with_draft_distribution(k):
    q = Q_ROWS[:k]  # k=3 includes a position where q == p (always accepted there)
    seqs, accepted = simulate(accept_sampled, k, q, seed=k)
    assert_exact(seqs, k)
    # Not only lossless but the optimal acceptance rate: a rule that always rejected and sampled p would pass
    # the distribution checks above but fail this one.
    mean_a = float(accepted.double().mean())
    expect = expected_mean_accepted(k, q, None)
    sd = float(accepted.double().std()) / math.sqrt(len(accepted))
    assert abs(mean_a - expect) < 6 * sd + 1e-9, (mean_a, expect)


def test_accept_sampled_is_exact_with_point_mass_draft():
    # draft token 0 is the target's favourite, draft token 4 has p1 = 0 (always rejected there)
    fixed = [0, 4]
    seqs, accepted = simulate(accept_sampled, 2, None, fixed_draft=fixed, seed=7)
    assert_exact(seqs, 2)
    assert int(accepted.max()) == 1  # position 1 can never be accepted
    expect = expected_mean_accepted(2, None, fixed)
    assert abs(float(accepted.double().mean()) - expect) < 6 * float(accepted.double().std()) / math.sqrt(N_RUNS)


def test_accept_sampled_point_mass_on_unlikely_token_is_exact():
    # a greedy draft that is usually wrong: the draft token has p = 0.10 at position 0 and 0.40 at 1
    seqs, _ = simulate(accept_sampled, 2, None, fixed_draft=[3, 2], seed=8)
    assert_exact(seqs, 2)


# ---- biased variants: the same harness and bound must reject them ---------------------------------------
def biased_inverted_ratio(drafts, draft_probs, target_probs, wanted, draws):
    """Accepts with min(1, q/p) instead of min(1, p/q) (p and q swapped for the test alone); resamples right."""
    k = drafts.shape[1]
    swapped = torch.cat([draft_probs, target_probs[:, k:]], dim=1)
    accepted, _ = accept_sampled(drafts, target_probs[:, :k], swapped, wanted, draws)
    rows = torch.arange(drafts.shape[0])
    p_a, q_a = target_probs[rows, accepted], draft_probs[rows, accepted.clamp(max=k - 1)]
    residual = torch.where((accepted < k)[:, None], (p_a - q_a).clamp_min(0), p_a)
    return accepted, sample(residual, draws[rows, accepted, 2])


def biased_resample_from_p(drafts, draft_probs, target_probs, wanted, draws):
    """Correct acceptance test, but resamples from p instead of norm(max(0, p - q)) on rejection."""
    accepted, _ = accept_sampled(drafts, draft_probs, target_probs, wanted, draws)
    rows = torch.arange(drafts.shape[0], device=drafts.device)
    return accepted, sample(target_probs[rows, accepted], draws[rows, accepted, 2])


@pytest.mark.parametrize("biased", [biased_inverted_ratio, biased_resample_from_p])
def test_biased_rules_fail_the_same_bound(biased):
    n = N_RUNS // 2  # a smaller n gives a LOOSER bound; the biased rule must still fail it
    seqs, _ = simulate(biased, 1, Q_ROWS[:1], n=n, seed=3)
    d = tv(empirical(seqs[:, 0], V), P_ROWS[0])
    assert d > 2 * tv_bound(n, V), f"biased rule only {d:.4f} away from p: the exactness test has no power"
    with pytest.raises(AssertionError):
        assert_exact(seqs, 1)


def test_biased_point_mass_rule_fails_the_same_bound():
    n = N_RUNS // 2
    seqs, _ = simulate(biased_resample_from_p, 1, None, fixed_draft=[0], n=n, seed=4)
    d = tv(empirical(seqs[:, 0], V), P_ROWS[0])
    assert d > 2 * tv_bound(n, V), d


# ---- accept_sampled: deterministic corner cases ---------------------------------------------------------
def accept_one(draft: torch.Tensor, q: torch.Tensor | None, p: torch.Tensor, gen: torch.Generator) -> tuple[int, int]:
    """accept_sampled on one row verifying all its drafts, with uniforms from `gen`."""
    k = draft.shape[0]
    draws = torch.rand(1, k + 1, 3, generator=gen, dtype=torch.float64)
    accepted, token = accept_sampled(draft[None], q[None] if q is not None else None, p[None], torch.tensor([k]), draws)
    return int(accepted), int(token)


def test_accept_sampled_accepts_everything_when_draft_equals_target():
    gen = torch.Generator().manual_seed(0)
    q = P_ROWS[:3]
    for _ in range(200):
        draft = torch.stack([torch.multinomial(q[j], 1, generator=gen)[0] for j in range(3)])
        a, token = accept_one(draft, q, P_ROWS, gen)
        assert a == 3
        assert P_ROWS[3, token] > 0


def test_accept_sampled_never_accepts_a_zero_probability_token():
    gen = torch.Generator().manual_seed(1)
    draft = torch.tensor([5, 1])  # p0[5] == 0
    for q in (Q_ROWS[:2], None):
        for _ in range(300):
            a, token = accept_one(draft, q, P_ROWS[:3], gen)
            assert a == 0
            assert token != 5 and P_ROWS[0, token] > 0
            if q is not None:  # residual support: p > q
                assert P_ROWS[0, token] > Q_ROWS[0, token]


def test_accept_sampled_one_hot_target():
    gen = torch.Generator().manual_seed(2)
    target = torch.zeros(3, V)
    target[0, 2] = target[1, 4] = target[2, 1] = 1.0
    assert accept_one(torch.tensor([2, 4]), None, target, gen) == (2, 1)
    a, token = accept_one(torch.tensor([2, 0]), None, target, gen)
    assert (a, token) == (1, 4)
    q = torch.full((2, V), 1.0 / V)
    assert accept_one(torch.tensor([3, 4]), q, target, gen) == (0, 2)


def test_accept_sampled_empty_draft_samples_the_target():
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(V)
    n = 4000
    for _ in range(n):
        a, token = accept_one(torch.zeros(0, dtype=torch.long), None, P_ROWS[:1], gen)
        assert a == 0
        counts[token] += 1
    assert tv(counts / n, P_ROWS[0]) < tv_bound(n, V)


# ---- warped_probs ---------------------------------------------------------------------------------------
def _reference_warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Straightforward per-row reference: temperature, then top-k, then top-p on the renormalised rest."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for r, row in enumerate(logits.double().reshape(-1, logits.shape[-1])):
        probs = torch.softmax(row / temperature, -1)
        order = torch.argsort(probs, descending=True).tolist()
        keep = order[:top_k] if top_k else order
        mass = probs[keep] / probs[keep].sum()
        if top_p < 1:
            total, cut = 0.0, 0
            for cut, m in enumerate(mass.tolist(), start=1):
                total += m
                if total >= top_p:
                    break
            keep, mass = keep[:cut], mass[:cut]
        out.view(-1, logits.shape[-1])[r, keep] = mass / mass.sum()
    return out


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_warped_probs_temperature(temperature):
    logits = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(0)) * 3
    probs = warped_probs(logits, SamplingParams(temperature=temperature))
    assert probs.dtype == torch.float32 and probs.shape == logits.shape
    torch.testing.assert_close(probs, torch.softmax(logits / temperature, -1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4))


def test_warped_probs_bf16_logits_come_back_fp32():
    logits = torch.randn(2, 9, generator=torch.Generator().manual_seed(1)).bfloat16()
    probs = warped_probs(logits, SamplingParams(temperature=0.7))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.softmax(logits.float() / 0.7, -1))


@pytest.mark.parametrize("top_k", [1, 2, 5, 10])
def test_warped_probs_top_k_keeps_exactly_k(top_k):
    vocab = 10
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(top_k)) * 2  # no ties
    probs = warped_probs(logits, SamplingParams(temperature=0.8, top_k=top_k))
    assert ((probs > 0).sum(-1) == top_k).all()
    top = torch.topk(logits, top_k, dim=-1).indices
    assert (probs.gather(-1, top) > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(6))
    kept = torch.full_like(logits, float("-inf")).scatter(-1, top, logits.gather(-1, top))
    torch.testing.assert_close(probs, torch.softmax(kept / 0.8, -1))


def test_warped_probs_top_k_off_or_larger_than_vocab_changes_nothing():
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(5))
    base = warped_probs(logits, SamplingParams(temperature=1.0))
    for k in (0, 7, 100):
        torch.testing.assert_close(warped_probs(logits, SamplingParams(temperature=1.0, top_k=k)), base)


@pytest.mark.parametrize("top_p, kept", [(0.45, {3}), (0.5 + 1e-3, {3, 0}), (0.7, {3, 0}), (0.81, {3, 0, 4}),
                                         (0.96, {3, 0, 4, 1}), (1.0, {0, 1, 2, 3, 4})])
def test_warped_probs_top_p_keeps_smallest_prefix_reaching_p(top_p, kept):
    # probabilities 0.5 (id 3), 0.3 (id 0), 0.15 (id 4), 0.04 (id 1), 0.01 (id 2)
    probs_in = torch.tensor([0.3, 0.04, 0.01, 0.5, 0.15])
    probs = warped_probs(probs_in.log(), SamplingParams(temperature=1.0, top_p=top_p))
    assert set(torch.nonzero(probs).flatten().tolist()) == kept
    expect = torch.zeros(5)
    idx = torch.tensor(sorted(kept))
    expect[idx] = probs_in[idx] / probs_in[idx].sum()
    torch.testing.assert_close(probs, expect)
    assert abs(float(probs.sum()) - 1) < 1e-6


def test_warped_probs_top_p_always_keeps_the_argmax():
    logits = torch.randn(50, 13, generator=torch.Generator().manual_seed(2)) * 4
    probs = warped_probs(logits, SamplingParams(temperature=1.0, top_p=1e-6))
    assert ((probs > 0).sum(-1) == 1).all()
    assert (probs.argmax(-1) == logits.argmax(-1)).all()
    torch.testing.assert_close(probs.max(-1).values, torch.ones(50))


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 0.9), (1.3, 5, 0.8), (1.0, 3, 1.0),
                                                        (0.5, 8, 0.35), (2.0, 0, 0.99)])
def test_warped_probs_matches_reference(temperature, top_k, top_p):
    logits = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(top_k + 17)) * 2
    probs = warped_probs(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    ref = _reference_warp(logits, temperature, top_k, top_p)
    torch.testing.assert_close(probs.double(), ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(probs > 0, ref > 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 5))


def test_warped_probs_with_settings_per_row_equals_each_row_alone():
    logits = torch.randn(5, 3, 40, generator=torch.Generator().manual_seed(9)) * 3
    rows = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.2, top_k=4),
            SamplingParams(temperature=0.9, top_p=0.6), SamplingParams(temperature=1.0, top_k=7, top_p=0.8),
            SamplingParams(temperature=0.5, top_k=40)]
    together = warped_probs(logits, rows)
    for row, params in enumerate(rows):
        assert torch.equal(together[row], warped_probs(logits[row], params))
    assert ((together[1] > 0).sum(-1) == 4).all() and not torch.equal(together[0], torch.softmax(logits[0], -1))


# ---- sample and uniforms --------------------------------------------------------------------------------
def test_sample_draws_each_row_from_its_weights():
    """Inverting the cumulative sum at a uniform is exact: unnormalised weights, zero weights never drawn, a
    batch of different rows at once."""
    n = 20_000
    weights = torch.stack([P_ROWS[0] * 3.0, P_ROWS[1]])  # row 0 sums to 3; both hold a zero
    draws = torch.rand(n, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    tokens = sample(weights.expand(n, 2, V), draws)
    assert tokens.shape == (n, 2) and tokens.dtype == torch.long
    for row in range(2):
        assert float(P_ROWS[row][tokens[:, row]].min()) > 0
        assert tv(empirical(tokens[:, row], V), P_ROWS[row]) < tv_bound(n, V)
    # the edges: u = 0 takes the first token of positive weight, u just under 1 the last
    edge = torch.tensor([[0.0, 0.5, 0.0, 2.0, 0.0]])
    assert sample(edge.expand(2, 5), torch.tensor([0.0, 1 - 2 ** -53], dtype=torch.float64)).tolist() == [1, 3]
    assert sample(torch.full((1, 4), float("nan")), torch.tensor([0.3], dtype=torch.float64)).item() in range(4)


def test_draw_uniforms_follow_each_rows_own_generator():
    def generators():
        return [torch.Generator().manual_seed(s) for s in (5, 6)]

    alone = draw_uniforms(torch.zeros(1, 3, 3, dtype=torch.float64), generators()[1:], [3])
    together = draw_uniforms(torch.full((3, 4, 3), 2.0, dtype=torch.float64),
                             [None] + generators()[1:] + [torch.Generator().manual_seed(7)], [2, 3, 1])
    assert torch.equal(together[1, :3], alone[0]) and bool((together[1, 3:] == 2).all())
    assert bool((together[0] == 2).all()) and bool((together[2, 1:] == 2).all())  # untouched
    assert bool(((together[2, 0] >= 0) & (together[2, 0] < 1)).all())


def test_draw_takes_a_greedy_rows_argmax_and_samples_the_others():
    logits = torch.randn(3, 2, V, generator=torch.Generator().manual_seed(8))
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0)]
    at = torch.tensor([[0.0, 0.0], [0.5, 0.5], [0.0, 1 - 2 ** -53]], dtype=torch.float64)
    tokens, probs = draw(logits, RowSampling.of(params, "cpu"), at)
    assert tokens[:2].tolist() == logits[:2].argmax(-1).tolist()  # top_k 1 samples its argmax too
    assert tokens[2].tolist() == [int(torch.softmax(logits[2, 0], -1).nonzero()[0]), V - 1]
    assert torch.equal(probs[2], warped_probs(logits[2], params[2]))


def test_accept_rows_mixes_greedy_and_sampled_rows_and_flags_failures():
    """Greedy rows follow the argmax; a sampled row verifies only its own wanted drafts; a row whose target or
    draft distribution is not finite at its slots is flagged, and only that row."""
    gen = torch.Generator().manual_seed(4)
    k, n = 3, 4
    logits = torch.randn(n, k + 1, V, generator=gen)
    draft_probs = torch.softmax(torch.randn(n, k, V, generator=gen), -1)
    drafts = logits[:, :k].argmax(-1)  # every draft equals the target's argmax
    params = [SamplingParams(), SamplingParams(temperature=1e-4), SamplingParams(temperature=1.0),
              SamplingParams(temperature=1.0)]
    draft_probs[1] = torch.nn.functional.one_hot(drafts[1], V).float()  # the draft sure of the argmax
    wanted = torch.tensor([3, 2, 3, 3])
    draws = draw_uniforms(torch.zeros(n, k + 1, 3, dtype=torch.float64),
                          [None] + [torch.Generator().manual_seed(s) for s in (1, 2, 3)], [4, 3, 4, 4])
    logits[2, 3] = float("nan")  # row 2: the target not finite at a slot it verifies
    logits[1, 3] = float("nan")  # row 1: at a slot past its wanted drafts (ignored)
    draft_probs[3, 0, 0] = float("nan")  # row 3: the draft not finite
    accepted, token, failure = accept_rows(RowSampling.of(params, "cpu"), drafts, draft_probs, logits, wanted, draws)
    assert failure.tolist() == [0, 0, TARGET_NOT_FINITE, DRAFT_NOT_FINITE]
    assert accepted[:2].tolist() == [3, 2]  # greedy: all; near-greedy sampling: its 2 wanted drafts
    assert token[:2].tolist() == [int(logits[0, 3].argmax()), int(logits[1, 2].argmax())]


# ---- accept_greedy --------------------------------------------------------------------------------------
def _logits_for(choices: list[int], vocab: int = 9) -> torch.Tensor:
    logits = torch.randn(len(choices), vocab, generator=torch.Generator().manual_seed(len(choices)))
    logits[torch.arange(len(choices)), torch.tensor(choices)] = 10.0
    return logits


@pytest.mark.parametrize("draft, choices, accepted", [
    ([1, 2, 3], [1, 2, 3, 4], 3),  # all match: bonus is the choice after the block
    ([5, 2, 3], [1, 2, 3, 4], 0),  # first mismatch: later matches do not count
    ([1, 2, 7], [1, 2, 3, 4], 2),
    ([1, 8, 3], [1, 2, 3, 4], 1),
    ([6, 6, 6], [0, 1, 2, 3], 0),
    ([], [4], 0),  # no draft: plain autoregressive step
])
def test_accept_greedy(draft, choices, accepted):
    logits, drafts = _logits_for(choices), torch.tensor(draft, dtype=torch.long)
    out = greedy_accepted(drafts[None], logits.argmax(-1)[None])
    assert out.dtype == torch.long
    assert out.tolist() == [accepted]
    # committed tokens = drafts[:a] + [choice a], identical to the target's own choices
    k = len(draft)
    got, token, failure = accept_rows(RowSampling.of([SamplingParams()], "cpu"), drafts[None], None, logits[None],
                                      torch.tensor([k]),
                                      torch.zeros(1, k + 1, 3, dtype=torch.float64))
    assert (got.tolist(), failure.tolist()) == ([accepted], [0])
    assert draft[:accepted] + token.tolist() == choices[:accepted + 1]


# ---- SamplingParams.validate ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
    dict(top_p=-0.2), dict(max_new_tokens=0), dict(max_new_tokens=-3), dict(max_new_tokens=2.5),
    dict(top_k=-1), dict(top_k=1.5), dict(stop_strings=("",)),
])
def test_sampling_params_validate_rejects(kwargs):
    with pytest.raises(BlockspecError):
        SamplingParams(**kwargs).validate()


def test_sampling_params_validate_accepts_and_returns_self():
    for params in (SamplingParams(), SamplingParams(temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=1),
                   SamplingParams(temperature=1e-3, top_p=1e-3, top_k=1, stop_strings=("x",))):
        assert params.validate() is params
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy


# ---- end to end: a tiny random target and a random DFlash draft ----------------------------------------
TV_VOCAB = 8
PROMPT = [1, 5, 2, 7]


def _tiny_hf_target(vocab: int = TV_VOCAB, seed: int = 1):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            noise = seeded_normal(seed, name, param.shape)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.3 * noise)
        # next-token distributions: far from uniform and far from one-hot (max prob ~0.2..0.8)
        hf.lm_head.weight.mul_(0.5)
    return hf


def _half_vocabulary_draft(hf, seed: int = 5) -> DraftModel:
    """A DFlash draft that proposes about uniformly from the half of the vocabulary holding about half of the
    target's next-token mass, whatever the context: far from every target row, so a rule that resamples from p
    instead of the residual is off by about s(1 - s) ~ 0.2 in TV (s: the target's mass on that half), whichever
    seed drew the target.

    Its layers run on random weights but write little into the residual stream, which the mask embedding (all
    ones) dominates; the final norm's weight solves lm_head(h) = z for logits z of +3 on that half, -3 elsewhere.
    """
    cfg = DraftConfig.create("dflash", hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=16, vocab_size=TV_VOCAB, num_target_layers=2, block_size=4,
                             mask_token_id=None)
    draft = DraftModel(cfg, mask_embedding=True)
    next_token = exact_joint(hf, PROMPT, E2E_CASES["t1"]).sum((0, 2))
    half = min(itertools.combinations(range(TV_VOCAB), TV_VOCAB // 2),
               key=lambda tokens: abs(float(next_token[list(tokens)].sum()) - 0.5))
    logits = torch.full((TV_VOCAB,), -3.0)
    logits[list(half)] = 3.0
    with torch.no_grad():
        for name, param in draft.named_parameters():
            noise = seeded_normal(seed, name, param.shape)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                param.copy_(0.002 * noise)
            else:
                param.copy_(0.5 * noise)
        draft.mask_embedding.fill_(1.0)
        draft.norm.weight.copy_(torch.linalg.pinv(hf.lm_head.weight) @ logits)
    return draft.eval()


@pytest.fixture(scope="module")
def tiny_pair():
    hf = _tiny_hf_target()
    return hf, target_from_hf(hf), _half_vocabulary_draft(hf)


def exact_joint(hf, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """P(t1, t2, t3) [V, V, V] by enumerating every prefix through the HF model, warped like the sampler."""
    v = TV_VOCAB
    t1, t2 = torch.meshgrid(torch.arange(v), torch.arange(v), indexing="ij")
    seqs = torch.cat([torch.tensor(prompt).expand(v * v, -1), t1.reshape(-1, 1), t2.reshape(-1, 1)], dim=1)
    with torch.no_grad():
        logits = hf(seqs).logits.float()  # [v*v, P+2, v]
    n = len(prompt)
    p1 = warped_probs(logits[0, n - 1], params).double()  # [v]
    p2 = warped_probs(logits[::v, n], params).double()  # rows t1 (t2 = 0 does not matter at position n)
    p3 = warped_probs(logits[:, n + 1], params).double().view(v, v, v)
    joint = p1[:, None, None] * p2[:, :, None] * p3
    assert abs(float(joint.sum()) - 1) < 1e-6
    return joint


def test_tiny_target_distributions_are_interesting(tiny_pair):
    hf, target, _ = tiny_pair
    joint = exact_joint(hf, PROMPT, SamplingParams(temperature=1.0))
    v = TV_VOCAB
    p1 = joint.sum((1, 2))
    p2_given = joint.sum(2) / p1[:, None]
    for rows in (p1[None], p2_given):
        assert float(rows.max()) < 0.9 and float(rows.max(-1).values.min()) > 1.5 / v
    # blockspec's own forward agrees with HF on the distributions the test takes as ground truth
    cache = target.model.new_cache(1, 16)
    ids = torch.tensor([PROMPT + [3, 6]])
    with torch.inference_mode():
        hidden, _ = target.model(ids, torch.arange(ids.shape[1])[None], cache)
        ours = target.model.logits(hidden[0])
        theirs = hf(ids).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


class PointMassProposer(DraftProposer):
    """Proposes the draft's argmax tokens with no distribution (draft probs None) even when sampling."""

    def propose_sampled(self, n, block, last_tokens, block_positions, kv_len, rows, uniforms):
        return self.propose_greedy(n, block, last_tokens, block_positions, kv_len), None


SAMPLE_ROWS = 64  # the statistical runs decode this many requests at a time


def _sample_runs(decoder: SpeculativeDecoder, params: SamplingParams, runs: int, seed0: int):
    """`runs` answers to PROMPT, request i seeded seed0 + i, and every step's acceptance length: decoded by one
    engine of SAMPLE_ROWS rows with the decoder's target, proposer, block and rollback (a seeded request decodes
    the same tokens in a batch as alone: tests/test_batch.py)."""
    engine = BatchDecoder(decoder.target, decoder.draft, max_batch=SAMPLE_ROWS, block_size=decoder.block_size,
                          max_len=len(PROMPT) + params.max_new_tokens + 2 * decoder.trained_block,
                          rollback=decoder.rollback)
    results = engine.generate([PROMPT] * runs, [dataclasses.replace(params, seed=seed0 + s) for s in range(runs)])
    assert all(len(r.token_ids) == 3 and r.finish_reason == "length" for r in results)
    return torch.tensor([r.token_ids for r in results]), [n for r in results for n in r.stats.acceptance_lengths]


def _assert_matches(samples: torch.Tensor, joint: torch.Tensor) -> None:
    v, n = TV_VOCAB, samples.shape[0]
    t1, t2, t3 = samples.unbind(1)
    checks = [
        ("t1", t1, joint.sum((1, 2)), v),
        ("t2", t2, joint.sum((0, 2)), v),
        ("t3", t3, joint.sum((0, 1)), v),
        ("t1,t2", t1 * v + t2, joint.sum(2), v * v),
        ("t2,t3", t2 * v + t3, joint.sum(0), v * v),
        ("t1,t2,t3", (t1 * v + t2) * v + t3, joint, v ** 3),
    ]
    for name, codes, probs, m in checks:
        counts = torch.bincount(codes, minlength=m)
        if m <= v * v:
            d = tv(counts.double() / n, probs)
            assert d < tv_bound(n, m), f"{name}: TV {d:.4f} >= {tv_bound(n, m):.4f}"
        pvalue = chi2_pvalue(counts, probs)
        assert pvalue > 1e-4, f"{name}: chi-square p-value {pvalue:.2e}"


E2E_CASES = {
    "t1": SamplingParams(temperature=1.0, max_new_tokens=3, ignore_eos=True),
    "t0.8-topk5-topp0.9": SamplingParams(temperature=0.8, top_k=5, top_p=0.9, max_new_tokens=3, ignore_eos=True),
}


@pytest.mark.parametrize("case, runs", [("t1", 2500), ("t0.8-topk5-topp0.9", 2000)])
def test_speculative_sampling_matches_target_distribution(tiny_pair, case, runs):
    hf, target, draft = tiny_pair
    params = E2E_CASES[case]
    joint = exact_joint(hf, PROMPT, params)
    samples, lengths = _sample_runs(SpeculativeDecoder(target, draft), params, runs, seed0=1000)
    # the draft path is exercised: some steps accept drafts, some reject the first one
    hist = torch.bincount(torch.tensor(lengths), minlength=5)
    assert hist[1] > 0.05 * len(lengths) and hist[2:].sum() > 0.2 * len(lengths), hist.tolist()
    _assert_matches(samples, joint)
    if case != "t1":
        # power: the same samples clearly reject the un-warped distribution (top-k/top-p/temperature dropped)
        wrong = exact_joint(hf, PROMPT, E2E_CASES["t1"])
        codes = (samples[:, 0] * TV_VOCAB + samples[:, 1])
        counts = torch.bincount(codes, minlength=TV_VOCAB ** 2)
        assert chi2_pvalue(counts, wrong.sum(2)) < 1e-8


def draft_probs_after(target, draft, first: int, params: SamplingParams) -> torch.Tensor:
    """The draft's warped distribution for block slot 1 when the block starts with `first` after PROMPT."""
    model, n = target.model, len(PROMPT)
    with torch.inference_mode():
        _, features = model(torch.tensor([PROMPT]), torch.arange(n)[None], model.new_cache(1, 16),
                            tuple(draft.config.target_layer_ids))
        embeds = draft.embed_block(torch.tensor([first]), model.embed_tokens)
        hidden = draft(embeds, (n + torch.arange(draft.block_size))[None], features, torch.arange(n)[None],
                       draft.new_cache(1, 16))
        return warped_probs(model.logits(hidden[0, 1:2]), params)[0].double()


def test_end_to_end_check_catches_a_biased_acceptance_rule(tiny_pair, monkeypatch):
    """Power of the end-to-end check: the loop with a biased rule (resample from p) fails it.

    The power is shown before sampling, not by one lucky draw: the biased rule's exact law of t2 (t1 from the
    target; the first draft token x ~ q accepted with probability min(1, p/q), else t2 ~ p: min(p, q) + (1 -
    sum min(p, q)) p) is farther from the target's than the TV check's bound plus a McDiarmid margin, so the
    biased runs fail that check with probability >= 1 - DELTA.
    """
    import blockspec.engine.acceptance as acceptance

    hf, target, draft = tiny_pair
    params, runs = E2E_CASES["t1"], 2500
    joint = exact_joint(hf, PROMPT, params)
    first = joint.sum((1, 2))
    biased_t2 = torch.zeros(TV_VOCAB, dtype=torch.float64)
    for t1 in range(TV_VOCAB):
        p = joint[t1].sum(1) / first[t1]
        overlap = torch.minimum(p, draft_probs_after(target, draft, t1, params))
        biased_t2 += first[t1] * (overlap + (1 - overlap.sum()) * p)
    distance = tv(biased_t2, joint.sum((0, 2)))
    assert distance > tv_bound(runs, TV_VOCAB) + mcdiarmid_margin(runs), \
        f"the biased rule's t2 is only {distance:.3f} away in TV: the check would hinge on the draw"
    monkeypatch.setattr(acceptance, "accept_sampled", biased_resample_from_p)
    samples, _ = _sample_runs(SpeculativeDecoder(target, draft), params, runs, seed0=1000)
    with pytest.raises(AssertionError):
        _assert_matches(samples, joint)


def test_point_mass_draft_sampling_matches_target_distribution(tiny_pair):
    hf, target, draft = tiny_pair
    params = E2E_CASES["t1"]
    decoder = SpeculativeDecoder(target, PointMassProposer(draft, target.model))
    samples, lengths = _sample_runs(decoder, params, 1500, seed0=50_000)
    assert max(lengths) > 1  # some greedy drafts were accepted
    _assert_matches(samples, exact_joint(hf, PROMPT, params))


def test_autoregressive_sampling_matches_target_distribution(tiny_pair):
    hf, target, _ = tiny_pair
    params = E2E_CASES["t0.8-topk5-topp0.9"]
    samples, lengths = _sample_runs(SpeculativeDecoder(target, None), params, 1500, seed0=90_000)
    assert set(lengths) == {1}
    _assert_matches(samples, exact_joint(hf, PROMPT, params))


# ---- seeds ---------------------------------------------------------------------------------------------
def _gen(decoder, seed, block_size=None, **kw):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=seed, ignore_eos=True, **kw)
    return decoder.generate(PROMPT, params, block_size=block_size)


@pytest.mark.parametrize("use_draft", [True, False])
def test_same_seed_same_output(tiny_pair, use_draft):
    _, target, draft = tiny_pair
    decoder = SpeculativeDecoder(target, draft if use_draft else None)
    for seed in (0, 1, 12345):
        a, b = _gen(decoder, seed), _gen(decoder, seed)
        assert a.token_ids == b.token_ids
        assert a.stats.acceptance_lengths == b.stats.acceptance_lengths
    # a fresh decoder object with the same seed reproduces too
    assert _gen(SpeculativeDecoder(target, draft if use_draft else None), 7).token_ids == _gen(decoder, 7).token_ids


@pytest.mark.parametrize("use_draft", [True, False])
def test_different_seeds_differ(tiny_pair, use_draft):
    _, target, draft = tiny_pair
    decoder = SpeculativeDecoder(target, draft if use_draft else None)
    outputs = {tuple(_gen(decoder, seed).token_ids) for seed in range(12)}
    assert len(outputs) >= 6


def test_block_size_one_with_draft_is_autoregressive(tiny_pair):
    _, target, draft = tiny_pair
    with_draft = _gen(SpeculativeDecoder(target, draft), 3, block_size=1)
    plain = _gen(SpeculativeDecoder(target, None), 3)
    assert with_draft.token_ids == plain.token_ids
    assert set(with_draft.stats.acceptance_lengths) == {1}


def test_greedy_speculative_equals_greedy_autoregressive(tiny_pair):
    _, target, draft = tiny_pair
    for prompt in ([1, 5, 2, 7], [3], [6, 6, 0, 1, 2]):
        params = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
        spec = SpeculativeDecoder(target, draft).generate(prompt, params)
        ar = SpeculativeDecoder(target, None).generate(prompt, params)
        assert spec.token_ids == ar.token_ids and len(ar.token_ids) == 16


def test_unseeded_sampling_leaves_global_rng_alone(tiny_pair):
    _, target, draft = tiny_pair
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    SpeculativeDecoder(target, None).generate(PROMPT, SamplingParams(temperature=1.0, max_new_tokens=2))
    assert torch.equal(torch.rand(4), expected)


def test_invalid_params_rejected_by_generate(tiny_pair):
    _, target, draft = tiny_pair
    with pytest.raises(BlockspecError):
        SpeculativeDecoder(target, draft).generate(PROMPT, SamplingParams(temperature=-1.0))
    with pytest.raises(BlockspecError):
        SpeculativeDecoder(target, draft).generate(PROMPT, SamplingParams(max_new_tokens=0))
