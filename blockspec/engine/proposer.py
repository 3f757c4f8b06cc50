"""Proposers: what the engine drafts with. The DFlash / DFlare draft is one; benchmarks and tests plug in oracles.

A proposer keeps its own per-row state in rows [0, max_batch) that mirror the engine's rows: the engine calls
`join` when a prompt enters a row, `propose_*` before each verify, `observe` after it, and `move_row` when a
sequence moves into a freed row. Rows past the active ones may run as CUDA-graph padding: whatever they
compute is never read.
"""

from __future__ import annotations

from typing import Protocol

import torch

from blockspec.draft import DraftModel
from blockspec.engine.sampling import RowSampling, draw


class Proposer(Protocol):
    max_block: int  # the largest block it drafts (slot 0 is the newest committed token, so max_block - 1 drafts)
    tap_layer_ids: tuple[int, ...]  # target layers whose outputs it reads; the verify pass returns them

    def allocate(self, max_batch: int, max_len: int) -> None:
        """Per-row state for `max_batch` rows of up to `max_len` positions."""

    def join(self, first: int, features: torch.Tensor | None, positions: torch.Tensor, lengths: torch.Tensor) -> None:
        """Prompts entered rows [first, first + g): their taps `features` [g, n, T*H] at `positions` [g, n] are
        context now. Row i's prompt is its first lengths[i] slots (`lengths` [g], on the device); the slots after it
        hold padding, which the row's own blocks overwrite before any query reads them."""

    def propose_greedy(self, n: int, block: int, last_tokens: torch.Tensor, block_positions: torch.Tensor,
                       kv_len: int) -> torch.Tensor:
        """Greedy drafts [n, block - 1] for rows [0, n), whose blocks start with `last_tokens` [n] at
        `block_positions` [n, block]; device work only (a CUDA graph holds it). `kv_len` bounds the cache
        slots the CPU attention reads."""

    def propose_sampled(self, n: int, block: int, last_tokens: torch.Tensor, block_positions: torch.Tensor,
                        kv_len: int, rows: RowSampling,
                        uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts [n, block - 1] for rows with their own settings `rows` (a greedy row's are its argmax, another's
        drawn at `uniforms` [n, block - 1] from its warped distribution: sampling.draw), and the distributions
        they were drawn from [n, block - 1, V] (None: point masses); device work only (a CUDA graph holds it)."""

    def observe(self, n: int, block_positions: torch.Tensor, features: torch.Tensor | None) -> None:
        """The verify pass's taps [n, block, T*H] at `block_positions`: context for the next proposal (only the
        accepted slots are real; the rest sit at or after the next block start, which overwrites them first)."""

    def settle(self, n: int, slots: int) -> None:
        """The next proposal has a smaller block than the last verify's `slots` (a proposal takes only as many
        context slots as its block): take all of them into the context now, for rows [0, n)."""

    def move_row(self, source: int, dest: int, length: int) -> None:
        """Row `source` moves to `dest`; its state at positions below `length` must follow."""

    def state(self, n: int) -> list[torch.Tensor]:
        """Views of rows [0, n) of every tensor a step changes, other than caches addressed by position
        (a CUDA-graph capture restores them after its warm-up steps)."""


class DraftProposer:
    """A DFlash / DFlare draft: one draft pass over `[last token, MASK x (B-1)]` per block, conditioned on the
    target's taps, logits through the target's own lm_head."""

    def __init__(self, draft: DraftModel, target_model: torch.nn.Module) -> None:
        self.draft, self.target_model = draft, target_model
        self.max_block = draft.block_size
        self.tap_layer_ids = tuple(draft.config.target_layer_ids)

    def allocate(self, max_batch: int, max_len: int) -> None:
        weight = self.target_model.embed_tokens.weight
        long = dict(device=weight.device, dtype=torch.long)
        self.cache = self.draft.new_cache(max_batch, max_len)
        # the target taps of each row's last verified block and their positions, not yet in the draft cache
        self.feat = torch.zeros(max_batch, self.max_block, len(self.tap_layer_ids) * weight.shape[1],
                                device=weight.device, dtype=weight.dtype)
        self.feat_pos = torch.zeros(max_batch, self.max_block, **long)
        self.offsets = torch.arange(self.max_block, **long)

    def join(self, first: int, features: torch.Tensor | None, positions: torch.Tensor, lengths: torch.Tensor) -> None:
        stop = first + positions.shape[0]
        self.draft.store_context(features, positions, self.cache.rows(first, stop))
        self.feat_pos[first:stop] = lengths[:, None] + self.offsets  # nothing pending: slots the first block overwrites

    def _hidden(self, n: int, block: int, last_tokens: torch.Tensor, block_positions: torch.Tensor,
                kv_len: int) -> torch.Tensor:
        """The draft's final hidden states at block slots 1.. [n, block - 1, H]."""
        embeds = self.draft.embed_block(last_tokens, self.target_model.embed_tokens, block)
        # the context is the last verified block's taps; a block as large as this one holds every accepted slot
        # (a larger one before it was settled first), the slots past it are stale
        hidden = self.draft(embeds, block_positions, self.feat[:n, :block], self.feat_pos[:n, :block],
                            self.cache.rows(0, n), kv_len=kv_len)
        return hidden[:, 1:]

    def propose_greedy(self, n: int, block: int, last_tokens: torch.Tensor, block_positions: torch.Tensor,
                       kv_len: int) -> torch.Tensor:
        return self.target_model.greedy_tokens(self._hidden(n, block, last_tokens, block_positions, kv_len))

    def propose_sampled(self, n: int, block: int, last_tokens: torch.Tensor, block_positions: torch.Tensor,
                        kv_len: int, rows: RowSampling,
                        uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.target_model.logits(self._hidden(n, block, last_tokens, block_positions, kv_len))
        return draw(logits, rows, uniforms)

    def observe(self, n: int, block_positions: torch.Tensor, features: torch.Tensor | None) -> None:
        block = block_positions.shape[1]
        self.feat[:n, :block] = features
        self.feat_pos[:n] = block_positions[:, :1] + self.offsets

    def settle(self, n: int, slots: int) -> None:
        self.draft.store_context(self.feat[:n, :slots], self.feat_pos[:n, :slots], self.cache.rows(0, n))

    def move_row(self, source: int, dest: int, length: int) -> None:
        self.cache.copy_row(source, dest, length)
        self.feat[dest] = self.feat[source]
        self.feat_pos[dest] = self.feat_pos[source]

    def state(self, n: int) -> list[torch.Tensor]:
        return [self.feat[:n], self.feat_pos[:n]]
