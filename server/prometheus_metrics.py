"""Prometheus metrics of the query server (prometheus-client).

Metrics live in a registry of their own per server (several servers can run in one
process, e.g. in tests) and are always recorded; ``start_http(port)`` exposes them on
``http://HOST:PORT/metrics`` when the operator asks for it (``--metrics-port``).

- ``ecsearch_requests_total{method, code}``: finished RPCs by gRPC status code name.
- ``ecsearch_stage_latency_seconds{stage}``: per-stage latency histogram; stages
  ``decode``, ``queue``, ``encode``, ``search``, ``metadata``, ``lexical``, ``fusion``,
  ``total`` (a stage a request did not run is not observed).
- ``ecsearch_encode_batch_size``: samples per query tower call.
- ``ecsearch_index_version_info{version}``: 1 for the version being served.
Source: our choice, following clip-retrieval's per-stage histograms.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STAGES = ("decode", "queue", "encode", "search", "metadata", "lexical", "fusion", "total")
# Latency buckets in seconds: 0.5 ms to 5 s.
_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServerMetrics:
    """Counters and histograms of one server; see the module docstring for the names."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ecsearch_requests", "finished RPCs by method and gRPC status code",
                                ("method", "code"), registry=self.registry)
        self.stage_latency = Histogram("ecsearch_stage_latency_seconds", "per-stage request latency",
                                       ("stage",), buckets=_LATENCY_BUCKETS_S, registry=self.registry)
        self.batch_size = Histogram("ecsearch_encode_batch_size", "samples per query tower call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.index_version = Gauge("ecsearch_index_version_info", "index version being served",
                                   ("version",), registry=self.registry)
        self._served: str | None = None
        # labelled children looked up once each (on first use, so a stage no request ran has
        # no series): ``labels()`` takes a lock and builds a key per call, ~5 % of the
        # GIL-holding time of a text@8 load before (docs/serving.md)
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *labels: str):
        """``metric.labels(*labels)``, cached for the server's life (few label sets)."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def count_request(self, method: str, code_name: str) -> None:
        self._child(self.requests, method, code_name).inc()

    def observe_stages_ms(self, **stage_ms: float) -> None:
        """Record stage latencies given in milliseconds, e.g. ``encode=3.2``."""
        for stage, value_ms in stage_ms.items():
            self._child(self.stage_latency, stage).observe(value_ms / 1e3)

    def observe_batch(self, size: int, encode_s: float) -> None:
        self.batch_size.observe(size)

    def set_index_version(self, version: str) -> None:
        if self._served is not None:
            self.index_version.remove(self._served)
        self.index_version.labels(version=version).set(1)
        self._served = version

    def start_http(self, port: int, host: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` over HTTP on ``host:port`` (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)
