"""A seeded SIGKILL campaign against `edgecl learn` fed over MQTT, HTTP and the unix socket at once.

    apt-get install -y mosquitto
    .venv/bin/python benchmarks/kill_campaign.py [--kills 50] [--seed 0] [--out result.json]
        [--min-s 0.2] [--max-s 3] [--startup-share 0.2] [--interval-s 0.05] [--max-batch 16]
        [--keep]

Starts a private mosquitto broker (its config, printed at start, keeps every queued QoS 1
message: `max_queued_messages 0`, `max_queued_bytes 0`, an inflight window above the daemon's
Receive Maximum; no persistence: the broker is never killed), then a real `edgecl learn`
subprocess (a tiny fine-tuning MLP on [2, 3] inputs, `--device cpu --threads 1`) with HTTP, a
unix socket and MQTT (`--mqtt ... --name NAME`) on one --state-dir. Its config checkpoints often
(every 200 samples or second) and keeps every checkpoint (`keep_checkpoints` huge), so the
journal is never truncated: at the end it holds every sample ever journaled. Before the first
start the daemon's MQTT session (client `edgecl-learn-NAME`, clean start off, no expiry,
subscribed to `edgecl/NAME/samples` at QoS 1) is created, so nothing published before the
daemon first subscribes is dropped by the broker.

Three feeder threads, one per transport, each with its own two tasks (`mqtt-a`, `mqtt-b`, ...),
send requests of 1..--max-batch samples every ~--interval-s, each request with a unique request
id, in every form that carries one: HTTP binary (id in the header), JSON batch (`request_id`)
and JSON batch with an `Idempotency-Key` header; socket JSON batch lines; MQTT JSON batch and
binary (MQTT 5 content type). HTTP and socket requests are sent again, same bytes and id, until
acknowledged (202 / an answer line with `first_seq`); connection errors, 429, 503 and 507 are
retried. MQTT publishes at QoS 1: a publish the broker acknowledged (PUBACK) counts as
acknowledged, whether the daemon is up or not.

Every sample is identifiable: its input encodes the feeder (x[0] = code / 4) and the sample's
number within the feeder in base-256 digits (x[1..3] = digit / 256: exact in float32), x[4..5]
and the label (number % 3) follow from the number. So a journal row decodes to sample ids, and
any row that does not re-encode exactly (or whose task is not its feeder's) counts as mangled.

Kills: the daemon is SIGKILLed --kills times and restarted on the same state dir each time
(same port, socket and MQTT name, so the broker's persistent session delivers what was
published meanwhile). Each kill lands at a seeded time: with probability --startup-share
during start-up (a share of the previous start's time to ready: imports, restore, replay),
otherwise --min-s..--max-s after /readyz says ready (ingest, learning steps, checkpoints,
catching up with the MQTT backlog). One progress line per kill.

At the end: one more start, feeders stop (each finishes its request in hand; the MQTT feeder
waits for its PUBACKs), the daemon is given time until, for every task, the journal holds at
least what was acknowledged, the journal lag is 0 and nothing arrives for 2 s; /v1/status is
read, then SIGTERM (clean stop, exit 0 expected). Then `STATE/journal.sqlite3` (table `chunks`)
is read directly and every sample id counted:
- lost: acknowledged, not in the journal;
- duplicated: journaled more than once (ids; `duplicate_rows` in the JSON: their extra copies);
- unacknowledged: journaled but never acknowledged (expected 0: every request ends acknowledged);
- learned: the daemon's final `learned` equals the journal's sample count (every journaled
  sample consumed once: restore + replay neither skipped nor repeated any);
- the daemon's own `lost` counter (records truncated that no checkpoint held).
Also per transport: resends (a request sent again: the daemon down, killed, or 429), cut off
(the connection broke once the request was out, so the daemon may have journaled it) and dup
answers (a resend answered `"duplicate": true`: the journal held it already, the exactly-once
path). Exit 1 if anything is lost or duplicated (or mangled, or `learned` differs, or the daemon's
`lost` is not 0); exit 2 if the campaign itself could not run. The machine's load average is
recorded at each kill. Processes are killed in `finally`; --keep keeps the temp dir (state dir,
daemon and broker logs) for a look after a failure. 50 kills take about 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import yaml
from learn_daemon import ENV, ROOT, die_with_parent, table
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

BINARY = "application/vnd.edgecl.samples"
CLASSES = ["walk", "run", "sit"]
SHAPE = (2, 3)
SAMPLE = 0  # the journal's `kind` of a sample row (edgecl.daemon.journal.SAMPLE)
TRANSPORTS = ("mqtt", "http", "socket")
CODES = {name: i + 1 for i, name in enumerate(TRANSPORTS)}  # x[0] = code / 4
ID_BITS = 24  # sample numbers per feeder: 3 base-256 digits
RETRY_S = 0.05  # between sends of a request the daemon did not answer
RETRY_STATUSES = (429, 503, 507)  # "send it again later": nothing of it was accepted
DEVICE = "campaign"  # the daemon's MQTT name
SESSION_EXPIRY_S = 0xFFFFFFFF
QUIET_S = 2.0  # at the end: nothing new journaled for this long


class CampaignError(RuntimeError):
    """The campaign could not run (a daemon that would not start, a refused request...)."""


class Abandoned(Exception):
    """A feeder was told to stop at once, its request in hand unacknowledged."""


# --- samples -------------------------------------------------------------------------------
def encode(code: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs [n, *SHAPE] float32 and labels [n] that name (feeder code, sample number)."""
    y = ids % len(CLASSES)
    x = np.zeros((len(ids), 6), dtype=np.float32)
    x[:, 0] = code / 4
    for i, shift in enumerate((16, 8, 0)):
        x[:, 1 + i] = (ids >> shift & 255) / 256
    x[:, 4], x[:, 5] = y == 1, y == 2
    return x.reshape(-1, *SHAPE), y.astype(np.int64)


