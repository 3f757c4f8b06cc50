"""The decoding engine: speculative decoding of many sequences at once, with continuous batching.

One step for all active rows: ONE draft pass (the proposer), ONE verify pass of the target over each row's
block, the acceptance rule (engine/acceptance.py), and the state update; each row accepts its own number of
tokens. A single sequence is a batch of one (`SpeculativeDecoder` wraps exactly that), and plain
autoregressive decoding is the same step with a block of one token.

Rows are the first n slots of static caches [L, max_batch, nKV, max_len, d]; within a row slot == position, so
ragged acceptance needs no padding and rollback no copies: every row carries its own positions. Targets with
recurrent state (cache.commit) keep the state of the accepted prefix instead.

Sequences join between steps and leave when done. The requests joining in one step are prefilled together, in
one target forward over their prompts right-padded to the longest (at most `max_prefill_tokens` rows x longest,
so that a long prompt does not pad many short ones); a target with recurrent state stops each row's state at its
own last token (the forward's `lengths`). Every group of one admission is queued on the device before the host
reads the first group's tokens, so the groups' prefills run back to back. When a sequence leaves, the last active
row moves into the hole (only its used cache prefix is copied), so the active rows are always rows [0, n) and a
step runs on a prefix of every buffer. A request whose step cannot be computed (a sampled row whose probabilities
are not finite) leaves the batch with a chunk whose `error` is set; the other rows' step completes as if it had not
been there.

On CUDA a step replays a CUDA graph captured per (batch size rounded up to one of `graph_batch_sizes`, block
size, mode), with one device->host read. Mode "greedy": every row decodes greedily, the lm_head fused with its
argmax. Mode "sample" (or "sample_truncated", when a row has a top-k or top-p): the logits are written and each
row samples under its own settings, which live on the device beside its position; its randomness is drawn
before the step from its own generator (the same numbers whatever else is in the batch) into a buffer the graph
reads. The padding rows are idle, parked at position 0 of free rows that a joining prompt's prefill overwrites
before anyone reads them. A group of up to JOIN_GRAPH_PROMPTS prompts joining together (up to JOIN_GRAPH_TOKENS
padded) replays a graph too, one per group size and longest length rounded up to JOIN_BUCKET: it is prefilled
padded in the last rows (free whenever as many rows are), which then move to the next free rows. A step with a
row that returns log-probabilities is not pipelined: its logits are read once it ends (mode "logits" when every
row is greedy).

With CUDA graphs the steps are pipelined one deep: `step` launches the next step's graph before it reads
the previous step's tokens (copied to pinned memory behind it), so the host's turn -- the read, the
bookkeeping, the next launch -- overlaps the GPU's work instead of idling it. The device state already holds
everything the next step needs; a row that the read shows finished simply has one wasted step, whose tokens
are dropped. When the step in flight may bring every row to its length limit, it is read before the next
launch: a batch that drains wastes no step. An eager step first commits the step in flight.

Block size per request: a step drafts the largest block any active row asks for; a row with a smaller block
accepts at most its own block - 1 drafts (lossless either way; the compute follows the largest block). With
`max_step_tokens` the block also shrinks as the batch grows: the largest power of two whose rows x block fits
it (at least 2), since a verify of many rows stops being bound by reading the weights once and the best block
then falls. A request with block 1 is plain decoding and never needs the proposer: a step whose rows all have
block 1 runs the target alone, without taps (on CUDA, one row of it takes the target's batch-1 decode kernel). A
draft pass reads as many of the last verify's context slots as its block has; before a step whose block is smaller
than the last one, the proposer takes all of that verify's slots into its context (`settle`).
"""

from __future__ import annotations

from array import array
from collections import deque
from dataclasses import dataclass

import torch

from blockspec.cache import DEFAULT_ROLLBACK
from blockspec.draft import DraftModel
from blockspec.engine import acceptance
from blockspec.engine.acceptance import greedy_accepted
from blockspec.engine.proposer import DraftProposer, Proposer
from blockspec.engine.sampling import (RowSampling, SamplingParams, TokenLogprob, draw, draw_uniforms, token_logprobs,
                                       truncates)
from blockspec.engine.sequence import (GenerationResult, OutputTracker, StreamChunk, check_block_size, check_pair,
                                       check_request, new_generator)
from blockspec.errors import BlockspecError
from blockspec.target import Target

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
MAX_PREFILL_TOKENS = 16384  # padded tokens (rows x longest prompt) of one joint prefill
# A group of up to JOIN_GRAPH_PROMPTS prompts prefilled together, up to JOIN_GRAPH_TOKENS padded, replays a CUDA graph
# captured for its size and longest length rounded up to a multiple of JOIN_BUCKET (an eager prefill of a few
# prompts waits on the host; larger groups keep the device busier than the host)
JOIN_GRAPH_PROMPTS, JOIN_GRAPH_TOKENS, JOIN_BUCKET = 4, 2048, 128


