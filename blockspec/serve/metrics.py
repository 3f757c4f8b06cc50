"""Server metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Three metric kinds, each thread-safe (the generation thread and the event loop both update them):
counters and gauges (optionally labelled) and histograms (cumulative `_bucket{le=...}`, `_sum`, `_count`).
"""

from __future__ import annotations

import math
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OUTCOMES = ("stop", "length", "cancelled", "error", "rejected", "invalid")


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


class Metric:
    """A counter or a gauge; `inc` / `set` take label values as keyword arguments."""

    def __init__(self, name: str, kind: str, help: str, label_sets: tuple[dict, ...] = ({},)) -> None:
        self.name, self.kind, self.help = name, kind, help
        self._lock = threading.Lock()
        self._values: dict[tuple, float] = {tuple(sorted(labels.items())): 0.0 for labels in label_sets}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[tuple(sorted(labels.items()))] = float(value)

    def get(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            samples = [f"{self.name}{_labels(k)} {_number(v)}" for k, v in self._values.items()]
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *samples]


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._lock = threading.Lock()
        self._counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[next(i for i, b in enumerate(self.buckets) if value <= b)] += 1
            self.sum += value
            self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            cumulative = 0
            for bound, n in zip(self.buckets, self._counts):
                cumulative += n
                lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
            lines += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    """Every metric `/metrics` exposes (names follow vLLM's, with a `blockspec_` prefix)."""

    def __init__(self, block_size: int) -> None:
        p = "blockspec_"
        self.requests = Metric(p + "requests_total", "counter",
                               "Requests by outcome: stop / length (finished), cancelled (client went away), "
                               "error, rejected (queue full, 503), invalid (bad input, 4xx).",
                               tuple({"outcome": o} for o in OUTCOMES))
        self.running = Metric(p + "num_requests_running", "gauge", "Requests being generated now.")
        self.waiting = Metric(p + "num_requests_waiting", "gauge", "Requests waiting in the queue.")
        self.prompt_tokens = Metric(p + "prompt_tokens_total", "counter", "Prompt tokens prefilled.")
        self.generation_tokens = Metric(p + "generation_tokens_total", "counter", "Tokens generated.")
        self.num_drafts = Metric(p + "spec_decode_num_drafts_total", "counter", "Draft-and-verify steps.")
        self.num_draft_tokens = Metric(p + "spec_decode_num_draft_tokens_total", "counter",
                                       "Tokens proposed by the draft.")
        self.num_accepted_tokens = Metric(p + "spec_decode_num_accepted_tokens_total", "counter",
                                          "Draft tokens accepted by the target.")
        self.acceptance_length = Histogram(p + "spec_decode_acceptance_length",
                                           "Tokens committed per verify step (accepted drafts + 1 bonus).",
                                           tuple(float(n) for n in range(1, block_size + 1)))
        self.queue_time = Histogram(p + "request_queue_time_seconds", "Time spent waiting in the queue.",
                                    LATENCY_BUCKETS)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Generation start to first token.",
                              LATENCY_BUCKETS)
        self.tpot = Histogram(p + "time_per_output_token_seconds", "Mean time per output token after the first.",
                              LATENCY_BUCKETS)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Request accepted to last token (queue included).",
                             LATENCY_BUCKETS)
        self.all = (self.requests, self.running, self.waiting, self.prompt_tokens, self.generation_tokens,
                    self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens, self.acceptance_length,
                    self.queue_time, self.ttft, self.tpot, self.e2e)

    def render(self) -> str:
        return "\n".join(line for metric in self.all for line in metric.render()) + "\n"
