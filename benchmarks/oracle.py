"""Oracle acceptance: a proposer that makes the engine accept a chosen number of drafts per step.

It runs the real draft pass (so a step costs what it costs with the draft), then replaces the draft's tokens with
a known continuation of the sequence, right for the scheduled number of slots and wrong at the next one; the
engine's own acceptance rule then accepts exactly that many. The continuation must be the target's own: for a
trained pair the greedy output decoded beforehand; for random-weight timing targets, `constant_choice` makes
the target's greedy choice token 0 at every position, whatever the rounding, so the continuation is all zeros.
Greedy steps only (graph-capturable: the schedule and each row's step count live on the device, and
`set_schedule` changes the schedule in place, so graphs captured earlier follow it; an entry of -1 passes the
draft's own tokens through).
"""

from __future__ import annotations

import torch

from blockspec.engine.proposer import Proposer


class OracleProposer:
    """Wraps `inner` (whose draft pass runs every step); proposes `reference[p]` (the token at position p) for
    the first `schedule[i % len(schedule)]` drafted slots of a row's i-th step and a wrong token after them (-1:
    the inner proposer's tokens)."""

    def __init__(self, inner: Proposer, reference: list[int] | torch.Tensor, schedule: list[int], vocab_size: int,
                 device: torch.device | str) -> None:
        self.inner, self.vocab_size = inner, vocab_size
        self.max_block, self.tap_layer_ids = inner.max_block, inner.tap_layer_ids
        self.reference = torch.as_tensor(reference, device=device)
        self.schedule = torch.as_tensor(schedule, device=device)
        self.slots = torch.arange(self.max_block - 1, device=device)

    def allocate(self, max_batch: int, max_len: int) -> None:
        self.inner.allocate(max_batch, max_len)
        self.steps = torch.zeros(max_batch, dtype=torch.long, device=self.schedule.device)  # proposals per row

    def join(self, row: int, features: torch.Tensor | None, positions: torch.Tensor) -> None:
        self.inner.join(row, features, positions)
        self.steps[row] = 0

    def set_schedule(self, schedule: list[int]) -> None:
        """A new schedule of the same length, written in place (graphs captured earlier read it)."""
        self.schedule.copy_(torch.as_tensor(schedule, device=self.schedule.device))

    def propose_greedy(self, n: int, block: int, last_tokens: torch.Tensor, block_positions: torch.Tensor,
                       kv_len: int) -> torch.Tensor:
        drafted = self.inner.propose_greedy(n, block, last_tokens, block_positions, kv_len)
        slots = block_positions[:, 1:].clamp(max=self.reference.shape[0] - 1)
        right = self.reference[slots]
        correct = self.schedule[self.steps[:n] % self.schedule.shape[0]]
        self.steps[:n] += 1
        oracle = torch.where(self.slots[None, :block - 1] < correct[:, None], right, (right + 1) % self.vocab_size)
        return torch.where(correct[:, None] < 0, drafted, oracle)

    def propose_sampled(self, *args: object) -> list:
        raise NotImplementedError("oracle acceptance is for greedy steps")

    def observe(self, n: int, block_positions: torch.Tensor, features: torch.Tensor | None) -> None:
        self.inner.observe(n, block_positions, features)

    def move_row(self, source: int, dest: int, length: int) -> None:
        self.inner.move_row(source, dest, length)
        self.steps[dest] = self.steps[source]

    def state(self, n: int) -> list[torch.Tensor]:
        return self.inner.state(n) + [self.steps[:n]]


@torch.no_grad()
def constant_choice(model: torch.nn.Module) -> None:
    """Make the target's greedy choice token 0 everywhere: a zero final-norm weight makes every logit exactly 0,
    and the argmax takes the first of tied columns. Every layer still runs as before (timing is unchanged)."""
    model.norm.weight.zero_()
