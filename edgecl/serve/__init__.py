"""`edgecl serve`: per-task ONNX models from a model repository over the KServe v2 protocol.

Needs onnxruntime and numpy, never torch: a device can serve without the training stack.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from edgecl.serve.guard import DEFAULT_MODE, DEFAULT_TOLERANCE, RangeGuard
from edgecl.serve.http import DEFAULT_MAX_BODY_BYTES, InferenceApp, InferenceServer
from edgecl.serve.metrics import ServerMetrics
from edgecl.serve.models import LiveModels
from edgecl.serve.runtime import choose_providers, load_model
from edgecl.web import ListenError

TOKEN_ENV = "EDGECL_SERVE_TOKEN"
log = logging.getLogger("edgecl.serve")


def create_server(repo: Path, host: str = "127.0.0.1", port: int = 8080,
                  providers: Sequence[str] | None = None, threads: int = 1,
                  token: str | None = None,
                  max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                  tls: tuple[Path, Path] | None = None, input_range: str = DEFAULT_MODE,
                  range_tolerance: float = DEFAULT_TOLERANCE) -> InferenceServer:
    """Load the newest good version of every task in `repo` and bind (with TLS when `tls` is
    a certificate and key file); `run()` serves. `input_range` (off, warn, reject) and
    `range_tolerance`: the input-range guard (`edgecl.serve.guard`); a bad one: ValueError."""
    guard = RangeGuard(input_range, range_tolerance)
    metrics = ServerMetrics()
    chosen = choose_providers(providers)
    log.info("onnxruntime %s, providers %s, %d thread(s) per inference", ort.__version__,
             ", ".join(chosen), threads)
    load = functools.partial(load_model, providers=chosen, threads=threads)
    models = LiveModels(repo, load, metrics)
    models.refresh()
    return InferenceServer(InferenceApp(models, metrics, token, max_body_bytes, guard), host,
                           port, tls)


__all__ = ["TOKEN_ENV", "InferenceServer", "ListenError", "create_server"]
