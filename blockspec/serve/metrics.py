"""Server metrics through prometheus_client, with vLLM's names under a `blockspec_` prefix.

Each app has a registry of its own (a process may run several apps, as the tests do; the library's global
registry refuses a second metric of the same name). The metrics are thread-safe: the generation thread and
the event loop both update them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OUTCOMES = ("stop", "length", "cancelled", "error", "rejected", "invalid")


class ServerMetrics:
    """Every metric `/metrics` exposes."""

    def __init__(self, block_size: int) -> None:
        self.registry = CollectorRegistry()
        p, r = "blockspec_", self.registry
        self.requests = Counter(p + "requests", "Requests by outcome: stop / length (finished), cancelled (client "
                                                "went away), error, rejected (queue full or shutting down, 503), "
                                                "invalid (bad input, 4xx).", ["outcome"], registry=r)
        for outcome in OUTCOMES:  # every outcome exposed from the start, at 0
            self.requests.labels(outcome=outcome)
        self.running = Gauge(p + "num_requests_running", "Requests being generated now.", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests waiting in the queue.", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated.", registry=r)
        self.num_drafts = Counter(p + "spec_decode_num_drafts", "Draft-and-verify steps.", registry=r)
        self.num_draft_tokens = Counter(p + "spec_decode_num_draft_tokens", "Tokens proposed by the draft.",
                                        registry=r)
        self.num_accepted_tokens = Counter(p + "spec_decode_num_accepted_tokens",
                                           "Draft tokens accepted by the target.", registry=r)
        self.acceptance_length = Histogram(p + "spec_decode_acceptance_length",
                                           "Tokens committed per verify step (accepted drafts + 1 bonus).",
                                           buckets=[float(n) for n in range(1, block_size + 1)], registry=r)
        self.queue_time = Histogram(p + "request_queue_time_seconds", "Time spent waiting in the queue.",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Generation start to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(p + "time_per_output_token_seconds", "Mean time per output token after the first.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Request accepted to last token (queue included).",
                             buckets=LATENCY_BUCKETS, registry=r)

    def mean_latency_s(self) -> float | None:
        """Mean end-to-end latency of the requests finished so far (None before the first)."""
        name = "blockspec_e2e_request_latency_seconds"
        count = self.registry.get_sample_value(name + "_count")
        return self.registry.get_sample_value(name + "_sum") / count if count else None

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The metrics in the format the scraper's Accept header asks for (Prometheus text by default), and
        its content type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type