def decode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feeder codes and sample numbers of journaled inputs [n, 6]."""
    codes = np.rint(x[:, 0] * 4).astype(np.int64)
    digits = np.rint(x[:, 1:4] * 256).astype(np.int64)
    return codes, digits[:, 0] << 16 | digits[:, 1] << 8 | digits[:, 2]


def sample_keys(codes: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """One integer per sample, unique across feeders."""
    return codes << ID_BITS | ids


@dataclass
class Request:
    request_id: str
    task: str
    first: int  # the first sample's number within its feeder
    x: np.ndarray
    y: np.ndarray
    form: str = ""
    sender: dict[str, Any] = field(default_factory=dict)  # {"sender", "sender_seq"}, if numbered

    @property
    def count(self) -> int:
        return len(self.y)

    def records(self, rng: random.Random) -> list[dict[str, Any]]:
        """JSON samples, each label an index or a class name."""
        return [{"task": self.task, "x": xi.ravel().tolist(),
                 "y": CLASSES[yi] if rng.random() < 0.5 else int(yi)}
                for xi, yi in zip(self.x, self.y, strict=True)]

    def json_batch(self, rng: random.Random, with_id: bool = True) -> bytes:
        batch: dict[str, Any] = {"samples": self.records(rng), **self.sender}
        if with_id:
            batch["request_id"] = self.request_id
        return orjson.dumps(batch)

    def binary(self) -> bytes:
        header = {"task": self.task, "y": self.y.tolist(), "dtype": "float32",
                  "request_id": self.request_id, **self.sender}
        return orjson.dumps(header) + b"\n" + np.ascontiguousarray(self.x, "<f4").tobytes()


# --- feeders -------------------------------------------------------------------------------
class Feeder(threading.Thread):
    """Sends requests of fresh samples on one transport until told to stop; `deliver` makes
    sure each ends acknowledged."""

    transport = ""

    def __init__(self, seed: int, interval_s: float, max_batch: int) -> None:
        super().__init__(name=f"feeder-{self.transport}", daemon=True)
        self.code = CODES[self.transport]
        self.seed = seed
        self.rng = random.Random(seed * 1000 + self.code)
        self.tasks = (f"{self.transport}-a", f"{self.transport}-b")
        self.interval_s, self.max_batch = interval_s, max_batch
        self.stopping = threading.Event()  # finish the request in hand, then end
        self.aborting = threading.Event()  # end now
        self.error: str | None = None
        self.next_id = 0
        self.sent_requests = 0
        self.acked: list[Request] = []
        self.acked_samples = 0
        self.resends = 0  # sends of a request after the first (daemon down, killed, 429)
        self.cut_off = 0  # sends whose connection broke once the request was out: the daemon
        # may have journaled it; the resend must be answered "duplicate" then
        self.duplicate_answers = 0  # answers "duplicate": a resend the journal held already
        self.anomalies: list[str] = []  # answers that do not fit the request

    def run(self) -> None:
        try:
            while not self.stopping.is_set() and not self.aborting.is_set():
                self.deliver(self.make_request())
                self.aborting.wait(self.rng.uniform(0, 2 * self.interval_s))
            self.finish()
        except Abandoned:
            pass
        except Exception as e:  # reported by the campaign, which stops
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.close()

    def make_request(self) -> Request:
        n = self.rng.randint(1, self.max_batch)
        if self.next_id + n >= 1 << ID_BITS:
            raise CampaignError(f"{self.transport}: sample numbers exhausted")
        x, y = encode(self.code, np.arange(self.next_id, self.next_id + n, dtype=np.int64))
        task = self.tasks[self.sent_requests // 8 % 2]  # switch task every 8 requests
        request = Request(f"{self.transport}-{self.seed}-{self.sent_requests}", task,
                          self.next_id, x, y)
        self.next_id += n
        self.sent_requests += 1
        return request

    def acknowledge(self, request: Request, answer: dict[str, Any] | None = None) -> None:
        if answer is not None:
            self.duplicate_answers += bool(answer.get("duplicate"))
            if answer.get("count") != request.count:
                self.anomalies.append(f"{request.request_id}: {request.count} samples, answer "
                                      f"{answer}")
        self.acked.append(request)
        self.acked_samples += request.count

    def deliver(self, request: Request) -> None:
        """Send the request until an answer acknowledges it."""
        payload = self.encode(request)
        while True:
            if self.aborting.is_set():
                raise Abandoned
            status, answer, retry_s = self.exchange(payload)
            if status == 202:
                self.acknowledge(request, answer)
                return
            if status is not None and status not in RETRY_STATUSES:
                raise CampaignError(f"{self.transport} request {request.request_id} refused: "
                                    f"{status} {answer}")
            self.resends += 1
            self.aborting.wait(retry_s)

    def encode(self, request: Request) -> Any:
        raise NotImplementedError

    def exchange(self, payload: Any) -> tuple[int | None, dict[str, Any], float]:
        """One send: (status, answer, seconds to wait before sending again); status None when
        the connection failed (the request may or may not have been journaled)."""
        raise NotImplementedError

    def finish(self) -> None:
        """After the last request (the MQTT feeder waits for its PUBACKs)."""

    def close(self) -> None:
        """Release the connection."""


class HttpFeeder(Feeder):
    transport = "http"
    forms = ("binary", "json", "idempotency-key")

    def __init__(self, port: int, *args: Any) -> None:
        super().__init__(*args)
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def encode(self, request: Request) -> tuple[bytes, dict[str, str]]:
        request.form = self.rng.choice(self.forms)
        if request.form == "binary":
            return request.binary(), {"Content-Type": BINARY}
        headers = {"Content-Type": "application/json"}
        if request.form == "idempotency-key":
            headers["Idempotency-Key"] = request.request_id
        return request.json_batch(self.rng, with_id=request.form == "json"), headers

    def exchange(self, payload: tuple[bytes, dict[str, str]]
                 ) -> tuple[int | None, dict[str, Any], float]:
        body, headers = payload
        try:
            if self.conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.connect()
                self.conn = conn
        except OSError:  # the daemon is down (or not listening yet)
            return None, {}, RETRY_S
        try:
            self.conn.request("POST", "/v1/samples", body, headers)
            response = self.conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException):
            self.cut_off += 1
            self.close()
            return None, {}, RETRY_S
        retry_s = min(0.5, float(response.getheader("Retry-After") or RETRY_S))
        return response.status, _json_or_text(raw), retry_s

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class SocketFeeder(Feeder):
    transport = "socket"

    def __init__(self, path: Path, *args: Any) -> None:
        super().__init__(*args)
        self.path = path
        self.sock: socket.socket | None = None
        self.lines: Any = None

    def encode(self, request: Request) -> bytes:
        request.form = "json"
        return request.json_batch(self.rng) + b"\n"

    def exchange(self, payload: bytes) -> tuple[int | None, dict[str, Any], float]:
        try:
            if self.sock is None:
                self.connect()
        except OSError:  # the daemon is down (or not listening yet)
            self.close()
            return None, {}, RETRY_S
        try:
            self.sock.sendall(payload)
            line = self.lines.readline()
        except OSError:
            line = b""
        if not line.endswith(b"\n"):  # closed (the daemon died) before or mid-answer
            self.cut_off += 1
            self.close()
            return None, {}, RETRY_S
        answer = _json_or_text(line)
        if "first_seq" in answer:
            return 202, answer, 0.0
        if answer.get("status") == 408:  # closed for idling: connect again
            self.close()
            return None, answer, 0.0
        return answer.get("status"), answer, min(0.5, answer.get("retry_after") or RETRY_S)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(self.path))
        self.lines = self.sock.makefile("rb")

    def close(self) -> None:
        for closable in (self.lines, self.sock):
            if closable is not None:
                with contextlib.suppress(OSError):
                    closable.close()
        self.sock = self.lines = None


class MqttFeeder(Feeder):
    """Publishes at QoS 1; a request is acknowledged once the broker PUBACKs it."""

    transport = "mqtt"
    forms = ("json", "binary")

    def __init__(self, broker_port: int, *args: Any) -> None:
        super().__init__(*args)
        self.topic = f"edgecl/{DEVICE}/samples"
        self.pending: deque[tuple[mqtt.MQTTMessageInfo, Request]] = deque()
        self.published = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"kill-campaign-feeder-{self.seed}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(100)
        self.client.connect("127.0.0.1", broker_port)
        self.client.loop_start()

    def deliver(self, request: Request) -> None:
        request.form = self.rng.choice(self.forms)
        self.published += 1  # numbered: a message the broker dropped is counted missing
        request.sender = {"sender": f"kill-campaign-{self.seed}", "sender_seq": self.published}
        properties = None
        if request.form == "binary":
            properties = Properties(PacketTypes.PUBLISH)
            properties.ContentType = BINARY
            payload = request.binary()
        else:
            payload = request.json_batch(self.rng)
        info = self.client.publish(self.topic, payload, qos=1, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise CampaignError(f"publish {request.request_id}: {mqtt.error_string(info.rc)}")
        self.pending.append((info, request))
        self.settle()

    def settle(self) -> None:
        """Count the publishes the broker acknowledged (in order)."""
        while self.pending and self.pending[0][0].is_published():
            self.acknowledge(self.pending.popleft()[1])

    def finish(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline and not self.aborting.is_set():
            self.pending[0][0].wait_for_publish(max(0.0, deadline - time.monotonic()))
            self.settle()

    def close(self) -> None:
        self.settle()
        self.client.disconnect()
        self.client.loop_stop()


def _json_or_text(raw: bytes) -> dict[str, Any]:
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"text": raw[:300].decode("utf-8", "replace")}
    return answer if isinstance(answer, dict) else {"answer": answer}


# --- the broker ----------------------------------------------------------------------------
def broker_config(port: int) -> str:
    return (f"listener {port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"  # the broker is never killed
            "max_queued_messages 0\n"  # no limit on a session's queue (stock: 1000, then drop)
            "max_queued_bytes 0\n"  # nor on its bytes
            "max_inflight_messages 1000\n"  # above the daemon's Receive Maximum (64)
            "log_dest stderr\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise CampaignError(f"mosquitto exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise CampaignError("mosquitto did not open its port") from None
            time.sleep(0.05)


@contextlib.contextmanager
def mosquitto(binary: str, folder: Path) -> Iterator[tuple[int, str]]:
    """A private broker on a free loopback port; yields (port, its config)."""
    port = free_port()
    config = broker_config(port)
    (folder / "mosquitto.conf").write_text(config)
    with (folder / "mosquitto.log").open("wb") as log:
        proc = subprocess.Popen([binary, "-c", str(folder / "mosquitto.conf")], stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        wait_port(port, proc)
        yield port, config
    finally:
        proc.kill()
        proc.wait(10)


def create_session(port: int, timeout_s: float = 10.0) -> None:
    """The daemon's persistent MQTT session (`edgecl.daemon.mqtt`'s client id, clean start off,
    no expiry), subscribed at QoS 1 before the daemon first runs: what is published before the
    daemon first subscribes is queued, not dropped."""
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgecl-learn-{DEVICE}",
                         protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, *_: c.subscribe(f"edgecl/{DEVICE}/samples", qos=1)
    client.on_subscribe = lambda *_: subscribed.set()
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = SESSION_EXPIRY_S
    client.connect("127.0.0.1", port, clean_start=False, properties=properties)
    client.loop_start()
    try:
        if not subscribed.wait(timeout_s):
            raise CampaignError("could not create the daemon's MQTT session")
    finally:
        client.disconnect()
        client.loop_stop()


# --- the daemon ----------------------------------------------------------------------------
def write_config(folder: Path, args: argparse.Namespace) -> Path:
    config = {
        "seed": args.seed, "device": "cpu", "normalize": "none",
        "net": {"name": "mlp", "hidden": [16]}, "optimizer": {"name": "sgd", "lr": 0.1},
        "memory": {"per_task": 8}, "method": {"name": "finetune"},
        "stream": {"input_shape": list(SHAPE), "classes": CLASSES, "head": "shared",
                   "max_tasks": 2 * len(TRANSPORTS), "batch_size": 4},
        # checkpoints often, every one kept: the journal is never truncated
        "learn": {"holdout": 0.1, "checkpoint_every": args.checkpoint_every,
                  "checkpoint_seconds": 1.0, "keep_checkpoints": 10**9, "flush_idle_s": 0.3}}
    path = folder / "learner.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class DaemonProcess:
    """`edgecl learn` on one state dir, port, socket and MQTT name; started again after kills."""

    def __init__(self, args: argparse.Namespace, folder: Path, config: Path, broker_port: int
                 ) -> None:
        self.args = args
        self.folder = folder
        self.port = free_port()
        self.socket_path = folder / "learn.sock"
        self.state_dir = folder / "state"
        self.command = [args.edgecl, "learn", "--config", str(config), "--state-dir",
                        str(self.state_dir), "--port", str(self.port), "--socket",
                        str(self.socket_path), "--mqtt", f"mqtt://127.0.0.1:{broker_port}",
                        "--name", DEVICE, "--device", "cpu", "--threads", "1"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.started_at = 0.0
        self.log_path = folder / "learn-000.log"

    def start(self) -> None:
        self.log_path = self.folder / f"learn-{self.starts:03d}.log"
        self.starts += 1
        with self.log_path.open("wb") as log:
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=ENV,
                                         preexec_fn=die_with_parent)

    def get(self, path: str, timeout_s: float = 5.0) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, _json_or_text(response.read())
        finally:
            conn.close()

    def status(self) -> dict[str, Any] | None:
        """/v1/status, or None when the daemon does not answer it (yet)."""
        try:
            code, body = self.get("/v1/status", 2.0)
        except (OSError, http.client.HTTPException):
            return None
        return body if code == 200 else None

    def wait_ready(self) -> float:
        """Seconds from the start until /readyz says ready."""
        deadline = self.started_at + self.args.timeout_s
        while True:
            self.check_running()
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.get("/readyz", 2.0)[0] == 200:
                    return time.monotonic() - self.started_at
            if time.monotonic() > deadline:
                raise CampaignError(f"not ready {self.args.timeout_s:g} s after its start:\n"
                                    f"{self.log_tail()}")
            time.sleep(0.02)

    def check_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise CampaignError(f"edgecl learn exited by itself ({code}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> int | None:
        """SIGTERM (checkpoint, exit 0); the exit code, or None if it had to be killed."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def error_lines(self) -> int:
        """Error-level log lines over every start."""
        return sum(log.read_bytes().count(b'"level": "error"')
                   for log in self.folder.glob("learn-*.log"))


