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

from blockspec.errors import BlockspecError
from blockspec.kernels import current_settings
from blockspec.layers import fused_kernels_apply


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


class GDNLayerState:
    """One Gated DeltaNet layer's part of a HybridCache (views of the cache's tensors, rows [b]), with what a
    forward of n <= verify_tokens tokens keeps for `HybridCache.commit`: each token's state (rollback "states": steps
    [b, T, h, Dk, Dv]), or each token's rank-one update (rollback "replay": the tape tape_k [b, T, h, Dk], tape_decay
    [b, T, h], tape_u [b, T, h, Dv], and where commits may be deferred `pending` [b, h]: the updates each head's
    recurrent state still lacks)."""

    def __init__(self, cache: "HybridCache", layer: int) -> None:
        self.conv, self.recurrent, self.windows = cache.conv[layer], cache.recurrent[layer], cache.windows[layer]
        self.arrivals = cache.arrivals[layer]
        self.steps = cache.steps[layer] if cache.rollback == "states" else None
        self.tape_k, self.tape_decay, self.tape_u = (
            (cache.tape_k[layer], cache.tape_decay[layer], cache.tape_u[layer])
            if cache.rollback == "replay" else (None,) * 3)
        self.pending = cache.pending[layer] if cache.pending is not None else None

    def keep(self, t: int, state: torch.Tensor, k: torch.Tensor, decay: torch.Tensor, innovation: torch.Tensor) -> None:
        """Token t's state after it ([b, h, Dk, Dv]), or its update: state = state * decay + k innovation^T
        (k [b, h, Dk], decay [b, h], innovation [b, h, Dv])."""
        if self.steps is not None:
            self.steps[:, t] = state
        else:
            self.tape_k[:, t], self.tape_decay[:, t], self.tape_u[:, t] = k, decay, innovation

    def take_conv_state(self, inputs: torch.Tensor, lengths: torch.Tensor | None, fresh: torch.Tensor) -> None:
        """Set the conv state [b, C, K-1] to the one after each row's last input: the last K-1 of the conv state
        (zeros where `fresh` [b]: a new sequence) followed by the row's inputs [b, n, C], up to its length
        (`lengths` [b]; None: all n). Rows with fewer than K-1 inputs keep part of the old state."""
        b, n, channels = inputs.shape
        width = self.conv.shape[-1]
        last = lengths if lengths is not None else torch.full((b,), n, device=inputs.device)
        slots = last[:, None] + torch.arange(width, device=inputs.device)  # in (state, inputs): slots m .. m+K-2
        tokens = slots - width  # the input a slot holds, or (< 0) the old state's slot
        from_inputs = inputs[torch.arange(b, device=inputs.device)[:, None], tokens.clamp(min=0)].transpose(1, 2)
        old = torch.where(fresh[:, None, None], 0, self.conv)
        from_state = old.gather(-1, slots.clamp(max=width - 1)[:, None, :].expand(-1, channels, -1))
        self.conv.copy_(torch.where((tokens >= 0)[:, None, :], from_inputs, from_state))


def defers_commits(pending: torch.Tensor | None, rows: int) -> bool:
    """Whether a step of `rows` rows over a cache with `pending` counts (None: a cache that never defers) leaves its
    commit's replay to the next pass's kernel (KernelSettings.defer_replay_rows): fewer rows replay at commit, and
    their passes find the states settled first (`HybridCache.settle`)."""
    return pending is not None and rows >= current_settings().defer_replay_rows


def _fused_replay(recurrent: torch.Tensor) -> bool:
    """Whether a replay of these states runs the CUDA kernel (kernels/gdn.py) rather than the torch ops."""
    return fused_kernels_apply(recurrent) and current_settings().fused_gdn


def _replay(recurrent: torch.Tensor, tape_k: torch.Tensor, tape_decay: torch.Tensor, tape_u: torch.Tensor,
            keep: torch.Tensor, tokens: int) -> None:
    """Each row's states [L, b, h, Dk, Dv] advanced in place by its first keep[row] (of `tokens`) taped updates."""
    if _fused_replay(recurrent):
        from blockspec.kernels.gdn import replay

        replay(recurrent, tape_k, tape_decay, tape_u, keep)
    else:
        from blockspec.target.gdn import replay_steps

        recurrent.copy_(replay_steps(recurrent, tape_k, tape_decay, tape_u, keep, tokens))


