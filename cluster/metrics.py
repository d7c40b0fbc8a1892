"""Prometheus metrics of the serving process, with vLLM's names and meanings under the `dsv4:` prefix (so vLLM
dashboards port by a rename) and the same `model_name` label. Served by `prometheus_client` at `/metrics` on
`--metrics-port` of `dsv4 serve` (DEFAULT_PORT; 0 turns it off).

Request metrics are observed where every API's streams pass (`GenerationService.stream`): time to first token,
inter-token latency (each delta's gap spread over its tokens), end-to-end latency, prompt and generation tokens,
finished requests by reason. Engine gauges (running / waiting requests, KV blocks in use per worker, the step
interval and the workers' own step time, speculative drafts verified and accepted, prefix-cache queries and hits)
are refreshed from the coordinator's `GetLoads` report once a second.
"""

from __future__ import annotations

import logging
import time

from dsv4.cluster.engine_client import LoadReport
from dsv4.cluster.text_stream import StreamEvent, TextDelta, TextFinal

request_log = logging.getLogger("dsv4.requests")
DEFAULT_PORT = 9464          # the OpenTelemetry Prometheus exporter's port; the gRPC API keeps 50051
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.model_name = model_name
        r, m = self.registry, ["model_name"]
        self.running = Gauge("dsv4:num_requests_running", "Requests running on the workers", m, registry=r)
        self.waiting = Gauge("dsv4:num_requests_waiting", "Requests waiting for admission", m, registry=r)
        self.kv_usage = Gauge("dsv4:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full)", m, registry=r)
        self.kv_used = Gauge("dsv4:kv_cache_used_blocks", "KV blocks in use per worker", [*m, "worker"], registry=r)
        self.kv_total = Gauge("dsv4:kv_cache_total_blocks", "KV blocks per worker", [*m, "worker"], registry=r)
        self.step_interval = Gauge("dsv4:step_interval_seconds", "Mean interval between engine step completions "
                                   "(last 100 steps)", m, registry=r)
        self.worker_step = Gauge("dsv4:worker_step_seconds", "Mean time of the slowest worker per step "
                                 "(last 100 steps)", m, registry=r)
        self.prompt_tokens = Counter("dsv4:prompt_tokens", "Prompt tokens of finished requests", m, registry=r)
        self.generation_tokens = Counter("dsv4:generation_tokens", "Generated tokens streamed", m, registry=r)
        self.request_success = Counter("dsv4:request_success", "Finished requests", [*m, "finished_reason"],
                                       registry=r)
        self.ttft = Histogram("dsv4:time_to_first_token_seconds", "Time to first token", m,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dsv4:inter_token_latency_seconds", "Time between output tokens", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("dsv4:e2e_request_latency_seconds", "End-to-end request latency", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.spec_drafts = Counter("dsv4:spec_decode_num_draft_tokens", "Speculative draft tokens verified", m,
                                   registry=r)
        self.spec_accepted = Counter("dsv4:spec_decode_num_accepted_tokens", "Speculative draft tokens accepted",
                                     m, registry=r)
        self.prefix_queries = Counter("dsv4:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      m, registry=r)
        self.prefix_hits = Counter("dsv4:prefix_cache_hits", "Prompt tokens served from the prefix cache", m,
                                   registry=r)
        self._seen: dict[str, float] = {}   # the engine's cumulative counts at the last report

    def observe_loads(self, report: LoadReport) -> None:
        name = self.model_name
        self.running.labels(name).set(report.num_running_requests)
        self.waiting.labels(name).set(report.num_waiting_requests)
        used = total = 0
        for w in report.workers:
            self.kv_used.labels(name, str(w.rank)).set(w.total_blocks - w.free_blocks)
            self.kv_total.labels(name, str(w.rank)).set(w.total_blocks)
            used, total = used + w.total_blocks - w.free_blocks, total + w.total_blocks
        self.kv_usage.labels(name).set(used / total if total else 0.0)
        self.step_interval.labels(name).set(report.extra.get("mean_step_interval_seconds", 0.0))
        self.worker_step.labels(name).set(report.extra.get("mean_worker_seconds", 0.0))
        for key, counter in (("spec_decode_num_draft_tokens", self.spec_drafts),
                             ("spec_decode_num_accepted_tokens", self.spec_accepted),
                             ("prefix_cache_queries", self.prefix_queries), ("prefix_cache_hits", self.prefix_hits)):
            total = report.extra.get(key, 0.0)          # cumulative in the engine: count what it grew by
            counter.labels(name).inc(max(0.0, total - self._seen.get(key, 0.0)))
            self._seen[key] = total

    def serve_http(self, port: int, host: str = "127.0.0.1"):
        """Start the `/metrics` HTTP endpoint in a daemon thread; returns the server (`.shutdown()` stops it)."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


class RequestTimer:
    """One request's latencies, fed the stream's events in order: observed into the metrics (if any), and one
    INFO line per finished request on the `dsv4.requests` logger (id, reason, tokens and tokens per engine step
    (above 1 when speculative drafts were accepted), TTFT, TPOT, end to end)."""

    def __init__(self, metrics: ServerMetrics | None, request_id: str):
        self._m, self._request_id = metrics, request_id
        self._start = self._last = time.perf_counter()
        self._first_at: float | None = None
        self._num_tokens = 0
        self._num_deltas = 0          # engine steps that brought tokens (several per step: accepted drafts)

    def on_event(self, event: StreamEvent) -> None:
        now, m = time.perf_counter(), self._m
        if isinstance(event, TextDelta) and event.token_ids:
            n = len(event.token_ids)
            gaps = n if self._first_at is not None else n - 1     # the rest of a first delta came with it
            if m is not None:
                name = m.model_name
                if self._first_at is None:
                    m.ttft.labels(name).observe(now - self._start)
                for _ in range(gaps):
                    m.itl.labels(name).observe((now - self._last) / n)
                m.generation_tokens.labels(name).inc(n)
            if self._first_at is None:
                self._first_at = now
            self._num_tokens += n
            self._num_deltas += 1
            self._last = now
        elif isinstance(event, TextFinal):
            if m is not None:
                m.e2e.labels(m.model_name).observe(now - self._start)
                m.prompt_tokens.labels(m.model_name).inc(event.num_prompt_tokens)
                m.request_success.labels(m.model_name, event.finish_reason.value).inc()
            ttft = (self._first_at or now) - self._start
            tpot = (self._last - self._first_at) / (self._num_tokens - 1) if self._num_tokens > 1 else 0.0
            per_step = self._num_tokens / self._num_deltas if self._num_deltas else 0.0
            request_log.info("request %s finished: %s, %d prompt + %d output tokens (%.2f per step), TTFT %.1f ms, "
                             "TPOT %.2f ms, e2e %.1f ms%s", self._request_id, event.finish_reason.value,
                             event.num_prompt_tokens, len(event.output_ids), per_step, 1e3 * ttft, 1e3 * tpot,
                             1e3 * (now - self._start), f", error: {event.error}" if event.error else "")
