"""Prometheus metrics of the inference server, rendered in the text exposition format."""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import defaultdict

# Seconds; fine below 5 ms, where a small model on a small device should answer.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Histogram:
    """Latency histogram per label value; buckets are cumulative only when rendered."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self.sums: dict[str, float] = defaultdict(float)

    def observe(self, label: str, seconds: float) -> None:
        self.counts[label][bisect.bisect_left(BUCKETS, seconds)] += 1  # le: bound inclusive
        self.sums[label] += seconds

    def render(self, name: str, label_name: str) -> list[str]:
        lines = []
        for label, counts in sorted(self.counts.items()):
            cumulative = list(itertools.accumulate(counts))
            for bound, n in zip((*map(str, BUCKETS), "+Inf"), cumulative, strict=True):
                lines.append(f'{name}_bucket{{{label_name}="{label}",le="{bound}"}} {n}')
            lines.append(f'{name}_sum{{{label_name}="{label}"}} {self.sums[label]:.6f}')
            lines.append(f'{name}_count{{{label_name}="{label}"}} {cumulative[-1]}')
        return lines


class ServerMetrics:
    """Request counts and latencies, inference latencies, loaded versions, reloads, refusals.

    Task labels come only from the repository (`task` is "" for requests naming no loaded task),
    so a client cannot grow the label set.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.time()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.request_seconds = Histogram()
        self.inference_seconds = Histogram()
        self.versions: dict[str, int] = {}
        self.reloads: dict[str, int] = defaultdict(int)
        self.refused: dict[tuple[str, str], int] = defaultdict(int)

    def request(self, task: str, code: int, seconds: float) -> None:
        with self._lock:
            self.requests[task, code] += 1
            self.request_seconds.observe(task, seconds)

    def inference(self, task: str, seconds: float) -> None:
        with self._lock:
            self.inference_seconds.observe(task, seconds)

    def loaded(self, task: str, version: int) -> None:
        with self._lock:
            if task in self.versions:
                self.reloads[task] += 1
            self.versions[task] = version

    def refuse(self, task: str, reason: str) -> None:
        with self._lock:
            self.refused[task, reason] += 1

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP edgecl_up_seconds Seconds since the server started.",
                "# TYPE edgecl_up_seconds gauge",
                f"edgecl_up_seconds {time.time() - self._started:.3f}",
                "# HELP edgecl_requests_total Inference requests by task and HTTP status.",
                "# TYPE edgecl_requests_total counter",
                *(f'edgecl_requests_total{{task="{t}",code="{c}"}} {n}'
                  for (t, c), n in sorted(self.requests.items())),
                "# HELP edgecl_request_seconds Inference request latency in the server "
                "(request received, before its body is read, to response sent).",
                "# TYPE edgecl_request_seconds histogram",
                *self.request_seconds.render("edgecl_request_seconds", "task"),
                "# HELP edgecl_inference_seconds onnxruntime run time per request.",
                "# TYPE edgecl_inference_seconds histogram",
                *self.inference_seconds.render("edgecl_inference_seconds", "task"),
                "# HELP edgecl_model_version Version of each task's model now serving.",
                "# TYPE edgecl_model_version gauge",
                *(f'edgecl_model_version{{task="{t}"}} {v}'
                  for t, v in sorted(self.versions.items())),
                "# HELP edgecl_model_reloads_total New versions swapped in while serving.",
                "# TYPE edgecl_model_reloads_total counter",
                *(f'edgecl_model_reloads_total{{task="{t}"}} {n}'
                  for t, n in sorted(self.reloads.items())),
                "# HELP edgecl_model_refused_total Versions refused (manifest, sha256, load, "
                "verify); the previous version keeps serving.",
                "# TYPE edgecl_model_refused_total counter",
                *(f'edgecl_model_refused_total{{task="{t}",reason="{r}"}} {n}'
                  for (t, r), n in sorted(self.refused.items())),
            ]
        return "\n".join(lines) + "\n"