# --- the campaign --------------------------------------------------------------------------
@dataclass
class Campaign:
    args: argparse.Namespace
    daemon: DaemonProcess
    feeders: list[Feeder]
    rng: random.Random
    t0: float = field(default_factory=time.monotonic)
    kills: list[dict[str, Any]] = field(default_factory=list)
    ready_s: list[float] = field(default_factory=list)

    def check_feeders(self) -> None:
        for feeder in self.feeders:
            if feeder.error is not None:
                raise CampaignError(f"{feeder.transport} feeder: {feeder.error}")

    def acked(self) -> dict[str, int]:
        return {f.transport: f.acked_samples for f in self.feeders}

    def one_kill(self, number: int) -> None:
        """Kill the running daemon at a seeded point, start it again, print a line."""
        startup = bool(self.ready_s) and self.rng.random() < self.args.startup_share
        if startup:  # a share of the last start's time to ready: imports, restore, replay
            delay = self.rng.uniform(0.05, 1.0) * self.ready_s[-1]
            self.sleep_until(self.daemon.started_at + delay)
            at = f"{delay:5.2f} s after start"
        else:
            self.ready_s.append(self.daemon.wait_ready())
            delay = self.rng.uniform(self.args.min_s, self.args.max_s)
            self.sleep_until(time.monotonic() + delay)
            at = f"{delay:5.2f} s after ready"
        before = self.daemon.status() or {}
        self.daemon.kill()
        self.daemon.start()
        self.check_feeders()
        self.record(number, "startup" if startup else "running", delay, before)
        self.progress(number, at, before)

    def progress(self, number: int, at: str, before: dict[str, Any]) -> None:
        acked = ", ".join(f"{k} {v:,}" for k, v in self.acked().items())
        lag = before.get("journal", {}).get("lag")
        print(f"[{time.monotonic() - self.t0:6.1f} s] kill {number:3d}/{self.args.kills} "
              f"{at} (status then: lag {_n(lag)}, learned {_n(before.get('learned'))}); "
              f"acked {acked}; load {os.getloadavg()[0]:.2f}", flush=True)

    def sleep_until(self, when: float) -> None:
        while (left := when - time.monotonic()) > 0:
            self.check_feeders()
            time.sleep(min(left, 0.2))

    def record(self, number: int, phase: str, delay: float, before: dict[str, Any]) -> None:
        journal = before.get("journal", {})
        self.kills.append({
            "kill": number, "phase": phase, "delay_s": round(delay, 3),
            "t_s": round(time.monotonic() - self.t0, 2), "ready": before.get("ready"),
            "lag": journal.get("lag"), "learned": before.get("learned"),
            "accepted": before.get("accepted"),
            "last_checkpoint_offset": (before.get("last_checkpoint") or {}).get("offset"),
            "acked": self.acked(), "load_1m": round(os.getloadavg()[0], 2)})

    def stop_feeders(self) -> None:
        for feeder in self.feeders:
            feeder.stopping.set()
        for feeder in self.feeders:
            feeder.join(self.args.timeout_s)
            if feeder.is_alive():
                raise CampaignError(f"{feeder.transport} feeder did not finish")
        self.check_feeders()

    def drain(self) -> dict[str, Any]:
        """Until every task's acknowledged samples are journaled, all is learned and nothing
        arrives for QUIET_S (or --timeout-s); the final status."""
        acked = task_counts(self.feeders)
        deadline = time.monotonic() + self.args.timeout_s
        last, since, have = None, time.monotonic(), {}
        while True:
            self.daemon.check_running()
            s = self.daemon.status()
            if s is not None:
                if s["accepted"] != last:
                    last, since = s["accepted"], time.monotonic()
                have = {t: v["accepted"] for t, v in s["tasks"].items()}
                complete = all(have.get(t, 0) >= n for t, n in acked.items())
                settled = s["ready"] and s["journal"]["lag"] == 0
                if complete and settled and time.monotonic() - since >= QUIET_S:
                    return s
            if time.monotonic() > deadline:
                if s is None:
                    raise CampaignError("the final daemon does not answer /v1/status")
                print(f"drain: gave up after {self.args.timeout_s:g} s (journal has {have}, "
                      f"acknowledged {acked})", flush=True)
                return s
            time.sleep(0.2)


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def task_counts(feeders: list[Feeder]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for feeder in feeders:
        for request in feeder.acked:
            counts[request.task] = counts.get(request.task, 0) + request.count
    return counts


# --- the count -----------------------------------------------------------------------------
@dataclass
class JournalCount:
    keys: np.ndarray  # every journaled sample's key, duplicates included
    rows: int  # sample rows (chunks)
    mangled: int  # samples whose input, label or task do not match their id
    first_seq: int | None
    contiguous: bool  # seqs 1..last without gaps: nothing truncated


def read_journal(path: Path) -> JournalCount:
    """Every sample in the journal's `chunks`, decoded to its key."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute("SELECT seq, count, kind, task, y, x FROM chunks ORDER BY seq").fetchall()
    finally:
        db.close()
    keys, mangled, samples, expected_seq = [], 0, 0, rows[0][0] if rows else None
    contiguous = expected_seq in (None, 1)
    for seq, count, kind, task, y, x in rows:
        contiguous = contiguous and seq == expected_seq
        expected_seq = seq + count
        if kind != SAMPLE:
            continue
        samples += 1
        xs = np.frombuffer(x, dtype="<f4").reshape(count, -1)
        codes, ids = decode(xs)
        keys.append(sample_keys(codes, ids))
        mangled += count_mangled(task, np.frombuffer(y, dtype="<i8"), xs, codes, ids)
    return JournalCount(np.concatenate(keys) if keys else np.zeros(0, np.int64), samples,
                        mangled, rows[0][0] if rows else None, contiguous)


def count_mangled(task: str, y: np.ndarray, x: np.ndarray, codes: np.ndarray,
                  ids: np.ndarray) -> int:
    """Samples of a row that do not re-encode exactly from their id, or in another's task."""
    if len(set(codes.tolist())) != 1 or codes[0] not in CODES.values():
        return len(y)
    transport = TRANSPORTS[int(codes[0]) - 1]
    ex, ey = encode(int(codes[0]), ids)
    bad = (ex.reshape(len(y), -1) != x).any(axis=1) | (ey != y)
    return len(y) if not task.startswith(f"{transport}-") else int(bad.sum())


def acked_keys(feeder: Feeder) -> np.ndarray:
    if not feeder.acked:
        return np.zeros(0, np.int64)
    ids = np.concatenate([np.arange(r.first, r.first + r.count) for r in feeder.acked])
    return sample_keys(np.full(len(ids), feeder.code, dtype=np.int64), ids)


def requests_of(feeder: Feeder, keys: np.ndarray, limit: int = 10) -> list[str]:
    """The acknowledged requests (id, form) holding any of `keys`, up to `limit`."""
    ids = set((keys & ((1 << ID_BITS) - 1)).tolist())
    found = [f"{r.request_id} ({r.form}, {r.task})" for r in feeder.acked
             if ids.intersection(range(r.first, r.first + r.count))]
    return found[:limit]


def count(feeders: list[Feeder], journal: JournalCount) -> dict[str, Any]:
    """Per transport: acknowledged, journaled, lost, duplicated, unacknowledged."""
    unique, copies = np.unique(journal.keys, return_counts=True)
    per: dict[str, Any] = {}
    for feeder in feeders:
        mine = (unique >> ID_BITS) == feeder.code
        acked = acked_keys(feeder)
        lost = np.setdiff1d(acked, unique[mine])
        duplicated = unique[mine & (copies > 1)]
        per[feeder.transport] = {
            "requests_acked": len(feeder.acked), "acked": len(acked),
            "journaled": int(copies[mine].sum()), "journaled_unique": int(mine.sum()),
            "lost": len(lost), "duplicated": len(duplicated),
            "duplicate_rows": int((copies[mine] - 1).sum()),
            "unacknowledged": len(np.setdiff1d(unique[mine], acked)),
            "resends": feeder.resends, "cut_off": feeder.cut_off,
            "duplicate_answers": feeder.duplicate_answers,
            "anomalies": feeder.anomalies[:10],
            "lost_requests": requests_of(feeder, lost), "duplicated_requests":
                requests_of(feeder, duplicated)}
    foreign = ~np.isin(unique >> ID_BITS, list(CODES.values()))
    return {"transports": per, "foreign": int(copies[foreign].sum())}


def verdict(result: dict[str, Any]) -> list[str]:
    """What went wrong, if anything: each a line."""
    t, problems = result["totals"], []
    for key in ("lost", "duplicated", "mangled", "foreign", "anomalies"):
        if t[key]:
            problems.append(f"{key}: {t[key]:,}")
    if t["daemon_lost"]:
        problems.append(f"the daemon's lost counter: {t['daemon_lost']:,}")
    if t["daemon_missing"]:
        problems.append(f"numbered MQTT messages missing: {t['daemon_missing']:,}")
    if t["learned"] != t["journal_samples"]:
        problems.append(f"learned {t['learned']:,} != {t['journal_samples']:,} journaled")
    if not result["journal"]["contiguous"]:
        problems.append("the journal has gaps or was truncated: the count is incomplete")
    if result["exit_code_at_sigterm"] != 0:
        problems.append(f"the final SIGTERM exited {result['exit_code_at_sigterm']}")
    return problems


def summarize(campaign: Campaign, final: dict[str, Any], exit_code: int | None,
              journal: JournalCount) -> dict[str, Any]:
    counted = count(campaign.feeders, journal)
    per = counted["transports"]
    totals = {k: sum(p[k] for p in per.values()) for k in
              ("acked", "journaled", "journaled_unique", "lost", "duplicated", "duplicate_rows",
               "unacknowledged", "resends", "cut_off", "duplicate_answers")}
    totals.update(mangled=journal.mangled, foreign=counted["foreign"],
                  anomalies=sum(len(f.anomalies) for f in campaign.feeders),
                  journal_samples=len(journal.keys), learned=final["learned"],
                  accepted=final["accepted"], daemon_lost=final["lost"],
                  daemon_missing=final["missing"])
    loads = [k["load_1m"] for k in campaign.kills]
    result = {
        "kills": len(campaign.kills), "seed": campaign.args.seed,
        "seconds": round(time.monotonic() - campaign.t0, 1), "cpus": os.cpu_count(),
        "load_1m": {"mean": round(float(np.mean(loads)), 2) if loads else None,
                    "max": round(max(loads, default=0.0), 2),
                    "end": round(os.getloadavg()[0], 2)},
        "ready_s": {"mean": round(float(np.mean(campaign.ready_s)), 2),
                    "max": round(max(campaign.ready_s), 2)},
        "starts": campaign.daemon.starts, "exit_code_at_sigterm": exit_code,
        "daemon_error_log_lines": campaign.daemon.error_lines(),
        "journal": {"sample_rows": journal.rows, "first_seq": journal.first_seq,
                    "contiguous": journal.contiguous},
        "final_status": {k: final.get(k) for k in
                         ("accepted", "learned", "trained", "rejected", "lost", "missing",
                          "ingest_events", "corrupt_checkpoints", "checkpoint_failures")},
        "transports": per, "totals": totals, "kill_log": campaign.kills}
    result["problems"] = verdict(result)
    return result


def report(result: dict[str, Any]) -> str:
    per, t = result["transports"], result["totals"]
    columns = ("requests_acked", "acked", "journaled", "lost", "duplicated", "unacknowledged",
               "resends", "cut_off", "duplicate_answers")
    rows = [[name, *(p[c] for c in columns)] for name, p in per.items()]
    rows.append(["total", sum(p["requests_acked"] for p in per.values()),
                 *(t[c] for c in columns[1:])])
    lines = [table(f"SIGKILL campaign: {result['kills']} kills, seed {result['seed']}, "
                   f"{result['seconds']:,.0f} s, load 1m mean {result['load_1m']['mean']} "
                   f"max {result['load_1m']['max']} ({result['cpus']} cpus)",
                   ["transport", "requests", "acked", "journaled", "lost", "duplicated",
                    "unacked", "resends", "cut off", "dup answers"], rows)]
    lines.append(f"daemon (final clean run): accepted {t['accepted']:,}, learned "
                 f"{t['learned']:,} (journal samples {t['journal_samples']:,}), lost counter "
                 f"{t['daemon_lost']}, numbered MQTT messages missing {t['daemon_missing']}, "
                 f"mangled {t['mangled']}, exit at SIGTERM "
                 f"{result['exit_code_at_sigterm']}, error log lines "
                 f"{result['daemon_error_log_lines']}, starts {result['starts']}, ready "
                 f"mean {result['ready_s']['mean']} s max {result['ready_s']['max']} s")
    lines.append("verdict: " + ("; ".join(result["problems"]) or "nothing lost, nothing "
                                "duplicated, everything learned once"))
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------
def make_feeders(args: argparse.Namespace, daemon: DaemonProcess, broker_port: int
                 ) -> list[Feeder]:
    common = (args.seed, args.interval_s, args.max_batch)
    return [MqttFeeder(broker_port, *common), HttpFeeder(daemon.port, *common),
            SocketFeeder(daemon.socket_path, *common)]


def campaign(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    with mosquitto(args.mosquitto, tmp) as (broker_port, config):
        print(f"mosquitto.conf:\n{config}", flush=True)
        create_session(broker_port)
        daemon = DaemonProcess(args, tmp, write_config(tmp, args), broker_port)
        feeders: list[Feeder] = []
        try:
            daemon.start()
            run = Campaign(args, daemon, feeders, random.Random(args.seed))
            run.ready_s.append(daemon.wait_ready())
            feeders.extend(make_feeders(args, daemon, broker_port))
            for feeder in feeders:
                feeder.start()
            for number in range(1, args.kills + 1):
                run.one_kill(number)
            run.ready_s.append(daemon.wait_ready())
            run.sleep_until(time.monotonic() + args.max_s)
            run.stop_feeders()
            print(f"[{time.monotonic() - run.t0:6.1f} s] feeders stopped; acked "
                  f"{run.acked()}; draining", flush=True)
            final = run.drain()
            exit_code = daemon.stop()
            result = summarize(run, final, exit_code,
                               read_journal(daemon.state_dir / "journal.sqlite3"))
            return {**result, "mosquitto_conf": config}
        finally:
            for feeder in feeders:
                feeder.aborting.set()
            daemon.kill()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="kill times, batches, forms")
    parser.add_argument("--min-s", type=float, default=0.2,
                        help="earliest kill after ready (default 0.2 s)")
    parser.add_argument("--max-s", type=float, default=3.0,
                        help="latest kill after ready (default 3 s)")
    parser.add_argument("--startup-share", type=float, default=0.2,
                        help="share of kills landing before ready: in imports, restore, "
                             "replay (default 0.2)")
    parser.add_argument("--interval-s", type=float, default=0.05,
                        help="mean pause between a feeder's requests (default 0.05 s)")
    parser.add_argument("--max-batch", type=int, default=16,
                        help="samples per request: 1..this (default 16)")
    parser.add_argument("--checkpoint-every", type=int, default=200,
                        help="the learner's checkpoint_every in samples (default 200)")
    parser.add_argument("--timeout-s", type=float, default=180.0,
                        help="bound on each wait: a start, the final drain (default 180 s)")
    parser.add_argument("--edgecl", default=str(ROOT / ".venv" / "bin" / "edgecl"))
    parser.add_argument("--mosquitto", default="/usr/sbin/mosquitto")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (state dir, daemon and broker logs)")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.max_batch < 1 or not 0 < args.min_s <= args.max_s:
        parser.error("--kills and --max-batch must be >= 1, 0 < --min-s <= --max-s")
    if not 0 <= args.startup_share <= 1:
        parser.error("--startup-share must be within 0..1")
    for tool in (args.edgecl, args.mosquitto):
        if not Path(tool).exists():
            parser.error(f"{tool} not found")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # exit through the `finally`s
        signal.signal(sig, lambda n, _: sys.exit(128 + n))
    tmp = Path(tempfile.mkdtemp(prefix="edgecl-kill-campaign-"))
    try:
        result = campaign(args, tmp)
    except CampaignError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"temp dir kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["argv"] = sys.argv
    print(report(result), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
