"""The fast CUDA path: a whole speculative step (draft pass, verify pass, acceptance, state update) captured
as ONE CUDA graph over static buffers, with one small device->host read per step.

The step function is ordinary eager code over the same model modules; the graph only removes launch and
Python overhead. Its state lives on the device:

  last_token [1]     newest committed token (block slot 0), not yet in the target cache
  start      [1]     its position
  feat       [1, B, T*H], feat_pos [1, B]
                     target taps of the previous verify block and their positions; only the first a+1 rows
                     are committed, the rest land on slots the next block overwrites before anyone reads them
  forced     [1]     -1, or an acceptance count to force (oracle-acceptance benchmarks)
  out        [B+1]   accepted count, then the target's choice at every block slot (read by the host)

Greedy decoding only; sampling runs the eager loop (`SpeculativeDecoder._steps`), which shares the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from blockspec.draft import DraftModel
from blockspec.engine.sampling import SamplingParams
from blockspec.engine.speculative import SpeculativeDecoder
from blockspec.engine.stats import GenerationStats
from blockspec.errors import BlockspecError
from blockspec.target import Target


@dataclass
class StepBuffers:
    last_token: torch.Tensor
    start: torch.Tensor
    feat: torch.Tensor
    feat_pos: torch.Tensor
    forced: torch.Tensor
    offsets: torch.Tensor
    out: torch.Tensor


class CudaGraphDecoder(SpeculativeDecoder):
    """SpeculativeDecoder whose greedy steps replay a captured CUDA graph (one per block size)."""

    def __init__(self, target: Target, draft: DraftModel | None = None, block_size: int | None = None,
                 max_len: int = 4096, use_graphs: bool = True) -> None:
        super().__init__(target, draft, block_size)
        self.max_len = max_len
        self.use_graphs = use_graphs and target.device.type == "cuda"
        self.target_cache = target.model.new_cache(1, max_len)
        self.draft_cache = draft.new_cache(1, max_len) if draft is not None else None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, StepBuffers]] = {}
        self.forced_acceptance: list[int] | None = None  # oracle schedule, cycled (benchmarks only)

    # ---- one step, as plain eager code ------------------------------------------------------------------
    def _buffers(self, block: int) -> StepBuffers:
        device = self.target.device
        width = len(self.tap_ids) * self.target.model.config.hidden_size
        long = dict(device=device, dtype=torch.long)
        return StepBuffers(
            last_token=torch.zeros(1, **long), start=torch.zeros(1, **long),
            feat=torch.zeros(1, block, max(width, 1), device=device, dtype=self.target.dtype),
            feat_pos=torch.zeros(1, block, **long), forced=torch.full((1,), -1, **long),
            offsets=torch.arange(block, **long), out=torch.zeros(block + 1, **long))

    def _step(self, buf: StepBuffers, block: int, feat: torch.Tensor, feat_pos: torch.Tensor) -> None:
        target, draft = self.target.model, self.draft
        use_draft = draft is not None and block > 1
        block_pos = (buf.start[:, None] + buf.offsets[None])  # [1, B]
        if use_draft:
            embeds = draft.embed_block(buf.last_token, target.embed_tokens, block)
            draft_hidden = draft(embeds, block_pos, feat, feat_pos, self.draft_cache, kv_len=self.max_len)
            draft_tokens = target.logits(draft_hidden[0, 1:]).argmax(-1)
            block_ids = torch.cat([buf.last_token, draft_tokens])[None]
        else:
            draft_tokens = buf.last_token[:0]
            block_ids = buf.last_token[None]
        taps = self.tap_ids if use_draft else ()
        hidden, verify_feat = target(block_ids, block_pos, self.target_cache, taps, kv_len=self.max_len)
        choices = target.logits(hidden[0]).argmax(-1)
        accepted = (draft_tokens == choices[:-1]).long().cumprod(0).sum().view(1)
        accepted = torch.where(buf.forced >= 0, buf.forced.clamp(max=block - 1), accepted)
        buf.out[:1].copy_(accepted)
        buf.out[1:].copy_(choices)
        if use_draft:
            buf.feat.copy_(verify_feat)
        buf.feat_pos.copy_(block_pos)
        buf.last_token.copy_(choices.gather(0, accepted))
        buf.start.add_(accepted + 1)

    def _graph(self, block: int, buf: StepBuffers) -> torch.cuda.CUDAGraph:
        """Capture the step for this block size (warm-up runs advance the state, so it is restored)."""
        saved = [t.clone() for t in (buf.last_token, buf.start, buf.feat, buf.feat_pos)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(buf, block, buf.feat, buf.feat_pos)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(buf, block, buf.feat, buf.feat_pos)
        for live, copy in zip((buf.last_token, buf.start, buf.feat, buf.feat_pos), saved):
            live.copy_(copy)
        return graph

    # ---- the loop -------------------------------------------------------------------------------------
    def _steps(self, prompt_ids: list[int], params: SamplingParams, block: int,
               stats: GenerationStats) -> Iterator[list[int]]:
        if not params.greedy:
            yield from super()._steps(prompt_ids, params, block, stats)
            return
        n_prompt = len(prompt_ids)
        if n_prompt + params.max_new_tokens + 2 * block > self.max_len:
            raise BlockspecError(f"prompt ({n_prompt}) + max_new_tokens ({params.max_new_tokens}) does not fit "
                                 f"the decoder's static cache of {self.max_len} tokens; raise max_len")
        target, device = self.target.model, self.target.device
        use_draft = self.draft is not None and block > 1
        if block not in self._graphs:
            self._graphs[block] = (None, self._buffers(block))
        graph, buf = self._graphs[block]
        # prefill (eager: the prompt length varies)
        ids = torch.tensor([prompt_ids], device=device)
        positions = torch.arange(n_prompt, device=device)[None]
        hidden, features = target(ids, positions, self.target_cache, self.tap_ids if use_draft else (),
                                  kv_len=n_prompt)
        first = target.logits(hidden[0, -1:]).argmax(-1)
        buf.last_token.copy_(first)
        buf.start.fill_(n_prompt)
        buf.forced.fill_(-1)
        yield [int(first)]
        schedule = self.forced_acceptance
        step = 0
        # the first step sees the prompt's features (P rows), so it runs eagerly through the same code
        feat, feat_pos = (features, positions) if use_draft else (buf.feat, buf.feat_pos)
        while True:
            if schedule:
                buf.forced.fill_(schedule[step % len(schedule)])
            if step == 0 or not self.use_graphs:
                self._step(buf, block, feat if step == 0 else buf.feat, feat_pos if step == 0 else buf.feat_pos)
            else:
                if graph is None:
                    graph = self._graph(block, buf)
                    self._graphs[block] = (graph, buf)
                graph.replay()
            host = buf.out.tolist()  # the one device->host read of the step
            accepted = host[0]
            stats.acceptance_lengths.append(accepted + 1)
            step += 1
            yield host[1:2 + accepted]