ROLLBACKS = ("states", "replay")
# replay: 5-6% faster verify steps than "states" on the H100 at batch 1 (docs/performance.md), 0.5 MiB kept per
# layer and row instead of 32, and no commit copy after a one-token decode
DEFAULT_ROLLBACK = "replay"


class HybridCache(KVCache):
    """The cache of a hybrid target (Qwen3.5): K/V slots for its attention layers, and per Gated DeltaNet layer
    and row the conv state (the last K-1 inputs of its causal convolution, [L, b, channels, K-1]) and the fp32
    recurrent state ([L, b, heads, Dk, Dv]).

    A recurrent state does not roll back for free, so a forward of at most `verify_tokens` tokens also keeps its
    conv inputs (`windows`: the conv state, then the tokens' inputs, [L, b, K-1+n, channels], a token's channels
    contiguous) and what `commit(keep)` needs to set each row to its state after its first `keep`
    tokens, on the device with static shapes (SPEC section 9), in one of two ways (`rollback`):
    - "states": the state after each token (`steps`, verify_tokens states per layer and row); commit gathers one.
    - "replay": each token's update (k, the decay exp(g) and the beta-weighted innovation: 32 KiB a token for the
      4B, against 2 MiB a state); commit replays the first `keep` updates with the forward's own arithmetic, so
      both ways give the same state bit for bit.
    A forward that commit follows (`commit_follows`, a verify of two or more tokens) leaves the recurrent state as
    it was (empty for a row starting a new sequence): commit moves it once, to the kept prefix. Any other forward
    leaves the state after its last token and needs no commit (a decode, a prefill).

    On CUDA a "replay" commit of KernelSettings.defer_replay_rows rows or more (in a cache of that many rows or
    more) defers the replay: it records each row's kept count (`pending`, per layer and head), and the next decode
    or verify of each layer applies those updates to the state it loads anyway, stores it, and goes on
    (kernels/gdn.py). Whatever reads the state as it stands settles it first (`settle`: a prefill, the torch ops,
    a step of fewer rows, whose kernel does not defer); a row that moves takes its pending updates along; `state()`
    holds them.
    """

    def __init__(self, num_attention_layers: int, num_gdn_layers: int, batch_size: int, num_kv_heads: int,
                 max_len: int, head_dim: int, conv_shape: tuple[int, int], state_shape: tuple[int, int, int],
                 verify_tokens: int, dtype: torch.dtype, device: torch.device | str,
                 rollback: str = DEFAULT_ROLLBACK) -> None:
        if rollback not in ROLLBACKS:
            raise BlockspecError(f"unknown rollback {rollback!r}: choose one of {', '.join(ROLLBACKS)}")
        super().__init__(num_attention_layers, batch_size, num_kv_heads, max_len, head_dim, dtype, device)
        channels, kernel = conv_shape
        heads, key_dim, value_dim = state_shape
        rows = (num_gdn_layers, batch_size)
        fp32 = dict(dtype=torch.float32, device=device)
        self.rollback = rollback
        self.conv = torch.zeros(*rows, channels, kernel - 1, dtype=dtype, device=device)
        self.recurrent = torch.zeros(*rows, *state_shape, **fp32)
        self.windows = torch.zeros(*rows, kernel - 1 + verify_tokens, channels, dtype=dtype, device=device)
        # the CUDA decode's count of a head's value tiles done (kernels/gdn.py); zero between launches
        self.arrivals = torch.zeros(*rows, heads, dtype=torch.int32, device=device)
        if rollback == "states":
            self.steps = torch.zeros(*rows, verify_tokens, *state_shape, **fp32)
        else:
            self.tape_k = torch.zeros(*rows, verify_tokens, heads, key_dim, **fp32)
            self.tape_decay = torch.zeros(*rows, verify_tokens, heads, **fp32)
            self.tape_u = torch.zeros(*rows, verify_tokens, heads, value_dim, **fp32)
        # a cache that may defer its commits (rows enough) keeps each head's count of the updates its state lacks
        defers = rollback == "replay" and batch_size >= current_settings().defer_replay_rows
        self.pending = torch.zeros(*rows, heads, dtype=torch.int32, device=device) if defers else None
        self.verify_tokens = verify_tokens
        # the last forward: its tokens when it kept what commit needs (else 0), and whether it left the recurrent
        # state to commit; whether a commit was ever deferred (lists, so that row views share them)
        self.last_forward = [0, False]
        self.deferred_commits = [False]

    def _row_tensors(self) -> tuple[str, ...]:
        kept = ("steps",) if self.rollback == "states" else ("tape_k", "tape_decay", "tape_u")
        deferral = ("pending",) if self.pending is not None else ()
        return ("k", "v", "conv", "recurrent", "windows", "arrivals") + kept + deferral

    def rows(self, start: int, stop: int) -> "HybridCache":
        view = object.__new__(HybridCache)
        view.max_len, view.rollback, view.verify_tokens = self.max_len, self.rollback, self.verify_tokens
        view.last_forward, view.deferred_commits, view.pending = self.last_forward, self.deferred_commits, None
        for name in self._row_tensors():
            setattr(view, name, getattr(self, name)[:, start:stop])
        return view

    def copy_row(self, source: int, dest: int, length: int) -> None:
        super().copy_row(source, dest, length)
        for name in ("conv", "recurrent") + (("pending", "tape_k", "tape_decay", "tape_u")
                                             if self.pending is not None else ()):
            getattr(self, name)[:, dest] = getattr(self, name)[:, source]

    def keeps_steps(self, n: int, commit_follows: bool = False) -> tuple[bool, bool]:
        """Whether a forward of `n` tokens keeps what commit needs (at most verify_tokens: a decode or a verify) or
        only its final state (a prefill), and whether it leaves the recurrent state to commit (`commit_follows`
        and two or more tokens kept)."""
        kept = n if n <= self.verify_tokens else 0
        self.last_forward[:] = [kept, commit_follows and kept > 1]
        return bool(kept), self.last_forward[1]

    def gdn_layer(self, layer: int) -> GDNLayerState:
        """Gated DeltaNet layer `layer`'s states and what it keeps for commit."""
        return GDNLayerState(self, layer)

    def commit(self, keep: torch.Tensor) -> None:
        """Each row's conv and recurrent state become those after its first `keep` (1..n) tokens of the last forward
        (of n <= verify_tokens tokens, with commit_follows). The conv state after m tokens is window[m : m + K-1]."""
        n, deferred = self.last_forward
        if not n:
            raise RuntimeError("commit() must follow a forward of at most verify_tokens tokens: create the cache "
                               "with new_cache(..., verify_tokens=the block size)")
        if n == 1:  # a one-token decode keeps its token: the forward left every row's states as they must be
            return
        if not deferred:
            raise RuntimeError("commit() must follow a forward that left the state to it: pass commit_follows=True")
        if self.rollback == "states":
            rows = torch.arange(keep.shape[0], device=keep.device)
            self.recurrent.copy_(self.steps[:, rows, keep - 1])
        elif defers_commits(self.pending, keep.shape[0]) and _fused_replay(self.recurrent):
            self.pending.copy_(keep[None, :, None].expand_as(self.pending))  # the next pass's kernel applies them
            self.deferred_commits[0] = True
        else:
            _replay(self.recurrent, self.tape_k, self.tape_decay, self.tape_u, keep, n)
        taps = keep[:, None] + torch.arange(self.conv.shape[-1], device=keep.device)  # [b, K-1]
        kept = self.windows.gather(2, taps[None, :, :, None].expand(*self.conv.shape[:2], -1, self.conv.shape[2]))
        self.conv.copy_(kept.transpose(2, 3))

    def settle(self, positions: torch.Tensor) -> None:
        """Give each row's recurrent states the updates that deferred commits left `pending` (none for a row starting
        a new sequence: positions [b, n] from 0), as a deferring decode or verify kernel does first itself; for the
        passes that read a state as it stands (a prefill, the torch ops, a step of too few rows to defer): every
        layer in one replay, as a commit pends every layer and head alike. Skipped while no commit was ever
        deferred, except in a CUDA graph's capture (it may replay after the first deferral)."""
        capturing = self.recurrent.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.pending is None or not (capturing or self.deferred_commits[0]):
            return
        keep = torch.where(positions[:, 0] != 0, self.pending[0, :, 0], 0)
        _replay(self.recurrent, self.tape_k, self.tape_decay, self.tape_u, keep, self.tape_k.shape[2])
        self.pending.zero_()

    def state(self) -> tuple[torch.Tensor, ...]:
        """conv, recurrent, and where commits may be deferred the updates one left (pending, and their tape)."""
        if self.pending is None:
            return self.conv, self.recurrent
        return self.conv, self.recurrent, self.pending, self.tape_k, self.tape_decay, self.tape_u