def _padded_ids(rows: list[list[int]], width: int) -> torch.Tensor:
    """Token ids [len(rows), width] (int64, CPU), each row right-padded with zeros, built in an array: torch.tensor of
    nested lists takes ~60 ns an id (1.9 ms for 32 prompts of 512 tokens, while the device waits for the join)."""
    flat = array("q")
    for row in rows:
        flat.extend(row)
        flat.frombytes(bytes(flat.itemsize * (width - len(row))))
    return torch.frombuffer(flat, dtype=torch.long).view(len(rows), width)


def _queued_so_far(t: torch.Tensor) -> torch.cuda.Event | None:
    """An event the host can wait on for the work queued so far on t's device (None off CUDA: it is done already)."""
    if not t.is_cuda:
        return None
    done = torch.cuda.Event()
    done.record()
    return done


@dataclass(eq=False)
class _Launched:
    """A step in flight: the rows it ran for, its block, and where its outcome arrives (`BatchDecoder.out`)."""
    rows: list["_Sequence"]
    block: int
    host: torch.Tensor  # [n, block + 2] (pinned on CUDA), filled behind the step
    done: torch.cuda.Event | None
    logits: torch.Tensor | None  # the verify's [n, block, V] where the step wrote them (valid until the next step)


@dataclass(eq=False)
class _Joining:
    """A join in flight: its rows' sequences, their first tokens and failures [n, 2] arriving on the host behind
    the prefill, and the logits they were chosen from (for log-probabilities)."""
    seqs: list["_Sequence"]
    host: torch.Tensor
    done: torch.cuda.Event | None
    logits: torch.Tensor


@dataclass(eq=False)
class _JoinGraph:
    """The prefill of a group of g prompts at one padded length: its inputs (ids [g, bucket], lengths [g]) and, once
    captured (CUDA), the graph and the logits it writes."""
    ids: torch.Tensor
    real: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None


@dataclass(eq=False)
class _Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    block_size: int
    output: OutputTracker
    generator: torch.Generator | None
    position: int = 0  # position of the newest committed token (not yet in the target cache)
    failed: bool = False  # its step could not be computed: it leaves the batch


