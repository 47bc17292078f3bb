"""`edgecl learn` as one object: the daemon with its ingest sources (HTTP, unix socket, MQTT),
its SuperNode in a fleet, its signals, systemd's notifications and an orderly shutdown.

The CLI parses arguments and calls `LearnService.open(...).run()`; tests and benchmarks build
the same object, so the daemon they exercise is assembled as users run it.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecl import systemd
from edgecl.config import Config
from edgecl.daemon.daemon import Daemon, DaemonError
from edgecl.daemon.fleet import federation_refused
from edgecl.daemon.http import IngestApp
from edgecl.daemon.supernode import FleetLink, SuperNode
from edgecl.daemon.unixsocket import SocketSource
from edgecl.web import HTTPServer

log = logging.getLogger("edgecl.learn")


@dataclass(frozen=True)
class Listeners:
    """Where samples come in: HTTP always, a unix socket and an MQTT broker if named."""

    host: str = "127.0.0.1"
    port: int = 8765  # 0: any free port
    token: str | None = None  # the bearer token every endpoint but the probes needs
    tls: tuple[Path, Path] | None = None  # (certificate, key) to serve HTTPS with
    socket: Path | None = None
    mqtt: str | None = None  # mqtt://host:port
    name: str = ""  # the device's name in MQTT topics
    mqtt_password: str | None = None  # of the MQTT URL's user
    mqtt_ca: Path | None = None  # the CA to verify an mqtts:// broker with
    fleet: FleetLink | None = None  # the fleet's SuperLink to join (learn --fleet)


class LearnService:
    """A daemon behind its listeners. `start()`/`stop()` for embedding (tests, benchmarks);
    `run()` for a process: until SIGTERM/SIGINT or the learning thread's end."""

    def __init__(self, daemon: Daemon, listeners: Listeners,
                 http: HTTPServer | None = None) -> None:
        """Bind every listener (the HTTP one unless `http` is bound already, for `daemon`'s
        app); on failure (ListenError, OSError, ValueError) the daemon is stopped and the
        error raised."""
        self.daemon = daemon
        self.listeners = listeners
        self.sources: list[Any] = []
        try:
            self.http = http or HTTPServer(IngestApp(daemon, listeners.token), listeners.host,
                                           listeners.port, listeners.tls)
            if listeners.socket:  # after the state dir's lock: a stale socket file is ours
                self.sources.append(SocketSource(daemon, listeners.socket))
            if listeners.mqtt:
                from edgecl.daemon.mqtt import MqttSource  # paho loads only when asked for

                self.sources.append(MqttSource(daemon, listeners.mqtt, listeners.name,
                                                listeners.mqtt_password, listeners.mqtt_ca))
        except BaseException:
            self.daemon.stop()
            raise
        self.supernode: SuperNode | None = None
        self._serving = threading.Thread(target=self.http.serve, name="edgecl-http")
        self.stop_requested = threading.Event()

    @classmethod
    def open(cls, cfg: Config, state_dir: Path, repo: Path | None,
             listeners: Listeners) -> LearnService:
        """The daemon of `state_dir` (restored, not yet learning) behind `listeners`; raises
        ConfigError or DaemonError for the config and state dir, ListenError, OSError or
        ValueError for a listener. The port is bound first: a daemon that cannot listen
        leaves no trace in the state dir."""
        app = _LateApp()
        http = HTTPServer(app, listeners.host, listeners.port, listeners.tls)
        try:
            daemon = Daemon(cfg, state_dir, repo)
        except OSError as e:
            http.socket.close()
            raise DaemonError(f"{state_dir}: cannot use the state dir ({e.strerror or e})"
                              ) from None
        except BaseException:
            http.socket.close()
            raise
        app.app = IngestApp(daemon, listeners.token)
        refused = federation_refused(daemon.learning.learner) if listeners.fleet else None
        if refused:
            http.socket.close()
            daemon.stop()
            raise DaemonError(f"--fleet: {refused}")
        return cls(daemon, listeners, http)

    @property
    def url(self) -> str:
        return self.http.url

    def start(self, learn: bool = True) -> None:
        """Learn (unless `learn` is False: ingest only) and take samples from every source."""
        if learn:
            self.daemon.start()
        for source in self.sources:
            source.start()
        self._serving.start()
        if self.listeners.fleet:
            self.supernode = SuperNode(self.listeners.fleet, self.url, self.listeners.token,
                                       self.daemon.state_dir)
            self.daemon.fleet_node = self.supernode.status
            self.supernode.start()
        log.info("listening on %s (%s), state %s, method %s", self.url,
                 "bearer token" if self.listeners.token else "no token",
                 self.daemon.state_dir, self.daemon.cfg.method.name)

    def stop(self) -> None:
        """Leave the fleet, finish the requests in flight, stop the sources, then the daemon
        (it checkpoints)."""
        if self.supernode is not None:
            self.supernode.stop()
        self.http.shutdown()
        if self._serving.is_alive():
            self._serving.join()
        for source in self.sources:
            source.stop()
        self.daemon.stop()

    def run(self) -> bool:
        """Serve until SIGTERM/SIGINT (True) or until the learning or HTTP thread ends
        (False: the log says why), telling systemd READY once the journal is replayed."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_requested.set())
        self.start()
        systemd.supervise(self.stop_requested,
                          lambda: self._serving.is_alive() and self.daemon.alive,
                          lambda: self.daemon.ready)
        systemd.notify("STOPPING=1")
        self.stop()
        return self.stop_requested.is_set()


class _LateApp:
    """The HTTP app, given once the daemon exists: the port is bound before the state dir is
    touched, and nothing is served before `start()`."""

    app: IngestApp

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
