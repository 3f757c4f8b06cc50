"""Batched speculative decoding with continuous batching.

Many sequences decode together: per step ONE draft pass and ONE verify pass over the whole batch, each row
accepting its own number of tokens. Rows are the first n slots of static caches [L, max_batch, nKV, max_len,
d]; within a row slot == position, exactly as in the single-sequence engine, so ragged acceptance needs no
padding and rollback no copies: every row carries its own positions.

Sequences join between steps (the prompt is prefilled into the next free row) and leave when done; the last
active row then moves into the hole (only its used cache prefix is copied), so the active rows are always
rows [0, n) and a step runs on a prefix of every buffer.

On CUDA a step whose rows all decode greedily replays a CUDA graph captured per (batch size rounded up to one
of `graph_batch_sizes`, block size), with one device->host read. The padding rows are idle, parked at
position 0 of free rows that a joining prompt's prefill overwrites before anyone reads them. A step with any
sampling row runs the same modules eagerly and draws each row's tokens from the row's own generator in the
order the single-sequence loop does.

With CUDA graphs the greedy steps are pipelined one deep: `step` launches the next step's graph before it reads
the previous step's tokens (copied to pinned memory behind it), so the host's turn -- the read, the
bookkeeping, the next launch -- overlaps the GPU's work instead of idling it. The device state already holds
everything the next step needs; a row that the read shows finished simply has one wasted step, whose tokens
are dropped. A step with a sampling row first commits the step in flight.

Block size per request: a step drafts the largest block any active row asks for; a row with a smaller block
accepts at most its own block - 1 drafts (lossless either way; the compute follows the largest block).

A request whose step cannot be computed (a sampled row whose probabilities are not finite) leaves the batch
with a chunk whose `error` is set; the other rows' step completes as if it had not been there.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from blockspec.draft import DraftModel
from blockspec.engine.sampling import SamplingParams, accept_greedy, accept_sampled, sample, warped_probs
from blockspec.engine.sequence import (GenerationResult, OutputTracker, StreamChunk, check_block_size, check_pair,
                                       check_request, new_generator)
from blockspec.errors import BlockspecError
from blockspec.target import Target

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def _finite(probs: torch.Tensor) -> bool:
    """Whether a sampled row can be drawn from (a NaN or inf anywhere makes torch.multinomial raise)."""
    return bool(torch.isfinite(probs).all())


def _not_finite(model: str) -> str:
    return f"the {model}'s probabilities for this request are not finite (NaN or inf)"


@dataclass(eq=False)
class _Launched:
    """A greedy step in flight: the rows it ran for, and where its accepted counts and tokens arrive."""
    rows: list["_Sequence"]
    host: torch.Tensor  # [n, block + 1] (pinned on CUDA), filled behind the step
    done: torch.cuda.Event | None


@dataclass(eq=False)
class _Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    block_size: int
    output: OutputTracker
    generator: torch.Generator | None
    position: int = 0  # position of the newest committed token (not yet in the target cache)
    steps: int = 0  # steps committed
    launched: int = 0  # greedy steps launched (one ahead of `steps` while a step is in flight)
    error: str | None = None  # why this request's step could not be computed (it leaves the batch)


class BatchDecoder:
    """Decodes up to `max_batch` sequences at once with `target`, drafting with `draft` (None: batched
    autoregressive decoding). Each row holds up to `max_len` positions (prompt + new tokens + 2 blocks).

    Drive it with `add` (queue a request), `step` (admit waiting requests into free rows, then decode one
    step for every row) and `cancel`; `generate` runs a list of prompts to completion.
    """

    def __init__(self, target: Target, draft: DraftModel | None = None, *, max_batch: int = 8,
                 max_len: int | None = None, block_size: int | None = None, use_graphs: bool = True,
                 graph_batch_sizes: tuple[int, ...] = GRAPH_BATCH_SIZES) -> None:
        check_pair(target, draft)
        if not isinstance(max_batch, int) or max_batch < 1:
            raise BlockspecError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.target, self.draft, self.max_batch = target, draft, max_batch
        self.max_block = draft.block_size if draft is not None else 1
        self.block_size = check_block_size(block_size, self.max_block)
        model = target.model
        self.max_len = max_len or min(model.config.max_position_embeddings, 4096)
        self.tap_ids = tuple(draft.config.target_layer_ids) if draft is not None else ()
        self.use_graphs = use_graphs and target.device.type == "cuda"
        self.pad_rows = self.use_graphs  # run steps on the batch rounded up to a graph size (tests force it)
        self.pipeline = self.use_graphs  # launch each greedy step before reading the last one (tests force it)
        self.graph_batch_sizes = sorted({s for s in graph_batch_sizes if s < max_batch} | {max_batch})

        try:
            self.target_cache = model.new_cache(max_batch, self.max_len)
            self.draft_cache = draft.new_cache(max_batch, self.max_len) if draft is not None else None
        except (torch.OutOfMemoryError, RuntimeError) as exc:  # CPU allocators raise RuntimeError
            if "memory" not in str(exc).lower():
                raise
            raise BlockspecError(f"no memory for the KV caches of {max_batch} sequences x {self.max_len} positions "
                                 f"on {target.device}: lower the batch size (--max-num-seqs) or the length "
                                 f"(--max-model-len)") from None
        long = dict(device=target.device, dtype=torch.long)
        width = len(self.tap_ids) * model.config.hidden_size
        # Device state, one row per sequence. feat/feat_pos: the target taps of each row's last verified block
        # and their positions, stored into the draft cache by the next draft pass; only the accepted ones are
        # real, the rest land on slots at or after the next block start, which that block overwrites first.
        self.last_token = torch.zeros(max_batch, **long)  # newest committed token, block slot 0
        self.start = torch.zeros(max_batch, **long)  # its position
        self.feat = torch.zeros(max_batch, self.max_block, max(width, 1), device=target.device, dtype=target.dtype)
        self.feat_pos = torch.zeros(max_batch, self.max_block, **long)
        self.cap = torch.zeros(max_batch, **long)  # the most drafts a row may accept: its block size - 1
        self.forced = torch.full((max_batch,), -1, **long)  # oracle acceptance (benchmarks), -1 = off
        self.offsets = torch.arange(self.max_block, **long)
        self.out = torch.zeros(max_batch, self.max_block + 1, **long)  # accepted count, then the target's choices
        # two host copies of `out` (a step's is read while the next one fills the other) and of the forced
        # acceptance (a pinned host->device copy does not stall the stream the way a pageable one does)
        pinned = target.device.type == "cuda"
        self._out_host = [torch.zeros(max_batch * (self.max_block + 1), dtype=torch.long, pin_memory=pinned)
                          for _ in range(2)]
        self._forced_host = [torch.zeros(max_batch, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._flip = 0
        self._in_flight: _Launched | None = None

        self.rows: list[_Sequence] = []  # active sequences; index == cache row
        self.waiting: deque[_Sequence] = deque()
        self.forced_acceptance: list[int] | None = None  # oracle schedule per sequence step, cycled
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._graph_pool = None  # one memory pool for every graph: they never run at the same time
        self._next_id = 0

    # ---- public API -------------------------------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return len(self.rows)

    @property
    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def add(self, prompt_ids: list[int], params: SamplingParams | None = None, block_size: int | None = None) -> int:
        """Queue a request; it joins the batch at the next `step` with a free row. Returns its id."""
        params = check_request(self.target, prompt_ids, params)
        block = self.block_size if block_size is None else check_block_size(block_size, self.max_block)
        if len(prompt_ids) + params.max_new_tokens + 2 * self.max_block > self.max_len:
            raise BlockspecError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) does "
                                 f"not fit the decoder's static cache rows of {self.max_len} positions (2 blocks of "
                                 f"{self.max_block} included); shorten them or raise max_len")
        output = OutputTracker(self.target, params, block, len(prompt_ids))
        seq = _Sequence(self._next_id, list(prompt_ids), params, block, output,
                        new_generator(params, self.target.device))
        self._next_id += 1
        self.waiting.append(seq)
        return seq.seq_id

    def cancel(self, seq_id: int) -> bool:
        """Drop a waiting or running request now; False if it is unknown or already finished."""
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                return True
        for row, seq in enumerate(self.rows):
            if seq.seq_id == seq_id:
                self._leave(row)
                return True
        return False

    @torch.inference_mode()
    def step(self) -> list[tuple[int, StreamChunk]]:
        """Admit waiting requests into free rows, then one draft + verify step for every active row.
        Returns (request id, chunk) for each request that committed tokens; a finished request's chunk
        carries its result and a failed request's chunk its error, and the request has left the batch."""
        chunks: dict[int, StreamChunk] = {}
        while self.waiting and len(self.rows) < self.max_batch:
            self._join(self.waiting.popleft(), chunks)
        self._retire_finished()
        if self.rows:
            self._decode(chunks)
            self._retire_finished()
        return list(chunks.items())

    def capture_graphs(self, block_sizes: tuple[int, ...] | None = None) -> int:
        """Capture the greedy step for every graph batch size and these block sizes now (default: the
        default block), so that no request pays for a capture later. Returns the number of graphs held."""
        if self.use_graphs:
            with torch.inference_mode():
                for block in block_sizes or (self.block_size,):
                    block = check_block_size(block, self.max_block)
                    for size in self.graph_batch_sizes:
                        if (size, block) not in self._graphs:
                            self._capture(size, block)
        return len(self._graphs)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 block_size: int | None = None) -> list[GenerationResult]:
        """Decode every prompt (continuous batching when there are more than `max_batch`); results in order."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add(p, q, block_size) for p, q in zip(prompts, per_prompt)]
        wanted, results = set(ids), {}
        while wanted - results.keys():
            for seq_id, chunk in self.step():
                if chunk.result is not None and seq_id in wanted:
                    results[seq_id] = chunk.result
        return [results[i] for i in ids]

    # ---- joining and leaving ------------------------------------------------------------------------------
    def _join(self, seq: _Sequence, chunks: dict[int, StreamChunk]) -> None:
        """Prefill the prompt into the next free row and commit the first token."""
        row = len(self.rows)
        target, device = self.target.model, self.target.device
        n = len(seq.prompt_ids)
        ids = torch.tensor([seq.prompt_ids], device=device)
        positions = torch.arange(n, device=device)[None]
        hidden, features = target(ids, positions, self.target_cache.rows(row, row + 1), self.tap_ids, kv_len=n)
        logits = target.logits(hidden[0, -1:])
        if seq.params.greedy:
            token = int(logits.argmax(-1))
        else:
            probs = warped_probs(logits, seq.params)
            if not _finite(probs):  # the row was never claimed: nothing to undo
                chunks[seq.seq_id] = StreamChunk([], "", error=_not_finite("target"))
                return
            token = int(sample(probs, seq.generator))
        if self.draft is not None:  # the prompt becomes draft context now; nothing is pending for this row
            self.draft.store_context(features, positions, self.draft_cache.rows(row, row + 1))
        self.last_token[row] = token
        self.start[row] = n
        self.feat_pos[row] = n + self.offsets  # dummy rows on slots the first block overwrites
        self.cap[row] = seq.block_size - 1
        self.forced[row] = -1
        seq.position = n
        self.rows.append(seq)
        self._commit(seq, [token], chunks)

    def _retire_finished(self) -> None:
        for row in reversed(range(len(self.rows))):
            if self.rows[row].output.done:
                self._leave(row)

    def _leave(self, row: int) -> None:
        """Free `row`; the last active row moves into it so that the active rows stay [0, n)."""
        last = len(self.rows) - 1
        if row != last:
            moved = self.rows[last]
            # committed K/V and draft context live at slots < position; a step in flight may have written up
            # to a block more, which it commits later; everything after that is rewritten
            length = min(moved.position + self.max_block, self.max_len)
            self.target_cache.copy_row(last, row, length)
            if self.draft_cache is not None:
                self.draft_cache.copy_row(last, row, length)
            for state in (self.last_token, self.start, self.feat, self.feat_pos, self.cap, self.forced):
                state[row] = state[last]
            self.rows[row] = moved
        self.rows.pop()
        self._park(last, last + 1)

    def _park(self, first: int, stop: int) -> None:
        """Make rows [first, stop) idle: position 0, nothing accepted (CUDA-graph padding runs them)."""
        for state in (self.start, self.last_token, self.cap):
            state[first:stop] = 0
        self.forced[first:stop] = -1

    def _commit(self, seq: _Sequence, tokens: list[int], chunks: dict[int, StreamChunk]) -> None:
        chunk = seq.output.commit(tokens)
        earlier = chunks.get(seq.seq_id)
        if earlier is not None:  # the prefill token and the first step's tokens, in one chunk
            chunk = StreamChunk(earlier.token_ids + chunk.token_ids, earlier.text + chunk.text, chunk.result)
        chunks[seq.seq_id] = chunk

    # ---- one decoding step --------------------------------------------------------------------------------
    def _decode(self, chunks: dict[int, StreamChunk]) -> None:
        if not all(seq.params.greedy for seq in self.rows):
            self._finish_in_flight(chunks)  # a sampling step starts from every earlier token committed
            self._retire_finished()
            if not self.rows:
                return
        n = len(self.rows)
        block = max(seq.block_size for seq in self.rows)
        if all(seq.params.greedy for seq in self.rows):
            self._set_forced(n)
            launched = self._launch_greedy(n, block)
            if self.pipeline:  # read the previous step while this one runs
                launched, self._in_flight = self._in_flight, launched
            if launched is not None:
                self._commit_launched(launched, chunks)
            return
        for seq, step in zip(self.rows, self._mixed(n, block)):
            if step is not None:
                self._commit_step(seq, *step, chunks)
        self._drop_failed(chunks)

    def _drop_failed(self, chunks: dict[int, StreamChunk]) -> None:
        for row in reversed(range(len(self.rows))):
            seq = self.rows[row]
            if seq.error is not None:
                self._leave(row)
                chunks[seq.seq_id] = StreamChunk([], "", error=seq.error)

    def _commit_step(self, seq: _Sequence, accepted: int, tokens: list[int], chunks: dict[int, StreamChunk]) -> None:
        seq.output.stats.acceptance_lengths.append(accepted + 1)
        seq.position += accepted + 1
        seq.steps += 1
        self._commit(seq, tokens, chunks)

    def _commit_launched(self, launched: _Launched, chunks: dict[int, StreamChunk]) -> None:
        """Commit a greedy step's tokens for its rows that are still decoding (a row that finished or was
        cancelled after the launch had a wasted step)."""
        if launched.done is not None:
            launched.done.synchronize()
        active = {id(seq) for seq in self.rows}
        for seq, row in zip(launched.rows, launched.host.tolist()):
            if id(seq) in active:
                self._commit_step(seq, row[0], row[1:2 + row[0]], chunks)

    def _finish_in_flight(self, chunks: dict[int, StreamChunk]) -> None:
        launched, self._in_flight = self._in_flight, None
        if launched is not None:
            self._commit_launched(launched, chunks)

    def _set_forced(self, n: int) -> None:
        """Oracle acceptance for the next step (benchmarks), through a pinned buffer: a pageable copy would
        wait for the step in flight."""
        if not self.forced_acceptance:
            return
        schedule = self.forced_acceptance
        host = self._forced_host[self._flip][:n]
        host.copy_(torch.tensor([schedule[seq.launched % len(schedule)] for seq in self.rows]))
        self.forced[:n].copy_(host, non_blocking=True)

    def _kv_len(self, block: int) -> int:
        """Cache slots the CPU attention reads (the Triton kernel reads the limits from the device); with a
        step in flight the rows may be a block further than the host has committed."""
        if self.use_graphs:
            return self.max_len
        ahead = block if self._in_flight is not None else 0
        return min(self.max_len, max(seq.position for seq in self.rows) + block + ahead)

    def _launch_greedy(self, n: int, block: int) -> _Launched:
        """Run (or replay) the greedy step for rows [0, n) and queue the copy of its result to the host."""
        padded = next(s for s in self.graph_batch_sizes if s >= n) if self.pad_rows else n
        if self.use_graphs:
            graph = self._graphs.get((padded, block)) or self._capture(padded, block)
            graph.replay()
        else:
            self._greedy_step(padded, block, self._kv_len(block))
        if padded > n:
            self._park(n, padded)  # padding rows advanced; back to position 0
        for seq in self.rows:
            seq.launched += 1
        host = self._out_host[self._flip][:n * (block + 1)].view(n, block + 1)  # contiguous: a true async copy
        self._flip ^= 1
        host.copy_(self.out[:n, :block + 1], non_blocking=True)  # the one device->host read of the step
        done = None
        if self.out.is_cuda:
            done = torch.cuda.Event()
            done.record()
        return _Launched(list(self.rows), host, done)

    def _greedy_step(self, nb: int, block: int, kv_len: int) -> None:
        """Rows [0, nb): draft, verify, greedy acceptance, state update -- all on the device (graph-capturable)."""
        model = self.target.model
        block_pos = self.start[:nb, None] + self.offsets[None, :block]
        draft_hidden = self._draft_hidden(nb, block, block_pos, kv_len)
        last = self.last_token[:nb, None]
        if draft_hidden is None:
            draft_tokens, block_ids = None, last
        else:
            draft_tokens = model.greedy_tokens(draft_hidden)
            block_ids = torch.cat([last, draft_tokens], dim=1)
        hidden, verify_feat = self._verify(nb, block_ids, block_pos, kv_len)
        choices = model.greedy_tokens(hidden)  # [nb, block]
        if draft_tokens is None:
            accepted = torch.zeros_like(self.start[:nb])
        else:
            accepted = (draft_tokens == choices[:, :-1]).long().cumprod(1).sum(1)
        accepted = torch.where(self.forced[:nb] >= 0, self.forced[:nb], accepted)
        accepted = torch.minimum(accepted, self.cap[:nb]).clamp(max=block - 1)
        self.out[:nb, 0] = accepted
        self.out[:nb, 1:block + 1] = choices
        self._advance(nb, block, accepted, choices.gather(1, accepted[:, None])[:, 0], verify_feat)

    def _mixed(self, n: int, block: int) -> list[tuple[int, list[int]] | None]:
        """An eager step for a batch with sampling rows: (accepted drafts, committed tokens) per row, or None
        for a row whose probabilities are not finite (its `error` is set; it draws nothing)."""
        kv_len = self._kv_len(block)
        block_pos = self.start[:n, None] + self.offsets[None, :block]
        draft_hidden = self._draft_hidden(n, block, block_pos, kv_len)
        draft_logits = self.target.model.logits(draft_hidden) if draft_hidden is not None else None
        draft_tokens = torch.zeros(n, block - 1, dtype=torch.long, device=self.target.device)
        proposals = []
        for row, seq in enumerate(self.rows):
            k = seq.block_size - 1 if draft_logits is not None else 0
            probs = None
            if seq.params.greedy:
                tokens = draft_logits[row, :k].argmax(-1) if k else draft_tokens[row, :0]
            else:
                probs = warped_probs(draft_logits[row, :k], seq.params) if k else None
                if probs is not None and not _finite(probs):
                    seq.error, probs = _not_finite("draft"), None
                tokens = sample(probs, seq.generator) if probs is not None else draft_tokens[row, :0]
            draft_tokens[row, :tokens.shape[0]] = tokens
            proposals.append((tokens, probs))
        block_ids = torch.cat([self.last_token[:n, None], draft_tokens], dim=1)
        hidden, verify_feat = self._verify(n, block_ids, block_pos, kv_len)
        logits = self.target.model.logits(hidden)
        results: list[tuple[int, list[int]] | None] = []
        for row, (seq, (tokens, probs)) in enumerate(zip(self.rows, proposals)):
            k = tokens.shape[0]
            if seq.error is not None:
                results.append(None)
                continue
            if seq.params.greedy:
                host = accept_greedy(tokens, logits[row, :k + 1]).tolist()
                accepted, committed = host[0], host[1:2 + host[0]]
            else:
                target_probs = warped_probs(logits[row, :k + 1], seq.params)
                if not _finite(target_probs):
                    seq.error = _not_finite("target")
                    results.append(None)
                    continue
                accepted, token = accept_sampled(tokens, probs, target_probs, seq.generator)
                committed = tokens[:accepted].tolist() + [token]
            results.append((accepted, committed))
        device = self.target.device
        steps = [step or (0, [0]) for step in results]  # a failed row's state is dropped when it leaves
        accepted = torch.tensor([a for a, _ in steps], device=device)
        next_tokens = torch.tensor([c[-1] for _, c in steps], device=device)
        self._advance(n, block, accepted, next_tokens, verify_feat)
        return results

    def _draft_hidden(self, nb: int, block: int, block_pos: torch.Tensor, kv_len: int) -> torch.Tensor | None:
        """The draft's final hidden states for block slots 1.. [nb, block - 1, H] (the target's lm_head makes them
        logits); None when nothing is drafted (no draft, or block 1, where the pending features are still stored
        so the draft's context stays complete)."""
        if self.draft is None:
            return None
        feat, feat_pos, cache = self.feat[:nb], self.feat_pos[:nb], self.draft_cache.rows(0, nb)
        if block == 1:
            self.draft.store_context(feat, feat_pos, cache)
            return None
        embeds = self.draft.embed_block(self.last_token[:nb], self.target.model.embed_tokens, block)
        return self.draft(embeds, block_pos, feat, feat_pos, cache, kv_len=kv_len)[:, 1:]

    def _verify(self, nb: int, block_ids: torch.Tensor, block_pos: torch.Tensor,
                kv_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The target's final hidden states of the block [nb, block, H] (before the lm_head) and its taps."""
        return self.target.model(block_ids, block_pos, self.target_cache.rows(0, nb), self.tap_ids, kv_len=kv_len)

    def _advance(self, nb: int, block: int, accepted: torch.Tensor, next_tokens: torch.Tensor,
                 verify_feat: torch.Tensor | None) -> None:
        """Commit `accepted` drafts + 1 per row: the verified block's taps become pending draft context."""
        if verify_feat is not None:
            self.feat[:nb, :block] = verify_feat
        self.feat_pos[:nb] = self.start[:nb, None] + self.offsets[None]  # the verified block's positions
        self.last_token[:nb] = next_tokens
        self.start[:nb] += accepted + 1

    # ---- CUDA graphs ----------------------------------------------------------------------------------
    def _capture(self, nb: int, block: int) -> torch.cuda.CUDAGraph:
        """Capture the greedy step for `nb` rows and this block size. Warm-up runs advance the state, so it is
        restored; their cache writes land on slots at or after each row's block start (rewritten later)."""
        state = (self.last_token, self.start, self.feat, self.feat_pos)
        saved = [t[:nb].clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._greedy_step(nb, block, self.max_len)
        torch.cuda.current_stream().wait_stream(stream)
        for live, copy in zip(state, saved):
            live[:nb] = copy
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._graph_pool):  # capturing records kernels without running them
            self._greedy_step(nb, block, self.max_len)
        self._graphs[(nb, block)] = graph
        return graph
