"""Prometheus metrics of the inference server, in one `prometheus_client` registry per server.

Importing this module turns off prometheus_client's `_created` series process-wide (the library
has no per-registry switch), so /metrics shows only the series listed in `ServerMetrics`.
"""

from __future__ import annotations

import threading
import time

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
            "edgecl_model_refused_total", "Versions refused (manifest, sha256, load, verify); "
            "the previous version keeps serving.",
            ["task", "reason"], registry=self.registry)
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

    def render(self) -> bytes:
        """The registry in the Prometheus text format (`content_type`)."""
        return prometheus_client.generate_latest(self.registry)
