"""The server's Prometheus metrics (`GET /metrics`): requests, tokens, queue depth, latency histograms, KV usage,
speculative decoding (guesses checked and accepted, verify passes).

Each `ServeMetrics` has its own registry (not prometheus-client's global one), so several servers or tests in one
process never share counters. The scheduler thread and the HTTP handlers both record here; prometheus-client's
metrics are thread-safe.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: time to first token spans a queued long prompt; inter-token latency one decode step
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class ServeMetrics:
    """Counters, gauges and histograms of one server, prefixed `edgeinfer_`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("edgeinfer_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("edgeinfer_generations", "Generations ended, by finish reason "
                                "(stop, length, cancelled, error)", ["reason"], registry=r)
        self.prompt_tokens = Counter("edgeinfer_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.cached_tokens = Counter("edgeinfer_prompt_cached_tokens", "Prompt tokens found in the KV cache "
                                     "(not evaluated again)", registry=r)
        self.generated_tokens = Counter("edgeinfer_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("edgeinfer_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("edgeinfer_running_requests", "Requests holding a slot (prefill or decode)",
                             registry=r)
        self.kv_usage = Gauge("edgeinfer_kv_cache_usage_ratio", "Fraction of the slots' KV cache positions that "
                              "hold tokens (running and cached for reuse)", registry=r)
        self.ttft = Histogram("edgeinfer_time_to_first_token_seconds", "From admission to the first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token = Histogram("edgeinfer_inter_token_latency_seconds", "Between a request's tokens",
                                     buckets=_ITL_BUCKETS, registry=r)
        self.step_rows = Histogram("edgeinfer_step_rows", "Rows (tokens) in one forward pass",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)

        self.draft_tokens = Counter("edgeinfer_draft_tokens", "Guessed tokens checked by speculative decoding",
                                    registry=r)
        self.draft_tokens_accepted = Counter("edgeinfer_draft_tokens_accepted", "Guessed tokens the model agreed "
                                             "with (kept)", registry=r)
        self.verify_passes = Counter("edgeinfer_verify_passes", "Request steps that checked guesses (each yields "
                                     "its accepted guesses plus one token)", registry=r)
        self.draft_acceptance = Gauge("edgeinfer_draft_acceptance_ratio", "Accepted over checked guesses since "
                                      "the start", registry=r)
        self.tokens_per_verify_pass = Gauge("edgeinfer_tokens_per_verify_pass", "Tokens a request's verify pass "
                                            "yields on average since the start (1 is plain decoding)", registry=r)

    def observe_speculation(self, drafted: int, accepted: int, totals) -> None:
        """One verify pass checked `drafted` guesses and kept `accepted`; totals: the scheduler's
        edgeinfer.speculative.SpeculationStats after it."""
        self.draft_tokens.inc(drafted)
        self.draft_tokens_accepted.inc(accepted)
        self.verify_passes.inc()
        self.draft_acceptance.set(totals.acceptance_rate)
        self.tokens_per_verify_pass.set((totals.accepted + totals.verify_steps) / totals.verify_steps)

    def render(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)
