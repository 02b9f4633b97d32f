"""Prometheus metrics of the server, on their own registry (so several servers can share a
process in tests) and served over HTTP by `prometheus_client`.

Per-request histograms and counters are updated when a request ends; the engine's live gauges
(running, waiting, KV pages, compilations, KV transfers) are read from its stats at scrape
time, one series per stage: `stage="colocated"`, or `stage="prefill"` and `stage="decode"`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from meshserve.engine.api import RequestDelta, StageStats

# Seconds; from 10 ms steps on CPU to minute-long queues under load.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
PER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


Stages = Callable[[], list[StageStats]]  # each stage's, read at scrape time


class Metrics:
  def __init__(self, stages: Stages):
    self.registry = CollectorRegistry()
    r = self.registry
    self.requests = Counter(
      "meshserve_requests", "Finished Generate calls, by gRPC status and finish reason",
      ["status", "finish_reason"], registry=r,
    )  # fmt: skip
    self.prompt_tokens = Counter("meshserve_prompt_tokens", "Prompt tokens", registry=r)
    self.cached_tokens = Counter(
      "meshserve_prompt_cached_tokens", "Prompt tokens served from the prefix cache", registry=r
    )
    self.generated_tokens = Counter("meshserve_generation_tokens", "Generated tokens", registry=r)
    self.ttft = Histogram(
      "meshserve_time_to_first_token_seconds", "Arrival to the first token",
      buckets=LATENCY_BUCKETS, registry=r,
    )  # fmt: skip
    self.tpot = Histogram(
      "meshserve_time_per_output_token_seconds", "Mean gap between a request's tokens after "
      "the first", buckets=PER_TOKEN_BUCKETS, registry=r,
    )  # fmt: skip
    self.queue = Histogram(
      "meshserve_queue_time_seconds", "Arrival to first scheduled", buckets=LATENCY_BUCKETS,
      registry=r,
    )  # fmt: skip
    self.e2e = Histogram(
      "meshserve_e2e_request_latency_seconds", "Arrival to the last token",
      buckets=LATENCY_BUCKETS, registry=r,
    )  # fmt: skip
    self.totals = {"prompt": 0, "cached": 0}  # for the hit rate, read at scrape time
    self.transfer = Histogram(
      "meshserve_kv_transfer_seconds", "A request's KV hand-off from the prefill to the decode "
      "stage, waits for pages included", buckets=LATENCY_BUCKETS, registry=r,
    )  # fmt: skip
    r.register(_EngineCollector(stages, self.totals))

  def request_done(self, status: str, last: RequestDelta | None) -> None:
    self.requests.labels(status, (last and last.finish_reason) or "none").inc()
    if last is None:
      return
    self.prompt_tokens.inc(last.num_prompt_tokens)
    self.cached_tokens.inc(last.num_cached_tokens)
    self.totals["prompt"] += last.num_prompt_tokens
    self.totals["cached"] += last.num_cached_tokens
    self.generated_tokens.inc(last.num_output_tokens)
    t = last.timing
    if t.transfer_s is not None:
      self.transfer.observe(t.transfer_s)
    if t.queued_s is not None:
      self.queue.observe(t.queued_s)
    if t.first_token_s is not None:
      self.ttft.observe(t.first_token_s)
      if t.finished_s is not None and last.finished:
        self.e2e.observe(t.finished_s)
        if last.num_output_tokens > 1:
          self.tpot.observe((t.finished_s - t.first_token_s) / (last.num_output_tokens - 1))

  def serve(self, port: int, host: str) -> None:
    """Serves /metrics over HTTP on a daemon thread."""
    start_http_server(port, addr=host, registry=self.registry)


class _EngineCollector(Collector):
  """The engine's counters, one series per stage, read when scraped."""

  GAUGES = {
    "meshserve_requests_running": ("Requests in the running batch", "running"),
    "meshserve_requests_waiting": ("Requests accepted and waiting to run", "waiting"),
    "meshserve_kv_pages_free": ("Free KV cache pages", "free_pages"),
    "meshserve_kv_pages_used": ("KV cache pages in use", "used_pages"),
    "meshserve_kv_pages_total": ("KV cache pages in the pool", "total_pages"),
    "meshserve_requests_pinned": ("Prefill: hand-offs holding pages until landed", "pinned"),
    "meshserve_requests_importing": ("Decode: requests waiting for pages or their KV", "importing"),
  }  # fmt: skip
  COUNTERS = {
    "meshserve_compilations": ("Device step shapes compiled since start", "compilations"),
    "meshserve_engine_steps": ("Engine steps run", "steps"),
    "meshserve_preemptions": ("Requests preempted for lack of KV pages", "preemptions"),
    "meshserve_kv_transfers": ("Decode: KV hand-offs landed", "kv_transfers"),
    "meshserve_kv_transfer_bytes": ("Decode: bytes of KV handed over", "kv_transfer_bytes"),
  }

  def __init__(self, stages: Stages, totals: dict[str, int]):
    self.stages, self.totals = stages, totals

  def collect(self):
    stages = self.stages()
    for kind, table in ((GaugeMetricFamily, self.GAUGES), (CounterMetricFamily, self.COUNTERS)):
      for name, (doc, key) in table.items():
        family = kind(name, doc, labels=["stage"])
        for stats in stages:
          family.add_metric([stats.stage], getattr(stats, key))
        yield family
    hit_rate = self.totals["cached"] / max(self.totals["prompt"], 1)
    yield GaugeMetricFamily(
      "meshserve_prefix_cache_hit_rate",
      "Share of finished requests' prompt tokens served from the prefix cache",
      value=hit_rate,
    )
