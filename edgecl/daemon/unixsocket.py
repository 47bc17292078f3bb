"""A unix domain socket (mode 0600) speaking NDJSON, for a sensor process on the same device.

Each line is a sample, a batch `{"samples": [...]}`, or an end `{"end_task": "<task>"}` (with
`"samples": n`, see `edgecl.daemon.schema`). Each line gets one answer line once it is durable:
`{"first_seq": N, "count": k}`, or `{"error": "...", "status": 400}` naming the problem, or
`{"error": "...", "status": 429, "retry_after": s}` when the learner lags (send the line again
after `s` seconds; nothing of it was accepted).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socketserver
import threading
from pathlib import Path
from typing import Any

import orjson

from edgecl.daemon.daemon import ADMISSION_ERRORS, Daemon

log = logging.getLogger("edgecl.learn")
MAX_CONNECTIONS = 64  # beyond it a connection gets one 503 line and is closed
IDLE_TIMEOUT_S = 60.0  # a connection that sends nothing for this long is closed


def answer(daemon: Daemon, line: bytes) -> dict[str, Any]:
    """Validate and journal one NDJSON line; the answer line's content."""
    try:
        appended = daemon.submit(daemon.parse(line, "application/x-ndjson")).result()
    except ADMISSION_ERRORS as e:
        refusal = daemon.refusal(e)
        retry = {} if refusal.retry_after_s is None else {"retry_after": refusal.retry_after_s}
        return {"error": refusal.message, "status": refusal.status, **retry}
    return appended.answer()


class _Handler(socketserver.StreamRequestHandler):
    server: SocketSource

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout_s  # StreamRequestHandler sets it on the socket
        super().setup()

    def handle(self) -> None:
        limit = self.server.max_line_bytes
        while True:
            try:
                line = self.rfile.readline(limit + 1)
            except TimeoutError:
                self.server.daemon.count("socket_idle_closed")
                with contextlib.suppress(OSError):
                    self._reply({"error": f"nothing sent for {self.timeout:g} s; connection "
                                          "closed", "status": 408})
                return
            if not line:
                return
            if len(line) > limit and not line.endswith(b"\n"):
                self._reply({"error": f"line over {limit:,} bytes; connection closed",
                             "status": 413})
                return
            if line.strip():
                self._reply(answer(self.server.daemon, line))

    def _reply(self, message: dict[str, Any]) -> None:
        self.wfile.write(orjson.dumps(message) + b"\n")


class SocketSource(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves NDJSON ingest on `path` (mode 0600: only the daemon's user may connect)."""

    daemon_threads = True
    # what a connection flood costs: at most MAX_CONNECTIONS threads, each for IDLE_TIMEOUT_S
    max_connections = MAX_CONNECTIONS
    idle_timeout_s = IDLE_TIMEOUT_S

    def __init__(self, daemon: Daemon, path: Path) -> None:
        self.daemon = daemon
        self.path = path
        self.active = 0  # connections being served
        self._active_lock = threading.Lock()
        self.max_line_bytes = int(daemon.cfg.learn.max_body_mb * (1 << 20))
        if path.is_socket():  # a stale socket of an earlier run: the state dir lock is ours
            path.unlink()
        super().__init__(str(path), _Handler, bind_and_activate=False)
        try:
            self.server_bind()
            os.chmod(path, 0o600)  # before listen(): nobody can connect in between
            self.server_activate()
        except OSError:
            self.server_close()
            raise
        self._thread = threading.Thread(target=self.serve_forever, args=(0.2,),
                                        name="edgecl-socket", daemon=True)

    @property
    def refused(self) -> int:
        """Connections turned away: every slot was taken (status: ingest_events)."""
        return self.daemon.ingest_events["socket_refused"]

    @property
    def timed_out(self) -> int:
        """Connections closed for sending nothing."""
        return self.daemon.ingest_events["socket_idle_closed"]

    def start(self) -> None:
        self._thread.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._active_lock:
            full = self.active >= self.max_connections
            self.active += not full
        if full:
            self.daemon.count("socket_refused")
            if self.refused % 100 == 1:
                log.warning("unix socket: %d connections open, %d turned away so far",
                            self.max_connections, self.refused)
            with contextlib.suppress(OSError):
                request.sendall(orjson.dumps({
                    "error": f"{self.max_connections} connections are open; try again later",
                    "status": 503, "retry_after": 1}) + b"\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self.active -= 1

    def stop(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
