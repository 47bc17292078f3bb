"""Start Flower's processes for edgecl: the fleet server's SuperLink and run, a device's SuperNode.

Flower ships them as console scripts of the `flwr` package; they are taken from the bin folder
of the running interpreter's venv (next to `sys.executable`), never from whatever PATH holds, so
the Flower that runs is the one whose edgecl.fleet apps it imports. That folder also goes first
on the children's PATH, because `flwr` and the SuperLink start `flower-superexec` by bare name.

Every child gets PR_SET_PDEATHSIG on Linux: a SuperLink or SuperNode must not outlive the
`edgecl` process that owns it, even when that one is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

APP_DIR = Path(__file__).parent / "app"
CONNECTION = "edgecl-fleet"
INSTALL_HINT = "pip install -e '.[fleet]'"


class FleetError(RuntimeError):
    """Fleet learning cannot start; the message says what to do about it."""


@dataclass
class FleetSettings:
    """What `edgecl fleet` needs to run a fleet server; paths may be relative to the cwd."""

    state_dir: Path  # FLWR_HOME: the `flwr` connection, SuperLink log, run config
    host: str = "127.0.0.1"  # where the SuperLink listens; "0.0.0.0" for devices elsewhere
    port: int = 9092  # one port for Flower's Fleet, Control and Runtime APIs
    num_rounds: int = 3
    min_nodes: int = 2
    round_timeout: float = 60.0
    status_file: Path | None = None
    insecure: bool = False  # plain HTTP: only on a trusted network, or for a try on localhost
    ssl_certfile: Path | None = None  # the SuperLink's TLS certificate ...
    ssl_keyfile: Path | None = None  # ... its private key ...
    ssl_ca_certfile: Path | None = None  # ... and the CA that signed it
    root_certificates: Path | None = None  # CA the `flwr` CLI trusts; default ssl_ca_certfile
    startup_timeout: float = 30.0
    # how long the first round waits for min_nodes: devices reconnect to a new SuperLink with a
    # backoff of up to 20 s (Flower's), and many at once
    first_wait: float = 300.0


def flwr_executable(name: str) -> str:
    """The path of one of Flower's console scripts in this venv; FleetError if not installed."""
    path = Path(sys.executable).parent / name
    if importlib.util.find_spec("flwr") is None or not path.exists():
        raise FleetError(f"fleet learning needs Flower, which is not installed in "
                         f"{Path(sys.executable).parent.parent} ({name} is missing): "
                         f"{INSTALL_HINT}")
    return str(path)


def flwr_env(flwr_home: Path | None = None) -> dict[str, str]:
    """The environment additions every Flower child needs (merge them into os.environ)."""
    env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                    os.environ.get("PATH", os.defpath)]),
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           # SuperExec looks for work every 1 s by default; each round waits on it twice
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25"}
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).absolute())
    return env


