"""Static KV cache: preallocated tensors where slot index == token position.

Because a key lives at the slot of its own position and attention only ever looks at slots <= the query's
position (target) or < the block start (draft context), rolling back after a rejected draft costs nothing:
stale slots are either masked out or overwritten by the next forward before anyone reads them. No crop, no
copy, no per-sequence length to keep in sync -- positions carry all the state, row by row, which is what
ragged batches need.

A hybrid target's recurrent layers carry state that does not roll back this way: `HybridCache` keeps it and
rolls it back in `commit`, which the engine calls after every verify (a no-op for the plain cache).
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

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All slots of one layer: [b, nKV, max_len, d] each (attention reads only the visible ones)."""
        return self.k[layer], self.v[layer]

    def commit(self, keep: torch.Tensor) -> None:
        """After a verify forward over these rows: `keep` [b] int64 (on the device) block tokens of each row stay.
        Nothing to do here: positions make rollback free (see the module docstring)."""

    def state(self) -> tuple[torch.Tensor, ...]:
        """The per-row state beyond the K/V slots (none here), for callers that must save and restore it."""
        return ()


class HybridCache(KVCache):
    """The cache of a hybrid target (Qwen3.5): K/V slots for its attention layers, and per Gated DeltaNet layer
    and row the conv state (the last K-1 inputs of its causal convolution, [L, b, channels, K-1]) and the fp32
    recurrent state ([L, b, heads, Dk, Dv]).

    A recurrent state does not roll back for free, so a forward of at most `verify_tokens` tokens also keeps the
    state after each of its tokens (`steps`) and its conv inputs (`windows`), and `commit(keep)` then sets each row
    to its state after its first `keep` tokens with two gathers: no host sync, static shapes (SPEC section 9,
    option 1: per-position states). A longer forward (a prefill) keeps only the final state.
    """

    def __init__(self, num_attention_layers: int, num_gdn_layers: int, batch_size: int, num_kv_heads: int,
                 max_len: int, head_dim: int, conv_shape: tuple[int, int], state_shape: tuple[int, int, int],
                 verify_tokens: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(num_attention_layers, batch_size, num_kv_heads, max_len, head_dim, dtype, device)
        channels, kernel = conv_shape
        rows = (num_gdn_layers, batch_size)
        self.conv = torch.zeros(*rows, channels, kernel - 1, dtype=dtype, device=device)
        self.recurrent = torch.zeros(*rows, *state_shape, dtype=torch.float32, device=device)
        self.windows = torch.zeros(*rows, channels, kernel - 1 + verify_tokens, dtype=dtype, device=device)
        self.steps = torch.zeros(*rows, verify_tokens, *state_shape, dtype=torch.float32, device=device)
        self.steps_kept = [False]  # whether the last forward kept its per-token states (shared by the row views)

    def rows(self, start: int, stop: int) -> "HybridCache":
        view = object.__new__(HybridCache)
        view.max_len, view.steps_kept = self.max_len, self.steps_kept
        for name in ("k", "v", "conv", "recurrent", "windows", "steps"):
            setattr(view, name, getattr(self, name)[:, start:stop])
        return view

    def copy_row(self, source: int, dest: int, length: int) -> None:
        super().copy_row(source, dest, length)
        self.conv[:, dest] = self.conv[:, source]
        self.recurrent[:, dest] = self.recurrent[:, source]

    def keeps_steps(self, n: int) -> bool:
        """Whether a forward of `n` tokens keeps each token's state (a decode or a verify, which commit may follow)
        or only the final one (a prefill)."""
        self.steps_kept[0] = n <= self.steps.shape[2]
        return self.steps_kept[0]

    def gdn_layer(self, layer: int) -> tuple[torch.Tensor, ...]:
        """Gated DeltaNet layer `layer`'s (conv state, recurrent state, conv window buffer, per-token states)."""
        return self.conv[layer], self.recurrent[layer], self.windows[layer], self.steps[layer]

    def commit(self, keep: torch.Tensor) -> None:
        """Each row's conv and recurrent state become those after its first `keep` (1..n) tokens of the last forward
        (of n <= verify_tokens tokens). The conv state after m tokens is window[m : m + K-1]."""
        if not self.steps_kept[0]:
            raise RuntimeError("commit() must follow a forward of at most verify_tokens tokens: create the cache "
                               "with new_cache(..., verify_tokens=the block size)")
        rows = torch.arange(keep.shape[0], device=keep.device)
        self.recurrent.copy_(self.steps[:, rows, keep - 1])
        taps = keep[:, None] + torch.arange(self.conv.shape[-1], device=keep.device)  # [b, K-1]
        self.conv.copy_(self.windows.gather(-1, taps[None, :, None].expand_as(self.conv)))

    def state(self) -> tuple[torch.Tensor, ...]:
        return self.conv, self.recurrent
