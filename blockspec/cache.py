"""Static KV cache: preallocated tensors where slot index == token position.

Because a key lives at the slot of its own position and attention only ever looks at slots <= the query's
position (target) or < the block start (draft context), rolling back after a rejected draft costs nothing:
stale slots are either masked out or overwritten by the next forward before anyone reads them. No crop, no
copy, no per-sequence length to keep in sync -- positions carry all the state, row by row, which is what
ragged batches need.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer K/V tensors [batch, nKV, max_len, d]. `layers.qkv_rope_store` writes each position's slot
    directly (one kernel on CUDA); attention reads the visible slots of `layer(i)`."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def rows(self, start: int, stop: int) -> "KVCache":
        """The sequences [start, stop) of this cache as a cache of their own, sharing storage (one request's
        prefill into its row of a batch; a step over the first rows)."""
        view = object.__new__(KVCache)
        view.k, view.v, view.max_len = self.k[:, start:stop], self.v[:, start:stop], self.max_len
        return view

    def copy_row(self, source: int, dest: int, length: int) -> None:
        """Copy slots [0, length) of row `source` into row `dest` (a sequence moving rows in a batch)."""
        self.k[:, dest, :, :length] = self.k[:, source, :, :length]
        self.v[:, dest, :, :length] = self.v[:, source, :, :length]

    def commit(self, keep: torch.Tensor) -> None:
        """After a verify pass over these rows, `keep` [rows] block tokens of each stay. Nothing to do: the
        rejected slots are never read before the next pass overwrites them."""

    def step_state(self) -> list[torch.Tensor]:
        """Tensors a step changes other than position-addressed slots: none here."""
        return []

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All slots of one layer: [b, nKV, max_len, d] each (attention reads only the visible ones)."""
        return self.k[layer], self.v[layer]
