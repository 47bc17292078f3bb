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
from edgecl.serve.http import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY_BYTES,
    InferenceApp,
    InferenceServer,
)
from edgecl.serve.metrics import ServerMetrics
from edgecl.serve.models import LiveModels
from edgecl.serve.runtime import DEFAULT_PROBE_TIMEOUT_S, Prober, choose_providers, load_model
from edgecl.web import HEAD_TIMEOUT_S, MAX_CONNECTIONS, ListenError

TOKEN_ENV = "EDGECL_SERVE_TOKEN"
log = logging.getLogger("edgecl.serve")


def create_server(repo: Path, host: str = "127.0.0.1", port: int = 8080,
                  providers: Sequence[str] | None = None, threads: int = 1,
                  token: str | None = None,
                  max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                  tls: tuple[Path, Path] | None = None, input_range: str = DEFAULT_MODE,
                  range_tolerance: float = DEFAULT_TOLERANCE,
                  max_batch: int = DEFAULT_MAX_BATCH,
                  probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
                  max_connections: int = MAX_CONNECTIONS,
                  max_connections_per_client: int | None = None,
                  head_timeout_s: float = HEAD_TIMEOUT_S) -> InferenceServer:
    """Load the newest good version of every task in `repo` and bind (with TLS when `tls` is
    a certificate and key file); `run()` serves. `input_range` (off, warn, reject) and
    `range_tolerance`: the input-range guard (`edgecl.serve.guard`); a bad one: ValueError.

    `max_batch`: rows per request (413 beyond). `probe_timeout_s`: how long a new version's
    probe may run in its child process before the version is refused. `max_connections`,
    `max_connections_per_client` (default: half of it) and `head_timeout_s`: the connection
    limits of `edgecl.web.ConnectionGuard`. `threads` is also the number of inference
    threads."""
    guard = RangeGuard(input_range, range_tolerance)
    metrics = ServerMetrics()
    chosen = choose_providers(providers)
    log.info("onnxruntime %s, providers %s, %d thread(s) per inference", ort.__version__,
             ", ".join(chosen), threads)
    app = None
    prober = Prober(probe_timeout_s)
    load = functools.partial(load_model, providers=chosen, threads=threads, prober=prober)
    models = LiveModels(repo, load, metrics, prober)
    try:
        models.refresh()
        app = InferenceApp(models, metrics, token, max_body_bytes, guard, max_batch, threads)
        return InferenceServer(app, host, port, tls, max_connections,
                               max_connections_per_client, head_timeout_s)
    except BaseException:
        if app is not None:
            app.close()
        raise


__all__ = ["TOKEN_ENV", "InferenceServer", "ListenError", "create_server"]