def supernode_command(superlink: str, daemon_url: str, port: int, insecure: bool,
                      root_certificates: str | None) -> list[str]:
    """argv of a device's SuperNode: it registers with `superlink` (host:port) and runs
    edgecl's ClientApp against `daemon_url`; `port` is its local Runtime API, on 127.0.0.1."""
    if any(c in daemon_url for c in "\"' ") or not daemon_url.startswith(("http://", "https://")):
        raise FleetError(f"daemon URL {daemon_url!r} must be http(s)://host:port, "
                         "without quotes or spaces")
    argv = [flwr_executable("flower-supernode"), "--superlink", superlink,
            "--host", "127.0.0.1", "--port", str(port),
            "--node-config", f'daemon-url="{daemon_url}"']
    if insecure:
        argv.append("--insecure")
    elif root_certificates:
        argv += ["--root-certificates", str(root_certificates)]
    return argv


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn that has the kernel SIGTERM the child when its parent dies (Linux only).

    The kernel ties this to the THREAD that forked the child, not its process: start the child
    from a thread that lives as long as it (the main thread, a supervisor loop), or it is
    SIGTERMed the moment a short-lived spawning thread ends.
    """
    parent = os.getpid()
    # Looked up here, before the fork: dlopen in a forked child of a threaded parent may hang.
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def preexec() -> None:
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before prctl took hold
                os._exit(1)

    return preexec


def run_fleet(settings: FleetSettings) -> int:
    """Start a SuperLink, run edgecl's fleet app on it to the end, stop it; `flwr run`'s status.

    Devices may connect before or during the run: each round waits (bounded) for min_nodes.
    """
    _check_tls(settings)
    home = Path(settings.state_dir).absolute()
    home.mkdir(parents=True, exist_ok=True)
    env = os.environ | flwr_env(home)
    flwr = flwr_executable("flwr")
    connect = _connect_host(settings.host)
    _check_port_free(connect, settings.port)
    link = _start_superlink(settings, home, env)
    try:
        _wait_listening(link, connect, settings.port, settings.startup_timeout,
                        home / "superlink.log")
        write_connection(home, f"{connect}:{settings.port}", settings.insecure,
                         settings.root_certificates or settings.ssl_ca_certfile)
        run_config = write_run_config(home, settings)
        argv = [flwr, "run", str(APP_DIR), CONNECTION, "--run-config", str(run_config),
                "--stream"]
        run = subprocess.Popen(argv, env=env, cwd=home, preexec_fn=die_with_parent())
        try:
            rc = run.wait()
        finally:
            stop_process(run)
        return rc or run_outcome(flwr, env, home)
    finally:
        stop_process(link)


def run_outcome(flwr: str, env: dict[str, str], home: Path) -> int:
    """0 if every run on this (private) SuperLink completed, else 1, saying why on stderr.

    `flwr run --stream` exits 0 even when the ServerApp raised (Flower 1.42), so the run's own
    status, from `flwr ls`, decides what `edgecl fleet` exits with.
    """
    out = subprocess.run([flwr, "ls", CONNECTION, "--format", "json"], env=env, cwd=home,
                         capture_output=True, text=True, timeout=60, check=False)
    try:
        runs = json.loads(out.stdout)["runs"]
    except (ValueError, KeyError, TypeError):
        print(f"edgecl fleet: cannot read the run's status from `flwr ls`: "
              f"{(out.stdout + out.stderr).strip()[-500:]}", file=sys.stderr)
        return 1
    bad = [r for r in runs if not str(r.get("status", "")).endswith("completed")]
    for r in bad:
        print(f"edgecl fleet: run {r.get('run-id')} {r.get('status')}: "
              f"{r.get('status-details', '')}", file=sys.stderr)
    return 1 if bad or not runs else 0


def write_connection(home: Path, address: str, insecure: bool,
                     root_certificates: Path | None) -> Path:
    """FLWR_HOME/config.toml: the `flwr` CLI's one connection, named CONNECTION."""
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f"address = {_toml_str(address)}"]
    if insecure:
        lines.append("insecure = true")
    elif root_certificates:
        lines.append(f"root-certificates = {_toml_str(str(Path(root_certificates).absolute()))}")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_run_config(home: Path, s: FleetSettings) -> Path:
    """The run's settings as a TOML file for `flwr run --run-config` (no shell quoting games)."""
    status = str(Path(s.status_file).absolute()) if s.status_file else ""
    values = {"num-rounds": int(s.num_rounds), "min-nodes": int(s.min_nodes),
              "round-timeout": float(s.round_timeout), "first-wait": float(s.first_wait),
              "status-file": status}
    text = "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())
    path = home / "run-config.toml"
    path.write_text(text)
    return path


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a TOML basic string (same escapes)


def _toml_value(v: str | int | float) -> str:
    return _toml_str(v) if isinstance(v, str) else repr(v)


def _check_tls(s: FleetSettings) -> None:
    if not s.insecure and not (s.ssl_certfile and s.ssl_keyfile):
        raise FleetError("the fleet server needs TLS (its certificate and key, and the CA that "
                         "signed them) or an explicit choice of plain HTTP (insecure), only "
                         "for a trusted network")
    for p in (s.ssl_certfile, s.ssl_keyfile, s.ssl_ca_certfile, s.root_certificates):
        if p and not s.insecure and not Path(p).is_file():
            raise FleetError(f"TLS file {p} does not exist")


def _superlink_argv(s: FleetSettings) -> list[str]:
    argv = [flwr_executable("flower-superlink"), "--host", s.host, "--port", str(s.port),
            "--disable-runtime-dependency-installation"]
    if s.insecure:
        return [*argv, "--insecure"]
    for flag, p in (("--ssl-certfile", s.ssl_certfile), ("--ssl-keyfile", s.ssl_keyfile),
                    ("--ssl-ca-certfile", s.ssl_ca_certfile)):
        if p:
            argv += [flag, str(Path(p).absolute())]
    return argv


def _start_superlink(s: FleetSettings, home: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(home / "superlink.log", "ab") as log:
        return subprocess.Popen(_superlink_argv(s), env=env, cwd=home, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent())


def _connect_host(host: str) -> str:
    """Where a local client reaches a server listening on `host` (a wildcard → loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _accepts(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host.strip("[]"), port), 1.0):
        return True
    return False


def _check_port_free(host: str, port: int) -> None:
    if _accepts(host, port):
        raise FleetError(f"port {port} is taken: something already listens on {host}:{port} "
                         "(another fleet server?); stop it or choose another port")


def _wait_listening(proc: subprocess.Popen, host: str, port: int, timeout: float,
                    log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not _accepts(host, port):
        if proc.poll() is not None:
            raise FleetError(f"flower-superlink exited ({proc.returncode}) before listening on "
                             f"port {port}; its log, {log}, ends:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise FleetError(f"flower-superlink did not listen on {host}:{port} within "
                             f"{timeout:g} s; see {log}")
        time.sleep(0.1)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, and SIGKILL if it is still there after `grace` s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
