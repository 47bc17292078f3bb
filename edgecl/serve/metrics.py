"""Prometheus metrics of the inference server, in one `prometheus_client` registry per server.

Importing this module turns off prometheus_client's `_created` series process-wide (the library
has no per-registry switch), so /metrics shows only the series listed in `ServerMetrics`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

prometheus_client.disable_created_metrics()

# Seconds; fine below 5 ms, where a small model on a small device should answer.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class ServerMetrics:
    """Request counts and latencies, inference latencies, loaded versions, reloads, refusals.

    Task labels come only from the repository (`task` is "" for requests naming no loaded task),
    so a client cannot grow the label set.
    """

    content_type: str = prometheus_client.CONTENT_TYPE_LATEST  # of `render`'s output

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        started = time.time()
        Gauge("edgecl_up_seconds", "Seconds since the server started.",
              registry=self.registry).set_function(lambda: time.time() - started)
        self._requests = Counter(
            "edgecl_requests_total", "Inference requests by task and HTTP status.",
            ["task", "code"], registry=self.registry)
        self._request_seconds = Histogram(
            "edgecl_request_seconds", "Inference request latency in the server "
            "(request received, before its body is read, to response sent).",
            ["task"], buckets=BUCKETS, registry=self.registry)
        self._inference_seconds = Histogram(
            "edgecl_inference_seconds", "onnxruntime run time per request.",
            ["task"], buckets=BUCKETS, registry=self.registry)
        self._version = Gauge(
            "edgecl_model_version", "Version of each task's model now serving.",
            ["task"], registry=self.registry)
        self._reloads = Counter(
            "edgecl_model_reloads_total", "New versions swapped in while serving.",
            ["task"], registry=self.registry)
        self._refused = Counter(
            "edgecl_model_refused_total", "Versions refused (manifest, sha256, load, verify, "
            "timeout: the probe did not finish in time, crash: the probe process died); the "
            "previous version keeps serving.",
            ["task", "reason"], registry=self.registry)
        self._repo_unavailable = Counter(
            "edgecl_repository_unavailable_total", "Times the repository went missing or "
            "listed no task while models were serving (an unmounted disk); they kept serving.",
            registry=self.registry)
        self._out_of_range = Counter(
            "edgecl_input_out_of_range_total", "Requests whose values lie outside the task's "
            "training input range (--input-range: warned or rejected).",
            ["task"], registry=self.registry)
        self._loaded_lock = threading.Lock()
        self._loaded: set[str] = set()

    def request(self, task: str, code: int, seconds: float) -> None:
        self._requests.labels(task, str(code)).inc()
        self._request_seconds.labels(task).observe(seconds)

    def inference(self, task: str, seconds: float) -> None:
        self._inference_seconds.labels(task).observe(seconds)

    def loaded(self, task: str, version: int) -> None:
        with self._loaded_lock:
            if task in self._loaded:
                self._reloads.labels(task).inc()
            self._loaded.add(task)
            self._version.labels(task).set(version)

    def unloaded(self, task: str) -> None:
        """`task` is served no more: its version gauge goes."""
        with self._loaded_lock:
            self._loaded.discard(task)
            self._version.remove(task)

    def out_of_range(self, task: str) -> None:
        self._out_of_range.labels(task).inc()

    def refuse(self, task: str, reason: str) -> None:
        self._refused.labels(task, reason).inc()

    def repository_unavailable(self) -> None:
        self._repo_unavailable.inc()

    def watch_connections(self, counts: Callable[[], dict[str, int]]) -> None:
        """Export the HTTP server's connection counts (`edgecl.web.ConnectionGuard.counts`)."""
        self.registry.register(_ConnectionCollector(counts))

    def render(self) -> bytes:
        """The registry in the Prometheus text format (`content_type`)."""
        return prometheus_client.generate_latest(self.registry)


class _ConnectionCollector:
    """edgecl_connections_open, edgecl_connections_closed_total{reason} and
    edgecl_requests_shed_total, read from the server's connection guard at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        counts = self._counts()
        yield GaugeMetricFamily("edgecl_connections_open", "HTTP connections open.",
                                value=counts["open"])
        closed = CounterMetricFamily(
            "edgecl_connections_closed", "Connections the server closed: head_timeout (no "
            "whole request head within the head timeout), idle_timeout (keep-alive idle), "
            "evicted (the oldest idle connection, to make room for a new one).",
            labels=["reason"])
        for key, value in counts.items():
            if key.startswith("closed_"):
                closed.add_metric([key.removeprefix("closed_")], value)
        yield closed
        yield CounterMetricFamily("edgecl_requests_shed", "Requests answered 503 because the "
                                  "maximum number of requests were in flight (health probes "
                                  "never are).", value=counts["shed"])
