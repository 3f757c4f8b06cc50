"""One sequence at a time: the engine (engine/batch.py) with a batch of one.

`SpeculativeDecoder` is the convenience for a single prompt: `generate` returns the result, `stream` yields
committed tokens and released text step by step. Block size 1, or no draft, is plain autoregressive decoding
through the same step -- the baseline every speedup is measured against, and the reference for losslessness.
"""

from __future__ import annotations

from typing import Iterator

from blockspec.cache import DEFAULT_ROLLBACK
from blockspec.draft import DraftModel
from blockspec.engine.batch import BatchDecoder
from blockspec.engine.proposer import Proposer
from blockspec.engine.sampling import SamplingParams
from blockspec.engine.sequence import GenerationResult, StreamChunk, check_block_size, check_pair, check_request
from blockspec.errors import BlockspecError
from blockspec.target import Target

__all__ = ["GenerationResult", "SpeculativeDecoder", "StreamChunk"]

LENGTH_STEP = 256  # a growing cache grows to a multiple of this, so that similar requests reuse it


class SpeculativeDecoder:
    """Decodes one prompt at a time with `target`, drafting with `draft` (a DraftModel, any Proposer, or None:
    autoregressive). With `max_len` the engine's cache row is fixed at that many positions and `engine` is built
    at once; without it the row grows to fit each request (a new engine, its CUDA graphs captured again).
    `rollback`: how a hybrid target's recurrent state returns to the accepted prefix (BatchDecoder)."""

    def __init__(self, target: Target, draft: DraftModel | Proposer | None = None, block_size: int | None = None,
                 max_len: int | None = None, use_graphs: bool = True, rollback: str = DEFAULT_ROLLBACK) -> None:
        check_pair(target, draft)
        if isinstance(draft, DraftModel):
            self.trained_block = draft.block_size
        else:
            self.trained_block = draft.max_block if draft is not None else 1
        self.target, self.draft, self.max_len, self.use_graphs = target, draft, max_len, use_graphs
        self.rollback = rollback
        self.block_size = check_block_size(block_size, self.trained_block)
        self.engine: BatchDecoder | None = None
        if max_len is not None:  # a fixed row: the engine (and its cache) now
            self._engine_for(0)

    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                 block_size: int | None = None) -> GenerationResult:
        result = None
        for chunk in self.stream(prompt_ids, params, block_size):
            result = chunk.result
        assert result is not None
        return result

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None,
               block_size: int | None = None) -> Iterator[StreamChunk]:
        """Yield committed tokens and released text step by step; the last chunk carries the result."""
        params = check_request(self.target, prompt_ids, params)
        engine = self._engine_for(len(prompt_ids) + params.max_new_tokens)
        seq_id = engine.add(prompt_ids, params, block_size)
        try:
            step = engine.admit  # the prefill's token first, on its own (time to first token)
            while True:
                for _, chunk in step():
                    if chunk.error is not None:
                        raise BlockspecError(f"generation failed: {chunk.error}")
                    yield chunk
                    if chunk.result is not None:
                        return
                step = engine.step
        finally:
            engine.cancel(seq_id)  # a caller that stops early frees the row (a no-op once finished)

    def _engine_for(self, tokens: int) -> BatchDecoder:
        """The one-row engine, (re)built when a growing cache row is too short for `tokens` positions."""
        need = tokens + 2 * self.trained_block
        if self.engine is None or (self.max_len is None and self.engine.max_len < need):
            self.engine = None  # free the old caches first
            self.engine = BatchDecoder(self.target, self.draft, max_batch=1,
                                       max_len=self.max_len or -(-need // LENGTH_STEP) * LENGTH_STEP,
                                       block_size=self.block_size, use_graphs=self.use_graphs,
                                       rollback=self.rollback)
        return self.engine
