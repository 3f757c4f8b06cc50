"""Per-call statistics of a generation, with the names vLLM uses for speculative metrics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


def acceptance_histogram(lengths: list[int], block_size: int) -> list[int]:
    """Counts of acceptance lengths 1..block_size (index 0 = length 1)."""
    hist = [0] * block_size
    for n in lengths:
        hist[n - 1] += 1
    return hist


@dataclass
class GenerationStats:
    block_size: int
    prompt_tokens: int = 0
    generated_tokens: int = 0
    acceptance_lengths: list[int] = field(default_factory=list)  # per step, bonus included (1..block_size)
    step_blocks: list[int] = field(default_factory=list)  # per step, the block drafted for this request (<= block_size)
    ttft_s: float = 0.0  # prompt in -> first token out
    total_s: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.acceptance_lengths)

    @property
    def mean_acceptance_length(self) -> float:
        """tau: mean committed tokens per verify step (the bonus token included)."""
        return sum(self.acceptance_lengths) / len(self.acceptance_lengths) if self.acceptance_lengths else 0.0

    @property
    def acceptance_histogram(self) -> list[int]:
        """Counts of acceptance lengths 1..block_size (index 0 = length 1)."""
        return acceptance_histogram(self.acceptance_lengths, self.block_size)

    @property
    def num_draft_tokens(self) -> int:
        if self.step_blocks:
            return sum(b - 1 for b in self.step_blocks)
        return self.steps * (self.block_size - 1)

    @property
    def block_size_counts(self) -> dict[str, int]:
        """Steps per block size this request ran with, {"8": steps, ...} (an engine that sizes blocks per step
        varies them); string keys, as JSON has them."""
        counts: dict[int, int] = {}
        for b in self.step_blocks or [self.block_size] * self.steps:
            counts[b] = counts.get(b, 0) + 1
        return {str(b): counts[b] for b in sorted(counts)}

    @property
    def num_accepted_draft_tokens(self) -> int:
        return sum(n - 1 for n in self.acceptance_lengths)

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first."""
        return (self.total_s - self.ttft_s) / (self.generated_tokens - 1) if self.generated_tokens > 1 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.total_s if self.total_s > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("steps", "mean_acceptance_length", "acceptance_histogram", "num_draft_tokens", "block_size_counts",
                     "num_accepted_draft_tokens", "tpot_s", "tokens_per_s"):
            out[name] = getattr(self, name)
        return out
