"""What GET /metrics shows (Prometheus' text format), in a registry of the app's own so that several
apps in one process do not collide."""
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    RATE_WINDOW_S = 10.0

    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        snap = engine.snapshot
        for name, key, doc in (("pop_queue_depth", "waiting", "requests waiting for a row"),
                               ("pop_running_rows", "running", "requests decoding"),
                               ("pop_kv_rows_in_use", "kv_rows_in_use", "KV buffer rows held by requests"),
                               ("pop_kv_rows", "kv_rows", "KV buffer rows allocated (--max-batch)")):
            Gauge(name, doc, registry=r).set_function(lambda key=key: snap()[key])
        self.ttft = Histogram("pop_time_to_first_token_seconds", "request received -> first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pop_inter_token_seconds", "time between a request's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("pop_generated_tokens", "tokens generated", registry=r)
        self.requests = Counter("pop_requests", "requests answered, by outcome", ["outcome"], registry=r)
        self.rejected = Counter("pop_requests_rejected", "requests refused: queue full or shutting down",
                                registry=r)
        self._recent = deque()
        Gauge("pop_tokens_per_second", f"tokens generated per second over the last {self.RATE_WINDOW_S:.0f} s",
              registry=r).set_function(self._rate)

    def token(self, at):
        self.tokens.inc()
        self._recent.append(at)

    def _rate(self):
        now = time.perf_counter()
        while self._recent and self._recent[0] < now - self.RATE_WINDOW_S:
            self._recent.popleft()
        return len(self._recent) / self.RATE_WINDOW_S

    def render(self):
        return generate_latest(self.registry)
