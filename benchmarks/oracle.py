"""Oracle acceptance: a proposer that makes the engine accept a chosen number of drafts per step.

It runs the real draft pass (so a step costs what it costs with the draft), then replaces the draft's tokens with
a known continuation of the sequence, right for the scheduled number of slots and wrong at the next one; the
engine's own acceptance rule then accepts exactly that many. The continuation must be the target's own: for a
trained pair the greedy output decoded beforehand; for random-weight timing targets, `constant_choice` makes
the target's greedy choice token 0 at every position, whatever the rounding, so the continuation is all zeros.
Oracle acceptance is for greedy steps (graph-capturable: the schedules and each row's step count live on the device, and
`set_schedule` changes them in place, so graphs captured earlier follow it; an entry of -1 passes the draft's
own tokens through).

Each block has a schedule of its own, so that a run whose block changes from step to step (an engine with
`max_step_tokens`) accepts at every step what a model card gives for that step's block; `tau_schedule` spreads a
fractional mean acceptance evenly over the steps.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from blockspec.engine.proposer import Proposer

MAX_SCHEDULE = 100  # entries of one block's schedule


def tau_schedule(tau: float) -> list[int]:
    """Accepted drafts per step, MAX_SCHEDULE steps whose mean is exactly tau - 1 (tau to two decimals), spread so
    that the first n steps of any run accept within one draft of n * (tau - 1): a short request sees the mean."""
    mean = Fraction(round((tau - 1) * 100), 100)
    if mean < 0:
        raise ValueError(f"tau must be at least 1, got {tau}")
    return [int(mean * (i + 1)) - int(mean * i) for i in range(MAX_SCHEDULE)]


class OracleProposer:
    """Wraps `inner` (whose draft pass runs every step); proposes `reference[p]` (the token at position p) for
    the first `schedule[i % len(schedule)]` drafted slots of a row's i-th step and a wrong token after them (-1:
    the inner proposer's tokens). `schedule` is one list for every block, or a dict block -> list; a block it does
    not list follows the smallest listed block above it (else the largest), capped by its own size."""

    def __init__(self, inner: Proposer, reference: list[int] | torch.Tensor,
                 schedule: list[int] | dict[int, list[int]], vocab_size: int, device: torch.device | str) -> None:
        self.inner, self.vocab_size = inner, vocab_size
        self.max_block, self.tap_layer_ids = inner.max_block, inner.tap_layer_ids
        self.reference = torch.as_tensor(reference, device=device)
        self.schedules = torch.zeros(self.max_block + 1, MAX_SCHEDULE, dtype=torch.long, device=device)
        self.lengths = torch.ones(self.max_block + 1, dtype=torch.long, device=device)
        self.set_schedule(schedule)
        self.slots = torch.arange(self.max_block - 1, device=device)

    def allocate(self, max_batch: int, max_len: int) -> None:
        self.inner.allocate(max_batch, max_len)
        self.steps = torch.zeros(max_batch, dtype=torch.long, device=self.schedules.device)  # proposals per row

    def join(self, first: int, features: torch.Tensor | None, positions: torch.Tensor, lengths: torch.Tensor) -> None:
        self.inner.join(first, features, positions, lengths)
        self.steps[first:first + positions.shape[0]] = 0

    def set_schedule(self, schedule: list[int] | dict[int, list[int]]) -> None:
        """New schedules, written in place (graphs captured earlier read them): one list for every block, or a
        dict block -> list (the blocks it does not list: as in the class docstring)."""
        listed = schedule if isinstance(schedule, dict) else {self.max_block: schedule}
        if not all(1 <= len(s) <= MAX_SCHEDULE for s in listed.values()):
            raise ValueError(f"a schedule has 1 to {MAX_SCHEDULE} entries, got {listed}")
        blocks = sorted(listed)
        for block in range(self.max_block + 1):
            entries = listed[next((b for b in blocks if b >= block), blocks[-1])]
            self.schedules[block, :len(entries)] = torch.tensor(entries)
            self.lengths[block] = len(entries)

    def set_reference(self, reference: list[int] | torch.Tensor) -> None:
        """A new continuation, written in place (graphs captured earlier read it); no longer than the first."""
        reference = torch.as_tensor(reference)
        self.reference[:reference.shape[0]].copy_(reference)

    def propose_greedy(self, n: int, block: int, last_tokens: torch.Tensor, block_positions: torch.Tensor,
                       kv_len: int) -> torch.Tensor:
        drafted = self.inner.propose_greedy(n, block, last_tokens, block_positions, kv_len)
        slots = block_positions[:, 1:].clamp(max=self.reference.shape[0] - 1)
        right = self.reference[slots]
        correct = self.schedules[block, self.steps[:n] % self.lengths[block]]
        self.steps[:n] += 1
        oracle = torch.where(self.slots[None, :block - 1] < correct[:, None], right, (right + 1) % self.vocab_size)
        return torch.where(correct[:, None] < 0, drafted, oracle)

    def propose_sampled(self, *args: object) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The inner proposer's own samples: oracle acceptance is for greedy steps (a sampled step is only timed)."""
        return self.inner.propose_sampled(*args)

    def observe(self, n: int, block_positions: torch.Tensor, features: torch.Tensor | None) -> None:
        self.inner.observe(n, block_positions, features)

    def settle(self, n: int, slots: int) -> None:
        self.inner.settle(n, slots)

    def move_row(self, source: int, dest: int, length: int) -> None:
        self.inner.move_row(source, dest, length)
        self.steps[dest] = self.steps[source]

    def state(self, n: int) -> list[torch.Tensor]:
        return self.inner.state(n) + [self.steps[:n]]


@torch.no_grad()
def constant_choice(model: torch.nn.Module) -> None:
    """Make the target's greedy choice token 0 everywhere: a final norm that scales by 0 makes every logit exactly
    0, and the argmax takes the first of tied columns (a zero-centred norm scales by 1 + w: w = -1). Every layer
    still runs as before (timing is unchanged)."""
    model.norm.weight.fill_(-1.0 if getattr(model.norm, "zero_centred", False) else 0.0)
