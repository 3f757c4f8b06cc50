"""The fast CUDA path for one sequence at a time: the SpeculativeDecoder interface over a one-row
BatchDecoder, whose greedy step (draft pass, verify pass, acceptance, state update) is ONE CUDA graph over
static buffers with one small device->host read per step (see engine/batch.py).

Sampling requests run the eager single-sequence loop (`SpeculativeDecoder`), which shares the kernels.
"""

from __future__ import annotations

from typing import Iterator

from blockspec.draft import DraftModel
from blockspec.engine.batch import BatchDecoder
from blockspec.engine.sampling import SamplingParams
from blockspec.engine.sequence import StreamChunk
from blockspec.engine.speculative import SpeculativeDecoder
from blockspec.target import Target


class CudaGraphDecoder(SpeculativeDecoder):
    """SpeculativeDecoder whose greedy generations replay a captured CUDA graph per block size."""

    def __init__(self, target: Target, draft: DraftModel | None = None, block_size: int | None = None,
                 max_len: int = 4096, use_graphs: bool = True) -> None:
        super().__init__(target, draft, block_size)
        self.engine = BatchDecoder(target, draft, max_batch=1, max_len=max_len, block_size=self.block_size,
                                   use_graphs=use_graphs)

    @property
    def use_graphs(self) -> bool:
        return self.engine.use_graphs

    @use_graphs.setter
    def use_graphs(self, value: bool) -> None:  # profiling runs the same step eagerly
        on = value and self.target.device.type == "cuda"
        self.engine.use_graphs = self.engine.pad_rows = self.engine.pipeline = on

    @property
    def forced_acceptance(self) -> list[int] | None:
        """Oracle schedule of accepted drafts per step, cycled (benchmarks only)."""
        return self.engine.forced_acceptance

    @forced_acceptance.setter
    def forced_acceptance(self, schedule: list[int] | None) -> None:
        self.engine.forced_acceptance = schedule

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None,
               block_size: int | None = None) -> Iterator[StreamChunk]:
        if params is not None and not params.greedy:
            yield from super().stream(prompt_ids, params, block_size)
            return
        seq_id = self.engine.add(prompt_ids, params, block_size)
        try:
            while True:
                for _, chunk in self.engine.step():
                    yield chunk
                    if chunk.result is not None:
                        return
        finally:
            self.engine.cancel(seq_id)  # a caller that stops early frees the row (a no-op once finished)