class BatchDecoder:
    """Decodes up to `max_batch` sequences at once with `target`, drafting with `draft` (a DraftModel, any
    Proposer, or None: autoregressive decoding). Each row holds up to `max_len` positions (prompt + new tokens +
    2 blocks).

    Drive it with `add` (queue a request), `step` (admit waiting requests into free rows, then decode one
    step for every row) and `cancel`; `generate` runs a list of prompts to completion. `max_step_tokens`
    (None: off) bounds rows x block per step by shrinking the block as the batch grows; `max_prefill_tokens`
    bounds rows x longest prompt of the requests prefilled together. `rollback` is how a hybrid target's cache
    rolls its recurrent state back after a verify ("states" or "replay", cache.HybridCache).
    """

    def __init__(self, target: Target, draft: DraftModel | Proposer | None = None, *, max_batch: int = 8,
                 max_len: int | None = None, block_size: int | None = None, use_graphs: bool = True,
                 graph_batch_sizes: tuple[int, ...] = GRAPH_BATCH_SIZES, max_step_tokens: int | None = None,
                 max_prefill_tokens: int = MAX_PREFILL_TOKENS, rollback: str = DEFAULT_ROLLBACK) -> None:
        check_pair(target, draft)
        if isinstance(draft, DraftModel):
            draft = DraftProposer(draft, target.model)
        if not isinstance(max_batch, int) or max_batch < 1:
            raise BlockspecError(f"max_batch must be a positive integer, got {max_batch!r}")
        if max_len is not None and (not isinstance(max_len, int) or max_len < 1):
            raise BlockspecError(f"max_len must be a positive integer (positions per row), got {max_len!r}")
        if max_step_tokens is not None and (not isinstance(max_step_tokens, int) or max_step_tokens < 2):
            raise BlockspecError(f"max_step_tokens must be an integer >= 2, got {max_step_tokens!r}")
        if not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1:
            raise BlockspecError(f"max_prefill_tokens must be a positive integer, got {max_prefill_tokens!r}")
        self.max_step_tokens, self.max_prefill_tokens = max_step_tokens, max_prefill_tokens
        self.target, self.proposer, self.max_batch = target, draft, max_batch
        self.max_block = draft.max_block if draft is not None else 1
        self.block_size = check_block_size(block_size, self.max_block)
        model = target.model
        self.max_len = max_len or min(model.config.max_position_embeddings, 4096)
        self.tap_ids = draft.tap_layer_ids if draft is not None else ()
        self.use_graphs = use_graphs and target.device.type == "cuda"
        self.pad_rows = self.use_graphs  # run steps on the batch rounded up to a graph size (tests force it)
        self.graph_joins = self.use_graphs  # small groups prefilled padded, in the last rows (tests force it)
        self.pipeline = self.use_graphs  # launch each greedy step before reading the last one (tests force it)
        self.graph_batch_sizes = sorted({s for s in graph_batch_sizes if s < max_batch} | {max_batch})
        if max_batch == 1 and target.device.type == "cuda":
            model.prepare_fast_path()  # the batch-1 decode kernel, built before any graph is captured

        try:
            self.target_cache = model.new_cache(max_batch, self.max_len, self.max_block, rollback)
            if draft is not None:
                draft.allocate(max_batch, self.max_len)
        except (torch.OutOfMemoryError, RuntimeError) as exc:  # CPU allocators raise RuntimeError
            if "memory" not in str(exc).lower():
                raise
            raise BlockspecError(f"no memory for the KV caches of {max_batch} sequences x {self.max_len} positions "
                                 f"on {target.device}: lower the batch size (--max-num-seqs) or the length "
                                 f"(--max-model-len)") from None
        long = dict(device=target.device, dtype=torch.long)
        # Device state, one row per sequence, in two tensors: joining, leaving and parking rows write them at once.
        self.row_state = torch.zeros(4, max_batch, **long)
        self.last_token = self.row_state[0]  # newest committed token, block slot 0
        self.start = self.row_state[1]  # its position
        self.cap = self.row_state[2]  # the most drafts a row may accept: its block size - 1
        self.top_k = self.row_state[3]  # its sampling settings (0: off) ...
        self.row_settings = torch.zeros(2, max_batch, device=target.device)
        self.temperature, self.top_p = self.row_settings  # ... (temperature 0: greedy)
        self.draws = torch.zeros(max_batch, self.max_block, 3, device=target.device, dtype=torch.float64)
        self.offsets = torch.arange(self.max_block, **long)
        # a step's outcome per row: accepted drafts, failure (acceptance.FAILURES), the drafts, the token after them
        self.out = torch.zeros(max_batch, self.max_block + 2, **long)
        # two host copies of `out`: a step's is read while the next one fills the other (pinned: a true async copy)
        pinned = target.device.type == "cuda"
        self._out_host = [torch.zeros(max_batch * (self.max_block + 2), dtype=torch.long, pin_memory=pinned)
                          for _ in range(2)]
        self._flip = 0
        self._in_flight: _Launched | None = None
        self._last_block = 1  # the block of the last step launched
        # A join's inputs and first tokens cross through one pinned buffer allocated here, each group of an
        # admission in its own part: pinning on demand would allocate while the device runs the groups before it,
        # and the first cudaHostAlloc of a size waits for them.
        self._staging = torch.empty(max_batch * (self.max_len + 16) * 8 if pinned else 0, dtype=torch.uint8,
                                    pin_memory=pinned)
        self._staged = 0  # bytes of it the current admission uses

        self.rows: list[_Sequence] = []  # active sequences; index == cache row
        self.waiting: deque[_Sequence] = deque()
        self._graphs: dict[tuple[int, int, str], torch.cuda.CUDAGraph] = {}
        self._graph_logits: dict[tuple[int, int, str], torch.Tensor] = {}
        self._graph_pool = None  # one memory pool for every graph: they never run at the same time
        self._join_graphs: dict[tuple[int, int, bool], _JoinGraph] = {}  # per (bucket, prompts, drafted)
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
        Returns (request id, chunk) for each request that committed tokens or failed; a finished request's
        chunk carries its result, a failed one's its error, and the request has left the batch. A request
        that joined gets its prefill token and its first step's tokens in one chunk."""
        chunks: dict[int, StreamChunk] = {}
        self._admit(chunks)
        if self.rows:
            self._decode(chunks)
            self._retire_finished()
        return list(chunks.items())

    @torch.inference_mode()
    def admit(self) -> list[tuple[int, StreamChunk]]:
        """Only prefill waiting requests into free rows: (request id, chunk of its first token) each."""
        chunks: dict[int, StreamChunk] = {}
        self._admit(chunks)
        return list(chunks.items())

    def capture_graphs(self, block_sizes: tuple[int, ...] | None = None,
                       modes: tuple[str, ...] = ("greedy", "sample")) -> int:
        """Capture the steps of `graph_shapes(block_sizes)` in `modes` now, so that no request pays for a capture
        later (CUDA only; "sample_truncated" is left to the first request with a top-k or top-p, a small group's
        prefill to the first group of its size and padded length). Returns the number of step graphs held."""
        if self.use_graphs:
            with torch.inference_mode():
                for size, block in sorted(self.graph_shapes(block_sizes)):
                    for mode in modes:
                        if (size, block, mode) not in self._graphs:
                            self._capture(size, block, mode)
        return len(self._graphs)

    def graph_shapes(self, block_sizes: tuple[int, ...] | None = None) -> set[tuple[int, int]]:
        """(graph batch size, block) pairs: with `block_sizes`, each block at every graph batch size; by default
        the shapes that requests at the default block meet: every graph batch size, at the block a step takes there
        (`max_step_tokens` shrinks it as the batch grows)."""
        if block_sizes is not None:
            blocks = [check_block_size(block, self.max_block) for block in block_sizes]
            return {(size, block) for block in blocks for size in self.graph_batch_sizes}
        below = dict(zip(self.graph_batch_sizes, [0, *self.graph_batch_sizes]))  # size -> the size before it
        return {(size, self._step_block(n, self.block_size))
                for size in self.graph_batch_sizes for n in range(below[size] + 1, size + 1)}

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 block_size: int | None = None) -> list[GenerationResult]:
        """Decode every prompt (continuous batching when there are more than `max_batch`); results in order."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add(p, q, block_size) for p, q in zip(prompts, per_prompt)]
        wanted, results = set(ids), {}
        while wanted - results.keys():
            for seq_id, chunk in self.step():
                if chunk.error is not None and seq_id in wanted:
                    raise BlockspecError(f"request {seq_id} failed: {chunk.error}")
                if chunk.result is not None and seq_id in wanted:
                    results[seq_id] = chunk.result
        return [results[i] for i in ids]

    # ---- joining and leaving ------------------------------------------------------------------------------
    def _admit(self, chunks: dict[int, StreamChunk]) -> None:
        joining, self._staged = [], 0
        while self.waiting and len(self.rows) < self.max_batch:
            joining.append(self._join(self._next_joiners()))
        for group in joining:  # every group's prefill is queued before the first read: the device never waits
            self._finish_join(group, chunks)
        self._retire_finished()

    def _next_joiners(self) -> list[_Sequence]:
        """The waiting requests to prefill together next, in arrival order: as many as there are free rows
        while rows x longest prompt fits `max_prefill_tokens` (at least one)."""
        group = [self.waiting.popleft()]
        longest = len(group[0].prompt_ids)
        while self.waiting and len(self.rows) + len(group) < self.max_batch:
            padded = max(longest, len(self.waiting[0].prompt_ids))
            if (len(group) + 1) * padded > self.max_prefill_tokens:
                break
            group.append(self.waiting.popleft())
            longest = padded
        return group

    def _join(self, group: list[_Sequence]) -> _Joining:
        """Prefill the prompts of `group` in one target forward into the next free rows, right-padded to the
        longest (a row's padding slots hold garbage K/V at positions that its own later passes overwrite
        before any query reads them), and choose each one's first token from its own last position. The
        proposer takes the group's taps in one call and the device state is written once, without waiting for
        the device: the tokens come to the host behind the work (`_finish_join` reads them)."""
        first, device = len(self.rows), self.target.device
        lengths = [len(seq.prompt_ids) for seq in group]
        longest = max(lengths)
        drafted = any(seq.block_size > 1 for seq in group)  # plain-decoding requests never need the proposer
        real, bucket = self._upload(lengths), self._join_bucket(lengths)
        if bucket is not None:
            logits = self._prefill_in_last_rows(first, [seq.prompt_ids for seq in group], real, bucket, drafted)
        else:
            logits = self._prefill(first, self._upload(_padded_ids([seq.prompt_ids for seq in group], longest)),
                                   real, drafted, ragged=min(lengths) < longest)
        if all(seq.params.greedy for seq in group):
            tokens, failed = logits.argmax(-1), torch.zeros(len(group), dtype=torch.long, device=device)
        else:
            rows = RowSampling.of([seq.params for seq in group], device)
            draws = draw_uniforms(torch.zeros(len(group), 1, 3, device=device, dtype=torch.float64),
                                  [seq.generator for seq in group], [1] * len(group))
            tokens, probs = draw(logits, rows, draws[:, 0, 2])
            failed = (~torch.isfinite(probs).all(-1) & ~rows.greedy).long()
        stop = first + len(group)  # every row is claimed; a failed one leaves at the next retire
        caps = self._upload([[seq.block_size - 1, seq.params.top_k] for seq in group])
        self.row_state[:, first:stop] = torch.cat([torch.stack([tokens, real]), caps.T])
        self.row_settings[:, first:stop] = self._upload(
            [[seq.params.temperature, seq.params.top_p] for seq in group], torch.float32).T
        for seq, n in zip(group, lengths):
            seq.position = n
            self.rows.append(seq)
        outcome = torch.stack([tokens, failed], dim=1)
        host = self._pinned(outcome.shape, torch.long).copy_(outcome, non_blocking=True) if outcome.is_cuda else outcome
        return _Joining(group, host, _queued_so_far(outcome), logits)

    def _prefill(self, first: int, ids: torch.Tensor, real: torch.Tensor, drafted: bool, ragged: bool
                 ) -> torch.Tensor:
        """One target forward over the prompts `ids` [g, width] (right-padded past `real` [g] tokens where `ragged`)
        into rows [first, first + g); with `drafted` they become the proposer's context (nothing is pending for
        these rows). Returns the logits at each prompt's last token [g, V]."""
        g, width = ids.shape
        positions = torch.arange(width, device=ids.device).repeat(g, 1)
        hidden, features = self.target.model(ids, positions, self.target_cache.rows(first, first + g),
                                             self.tap_ids if drafted else (), kv_len=width,
                                             lengths=real if ragged else None)
        if drafted:
            self.proposer.join(first, features, positions, real)
        return self.target.model.logits(hidden[torch.arange(g, device=ids.device), real - 1])

    def _join_bucket(self, lengths: list[int]) -> int | None:
        """The padded length at which a group of prompts replays a captured prefill (None: an eager one)."""
        bucket = -(-max(lengths) // JOIN_BUCKET) * JOIN_BUCKET
        if (self.graph_joins and len(lengths) <= JOIN_GRAPH_PROMPTS and len(lengths) * bucket <= JOIN_GRAPH_TOKENS
                and bucket <= self.max_len):
            return bucket
        return None

    def _prefill_in_last_rows(self, first: int, prompts: list[list[int]], real: torch.Tensor, bucket: int,
                              drafted: bool) -> torch.Tensor:
        """`_prefill` of g prompts padded to `bucket` tokens into the last g rows (free: rows from `first` on are),
        on CUDA a graph per (bucket, g, drafted) captured after its first, eager, run; the rows then move to
        `first` on. An eager prefill of a few prompts waits on the host (hundreds of launches), several times its
        kernels' time. Returns the logits, a copy of the graph's (which the next group of this shape rewrites,
        maybe in this admission)."""
        g = len(prompts)
        scratch = self.max_batch - g
        join = self._join_graphs.get((bucket, g, drafted))
        if join is None:
            join = self._join_graphs[(bucket, g, drafted)] = _JoinGraph(
                torch.zeros(g, bucket, dtype=torch.long, device=real.device), torch.zeros_like(real))
        join.ids.copy_(self._upload(_padded_ids(prompts, bucket)))
        join.real.copy_(real)
        if join.graph is not None:
            join.graph.replay()
            logits = join.logits.clone()
        else:
            logits = self._prefill(scratch, join.ids, join.real, drafted, ragged=True)
            if self.use_graphs:
                self._capture_join(join, scratch, drafted)
        for i, prompt in enumerate(prompts):  # in order: a row's destination is never a later row's source
            if scratch + i != first + i:
                self.target_cache.copy_row(scratch + i, first + i, len(prompt))
                if drafted:
                    self.proposer.move_row(scratch + i, first + i, len(prompt))
        return logits

    def _finish_join(self, joining: _Joining, chunks: dict[int, StreamChunk]) -> None:
        """Commit the first token of each row of a join, or its failure (its row leaves at the next retire)."""
        if joining.done is not None:
            joining.done.synchronize()
        outcome = joining.host.tolist()
        logprobs = self._logprobs(joining.seqs, joining.logits[:, None], [row[:1] for row in outcome],
                                  [row[1] for row in outcome])
        for i, (seq, (token, failure)) in enumerate(zip(joining.seqs, outcome)):
            if failure:
                chunks[seq.seq_id] = StreamChunk([], "", error=acceptance.FAILURES[acceptance.TARGET_NOT_FINITE])
                seq.failed = True
            else:
                self._commit(seq, [token], chunks, logprobs.get(i))

    def _upload(self, data: list | torch.Tensor, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """`data` (a list, or a CPU tensor of `dtype`) on the device without waiting for it (a plain copy from the
        host would wait for every launch before it): through pinned memory, queued behind the work before it."""
        host = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
        if self.target.device.type != "cuda":
            return host
        return self._pinned(host.shape, dtype).copy_(host).to(self.target.device, non_blocking=True)

    def _pinned(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The next unused part of the staging buffer as a tensor: it stays this admission's (a group's copies may
        still be queued) and is reused by the next, which starts after every read of this one."""
        start = -(-self._staged // 8) * 8  # 8-byte aligned for any dtype
        self._staged = start + shape.numel() * dtype.itemsize
        if self._staged > self._staging.numel():
            raise RuntimeError(f"join staging overflow: {self._staged} > {self._staging.numel()} bytes")
        return self._staging[start:self._staged].view(dtype).view(shape)

    def _retire_finished(self) -> None:
        active = len(self.rows)
        for row in reversed(range(active)):
            if self.rows[row].output.done or self.rows[row].failed:
                self._vacate(row)
        if len(self.rows) < active:
            self._park(len(self.rows), active)

    def _leave(self, row: int) -> None:
        """Free `row` (`_vacate`) and park the row that became free."""
        self._vacate(row)
        self._park(len(self.rows), len(self.rows) + 1)

    def _vacate(self, row: int) -> None:
        """Free `row`: the last active row moves into it, so that the active rows stay [0, n). The caller parks
        the rows this frees (once for many)."""
        last = len(self.rows) - 1
        if row != last:
            moved = self.rows[last]
            # committed K/V and draft context live at slots < position; a step in flight may have written up
            # to a block more, which it commits later; everything after that is rewritten
            length = min(moved.position + self.max_block, self.max_len)
            self.target_cache.copy_row(last, row, length)
            if self.proposer is not None:
                self.proposer.move_row(last, row, length)
            self.row_state[:, row] = self.row_state[:, last]
            self.row_settings[:, row] = self.row_settings[:, last]
            self.rows[row] = moved
        self.rows.pop()

    def _park(self, first: int, stop: int) -> None:
        """Make rows [first, stop) idle: position 0, nothing accepted, greedy (CUDA-graph padding runs them)."""
        self.row_state[:, first:stop] = 0
        self.row_settings[:, first:stop] = 0

    def _commit(self, seq: _Sequence, tokens: list[int], chunks: dict[int, StreamChunk],
                logprobs: list[TokenLogprob] | None = None) -> None:
        chunk = seq.output.commit(tokens, logprobs)
        earlier = chunks.get(seq.seq_id)
        if earlier is not None:  # the prefill token and the first step's tokens, in one chunk
            both = earlier.logprobs + chunk.logprobs if chunk.logprobs is not None else None
            chunk = StreamChunk(earlier.token_ids + chunk.token_ids, earlier.text + chunk.text, chunk.result,
                                logprobs=both)
        chunks[seq.seq_id] = chunk

    def _commit_step(self, seq: _Sequence, block: int, accepted: int, tokens: list[int],
                     chunks: dict[int, StreamChunk], logprobs: list[TokenLogprob] | None = None) -> None:
        seq.output.stats.acceptance_lengths.append(accepted + 1)
        seq.output.stats.step_blocks.append(min(block, seq.block_size))
        seq.position += accepted + 1
        self._commit(seq, tokens, chunks, logprobs)

    # ---- one decoding step --------------------------------------------------------------------------------
    def _decode(self, chunks: dict[int, StreamChunk]) -> None:
        scored = any(seq.params.logprobs is not None for seq in self.rows)
        # A step whose logits are read starts from every earlier token committed; and when the step in flight may
        # finish every row, it is read before another is launched, which would only be wasted (the batch drains).
        if scored or self._in_flight_may_end_all():
            self._finish_in_flight(chunks)
            self._retire_finished()
            if not self.rows:
                return
        n = len(self.rows)
        block = self._step_block(n, max(seq.block_size for seq in self.rows))
        if self.proposer is not None and 1 < block < self._last_block:  # its proposal takes `block` context slots
            self.proposer.settle(n, self._last_block)
        self._last_block = block
        if scored:
            self.logits_step(n, block, chunks)
            return
        launched = self._launch(n, block, self._mode())
        if self.pipeline:  # read the previous step while this one runs
            launched, self._in_flight = self._in_flight, launched
        if launched is not None:
            self._commit_launched(launched, chunks)

    def _in_flight_may_end_all(self) -> bool:
        """Whether the step in flight could bring every row to its length limit."""
        flight = self._in_flight
        return flight is not None and all(
            seq.params.max_new_tokens - len(seq.output.generated) <= flight.block for seq in self.rows)

    def _mode(self) -> str:
        """The step's mode (module docstring) for the active rows."""
        params = [seq.params for seq in self.rows]
        if all(p.greedy for p in params):
            return "greedy"
        return "sample_truncated" if truncates(params) else "sample"

    def _step_block(self, n: int, block: int) -> int:
        """The block of a step of n rows whose largest own block is `block` (see the module docstring)."""
        if self.max_step_tokens is not None and block > 2:
            fit = max(2, self.max_step_tokens // n)
            block = min(block, 1 << (fit.bit_length() - 1))
        return block

    def _commit_launched(self, launched: _Launched, chunks: dict[int, StreamChunk],
                         logits: torch.Tensor | None = None) -> None:
        """Commit a step's tokens for its rows that are still decoding (a row that finished or was cancelled after
        the launch had a wasted step); a row whose step failed gets an error chunk and leaves at the next retire.
        With the step's `logits`, the rows that ask for them get their tokens' log-probabilities."""
        if launched.done is not None:
            launched.done.synchronize()
        block, outcome = launched.block, launched.host.tolist()
        committed = [row[2:2 + row[0]] + [row[block + 1]] for row in outcome]
        failures = [row[1] for row in outcome]
        logprobs = self._logprobs(launched.rows, logits, committed, failures) if logits is not None else {}
        active = {id(seq) for seq in self.rows}
        for i, (seq, row, tokens) in enumerate(zip(launched.rows, outcome, committed)):
            if id(seq) not in active or seq.failed:
                continue
            if row[1]:
                chunks[seq.seq_id] = StreamChunk([], "", error=acceptance.FAILURES[row[1]])
                seq.failed = True
            else:
                self._commit_step(seq, block, row[0], tokens, chunks, logprobs.get(i))

    def _finish_in_flight(self, chunks: dict[int, StreamChunk]) -> None:
        launched, self._in_flight = self._in_flight, None
        if launched is not None:
            self._commit_launched(launched, chunks)

    def _kv_len(self, block: int) -> int:
        """Cache slots the CPU attention reads (the Triton kernel reads the limits from the device); with a
        step in flight the rows may be a block further than the host has committed."""
        if self.use_graphs:
            return self.max_len
        ahead = block if self._in_flight is not None else 0
        return min(self.max_len, max(seq.position for seq in self.rows) + block + ahead)

    def _launch(self, n: int, block: int, mode: str) -> _Launched:
        """Run (or replay) the step for rows [0, n) in `mode` and queue the copy of its outcome to the host."""
        padded = next(s for s in self.graph_batch_sizes if s >= n) if self.pad_rows else n
        if mode != "greedy":
            self._draw(n, block)
        if self.use_graphs:
            key = (padded, block, mode)
            graph = self._graphs.get(key) or self._capture(padded, block, mode)
            graph.replay()
            logits = self._graph_logits.get(key)
        else:
            logits = self.run_step(padded, block, self._kv_len(block), mode)
        if padded > n:
            self._park(n, padded)  # padding rows advanced; back to position 0
        return self._read_behind(n, block, logits[:n] if logits is not None else None)

    def _draw(self, n: int, block: int) -> None:
        """Each sampling row's uniforms for a step of `block`: a triple per slot it verifies, and the one after."""
        draw_uniforms(self.draws, [seq.generator for seq in self.rows],
                      [min(seq.block_size, block) for seq in self.rows])

    def _read_behind(self, n: int, block: int, logits: torch.Tensor | None) -> _Launched:
        """Queue the one device->host read of a step's outcome for rows [0, n) (its `logits` kept beside)."""
        host = self._out_host[self._flip][:n * (block + 2)].view(n, block + 2)  # contiguous: a true async copy
        self._flip ^= 1
        host.copy_(self.out[:n, :block + 2], non_blocking=True)
        return _Launched(list(self.rows), block, host, _queued_so_far(self.out), logits)

    def run_step(self, nb: int, block: int, kv_len: int, mode: str) -> torch.Tensor | None:
        """One step for rows [0, nb) in `mode`: `greedy_step`, or `sampling_step` (whose logits it returns)."""
        if mode == "greedy":
            return self.greedy_step(nb, block, kv_len)
        return self.sampling_step(nb, block, kv_len, mode)

    def greedy_step(self, nb: int, block: int, kv_len: int) -> None:
        """Rows [0, nb), every one greedy: draft, verify, acceptance, state update, all on the device
        (graph-capturable); the lm_head's product comes with its argmax, the logits never written."""
        block_pos = self.start[:nb, None] + self.offsets[None, :block]
        last = self.last_token[:nb]
        drafts = self.proposer.propose_greedy(nb, block, last, block_pos, kv_len) if block > 1 \
            else last.new_zeros(nb, 0)
        hidden, taps = self._verify(nb, torch.cat([last[:, None], drafts], dim=1), block_pos, kv_len)
        choices = self.target.model.greedy_tokens(hidden)  # [nb, block]
        accepted = torch.minimum(greedy_accepted(drafts, choices), self.cap[:nb])
        self._finish(nb, block_pos, accepted, torch.zeros_like(accepted), drafts,
                     choices.gather(1, accepted[:, None])[:, 0], taps)

    def sampling_step(self, nb: int, block: int, kv_len: int, mode: str) -> torch.Tensor:
        """Rows [0, nb) under their own settings on the device: draft, verify with the logits written, acceptance
        (acceptance.accept_rows) at the uniforms in `draws`, state update, all on the device (graph-capturable).
        `mode`: "sample", "sample_truncated" (some row has a top-k or top-p), or "logits" (every row greedy:
        the proposer's greedy drafts). Returns the verify's logits [nb, block, V]."""
        block_pos = self.start[:nb, None] + self.offsets[None, :block]
        last = self.last_token[:nb]
        rows = RowSampling(self.temperature[:nb], self.top_k[:nb], self.top_p[:nb], mode == "sample_truncated")
        draws = self.draws[:nb, :block]
        if block == 1:
            drafts, draft_probs = last.new_zeros(nb, 0), None
        elif mode == "logits":
            drafts, draft_probs = self.proposer.propose_greedy(nb, block, last, block_pos, kv_len), None
        else:
            drafts, draft_probs = self.proposer.propose_sampled(nb, block, last, block_pos, kv_len, rows,
                                                                draws[:, :-1, 0])
        hidden, taps = self._verify(nb, torch.cat([last[:, None], drafts], dim=1), block_pos, kv_len)
        logits = self.target.model.logits(hidden)
        wanted = self.cap[:nb].clamp(max=block - 1)
        accepted, next_tokens, failure = acceptance.accept_rows(rows, drafts, draft_probs, logits, wanted, draws)
        # a failed row commits nothing real (it leaves once the host reads the failure)
        self._finish(nb, block_pos, accepted.masked_fill(failure > 0, 0), failure, drafts,
                     next_tokens.masked_fill(failure > 0, 0), taps)
        return logits

    def logits_step(self, n: int, block: int, chunks: dict[int, StreamChunk]) -> None:
        """A step for a batch with rows that return log-probabilities (`sampling_step`; mode "logits" when every
        row is greedy), not pipelined: its outcome is read at once, and each asking row's tokens are scored under
        the step's logits."""
        mode = self._mode()
        launched = self._launch(n, block, "logits" if mode == "greedy" else mode)
        self._commit_launched(launched, chunks, launched.logits)

    def _finish(self, nb: int, block_pos: torch.Tensor, accepted: torch.Tensor, failure: torch.Tensor,
                drafts: torch.Tensor, next_tokens: torch.Tensor, taps: torch.Tensor | None) -> None:
        """Write a step's outcome to `out` and commit it (`_advance`)."""
        k = drafts.shape[1]
        self.out[:nb, 0] = accepted
        self.out[:nb, 1] = failure
        self.out[:nb, 2:2 + k] = drafts
        self.out[:nb, 2 + k] = next_tokens
        self._advance(nb, block_pos, accepted, next_tokens, taps)

    @staticmethod
    def _logprobs(seqs: list[_Sequence], logits: torch.Tensor, tokens: list[list[int]],
                  failures: list[int]) -> dict[int, list[TokenLogprob]]:
        """row -> a TokenLogprob per token of tokens[row], for the rows of `seqs` that ask for them and did not
        fail; `logits` [n, s, V] the target's at the rows' slots."""
        rows = [row for row, seq in enumerate(seqs) if seq.params.logprobs is not None and not failures[row]]
        if not rows:
            return {}
        return dict(zip(rows, token_logprobs(logits[rows], [tokens[row] for row in rows],
                                             [seqs[row].params.logprobs for row in rows])))

    def _verify(self, nb: int, block_ids: torch.Tensor, block_pos: torch.Tensor,
                kv_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The target's final hidden states of the block [nb, block, H] (before the lm_head) and, when the
        block is drafted, the proposer's taps."""
        taps = self.tap_ids if block_ids.shape[1] > 1 else ()
        return self.target.model(block_ids, block_pos, self.target_cache.rows(0, nb), taps, kv_len=kv_len,
                                 commit_follows=True)  # _advance commits

    def _advance(self, nb: int, block_pos: torch.Tensor, accepted: torch.Tensor, next_tokens: torch.Tensor,
                 taps: torch.Tensor | None) -> None:
        """Commit `accepted` drafts + 1 per row: the target keeps that prefix of the block, the proposer sees
        the verified block's taps, and the bonus token opens the next block."""
        self.target_cache.rows(0, nb).commit(accepted + 1)
        if taps is not None:
            self.proposer.observe(nb, block_pos, taps)
        self.last_token[:nb] = next_tokens
        self.start[:nb] += accepted + 1

    # ---- CUDA graphs ----------------------------------------------------------------------------------
    def _capturing(self, graph: torch.cuda.CUDAGraph) -> torch.cuda.graph:
        """The capture of `graph` into the pool every graph shares (recording kernels without running them)."""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return torch.cuda.graph(graph, pool=self._graph_pool)

    def _capture_join(self, join: _JoinGraph, first: int, drafted: bool) -> None:
        """Capture `_prefill_in_last_rows`'s forward over `join`'s inputs into rows from `first` (an eager run at
        this shape has compiled and tuned its kernels)."""
        graph = torch.cuda.CUDAGraph()
        with self._capturing(graph):
            logits = self._prefill(first, join.ids, join.real, drafted, ragged=True)
        join.graph, join.logits = graph, logits  # only once captured: a failed capture leaves the eager path

    def _capture(self, nb: int, block: int, mode: str) -> torch.cuda.CUDAGraph:
        """Capture the step (`run_step`) for `nb` rows, this block size and mode. Warm-up runs advance the state,
        so it is restored; their cache writes land on slots at or after each row's block start (rewritten
        later)."""
        state = [self.last_token[:nb], self.start[:nb], *self.target_cache.rows(0, nb).state()]
        if self.proposer is not None:
            state += self.proposer.state(nb)
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.run_step(nb, block, self.max_len, mode)
        torch.cuda.current_stream().wait_stream(stream)
        for live, copy in zip(state, saved):
            live.copy_(copy)
        graph = torch.cuda.CUDAGraph()
        with self._capturing(graph):
            logits = self.run_step(nb, block, self.max_len, mode)
        self._graphs[(nb, block, mode)] = graph
        if logits is not None:  # the graph's own output: each replay rewrites it
            self._graph_logits[(nb, block, mode)] = logits
        return graph
