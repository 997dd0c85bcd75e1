"""The engine's request metrics, and their Prometheus text exposition (the server's /metrics).

The engine thread records each request as it ends (EngineMetrics.record); a scrape reads a
snapshot under the same lock, with the engine's gauges (running, waiting, KV blocks) from
Engine.stats. Latencies are histograms with fixed buckets, cumulative as Prometheus wants
them. The format is the plain text one (version 0.0.4), written here so that serving needs no
client library.
"""
from __future__ import annotations

import math
import threading

# Bucket upper bounds in seconds: milliseconds for a token, up to minutes for a whole request.
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class Histogram:
    """Counts of observations at or below each bucket bound, their sum and count."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)   # per bucket, not yet cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{{labels},le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels},le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {_number(self.sum)}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


class EngineMetrics:
    """Counters and latency histograms of the requests an engine has ended."""

    def __init__(self):
        self._lock = threading.Lock()
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.queue = Histogram(QUEUE_BUCKETS)  # mostly well under 0.1 s
        self.first_token = Histogram(FIRST_TOKEN_BUCKETS)
        self.per_output_token = Histogram(TOKEN_BUCKETS)
        self.request = Histogram(REQUEST_BUCKETS)

    def record(self, reason: str, prompt_tokens: int, generated: int, t_submit: float,
               t_admit: float | None, t_first: float | None, t_end: float) -> None:
        """One request ended with reason: its tokens, and the times (perf_counter) it was
        submitted, admitted, got its first token (None where it never did) and ended. A
        cancelled or failed request counts, but its latencies say nothing of the server's."""
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generated
            if reason in ("cancelled", "error") or t_admit is None or t_first is None:
                return
            self.queue.observe(t_admit - t_submit)
            self.first_token.observe(t_first - t_submit)
            if generated > 1:
                self.per_output_token.observe((t_end - t_first) / (generated - 1))
            self.request.observe(t_end - t_submit)

    def exposition(self, model: str, stats: dict) -> str:
        """The Prometheus text format of these metrics and of the engine's stats()."""
        labels = f'model_name="{_escaped(model)}"'
        total, free = stats["total_blocks"], stats["free_blocks"]
        out: list[str] = []

        def metric(name: str, kind: str, help: str, value) -> None:
            out.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {_number(value)}"])

        metric("lisa_rt_requests_running", "gauge", "Requests in the running batch.", stats["running"])
        metric("lisa_rt_requests_waiting", "gauge", "Requests waiting to be admitted.", stats["waiting"])
        metric("lisa_rt_kv_cache_usage_ratio", "gauge",
               "Fraction of KV cache blocks held by requests (cached prefixes count as free).",
               (total - free) / total if total else 0.0)
        metric("lisa_rt_kv_cache_blocks", "gauge", "KV cache blocks in all.", total)
        metric("lisa_rt_prefix_cache_blocks", "gauge", "Released blocks kept for their prefix.",
               stats["cached_blocks"])
        with self._lock:
            out.extend(["# HELP lisa_rt_requests_total Requests ended, by finish reason.",
                        "# TYPE lisa_rt_requests_total counter"])
            out.extend(f'lisa_rt_requests_total{{{labels},finish_reason="{reason}"}} {count}'
                       for reason, count in self.finished.items())
            metric("lisa_rt_prompt_tokens_total", "counter", "Prompt tokens of the requests ended.",
                   self.prompt_tokens)
            metric("lisa_rt_generation_tokens_total", "counter", "Tokens generated by the requests ended.",
                   self.generation_tokens)
            for name, help, histogram in (
                    ("lisa_rt_request_queue_seconds", "From submission to admission.", self.queue),
                    ("lisa_rt_time_to_first_token_seconds", "From submission to the first token.",
                     self.first_token),
                    ("lisa_rt_time_per_output_token_seconds",
                     "A request's mean time between its tokens after the first.", self.per_output_token),
                    ("lisa_rt_request_seconds", "From submission to the end.", self.request)):
                out.extend([f"# HELP {name} {help}", f"# TYPE {name} histogram", *histogram.lines(name, labels)])
        metric("lisa_rt_prefill_tokens_total", "counter",
               "Prompt tokens admitted to prefill (preempted sequences again).", stats["admitted_tokens"])
        metric("lisa_rt_prefix_cache_hit_tokens_total", "counter",
               "Admitted prompt tokens whose keys and values were found in the prefix cache.",
               stats["cached_tokens"])
        metric("lisa_rt_preemptions_total", "counter", "Sequences preempted for KV cache room.",
               stats["preemptions"])
        metric("lisa_rt_engine_steps_total", "counter", "Forward passes the engine ran.", stats["steps"])
        metric("lisa_rt_draft_tokens_total", "counter",
               "Draft tokens run by speculative decoding (prompt lookup).", stats["draft_tokens"])
        metric("lisa_rt_draft_tokens_accepted_total", "counter",
               "Draft tokens kept: equal to the token the model drew in their place.",
               stats["accepted_draft_tokens"])
        return "\n".join(out) + "\n"


def _number(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "+Inf" if value > 0 else "-Inf" if value < 0 else "NaN"
    return repr(value) if isinstance(value, float) else str(value)


def _escaped(label: str) -> str:
    """A label value as the text format quotes it."""
    return label.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
