"""MQTT ingest against a real mosquitto broker (started here on a free loopback port)."""

from __future__ import annotations

import queue
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest
from conftest import mosquitto
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgecl.daemon.daemon import Backpressure, Daemon
from edgecl.daemon.http import DaemonCollector
from edgecl.daemon.mqtt import BrokerAddress, MqttSource, parse_url
from edgecl.daemon.schema import BINARY_TYPE
from edgecl.setup import build_config

TIMEOUT_S = 15.0


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    cfg = build_config({"device": "cpu", "net": {"name": "mlp", "hidden": [16]},
                        "method": {"name": "finetune"},
                        "stream": {"input_shape": [4], "classes": ["a", "b", "c"],
                                   "head": "shared", "max_tasks": 3, "batch_size": 5},
                        "learn": {"holdout": 0.0}})
    d = Daemon(cfg, tmp_path / "state")
    d.start()
    yield d
    d.stop()


class Client:
    """A test-side paho client (MQTT 5) that publishes QoS 1 and collects what it subscribed."""

    def __init__(self, url: str) -> None:
        address = parse_url(url)
        host, port = address.host, address.port
        self.received: queue.Queue[dict[str, Any]] = queue.Queue()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self.received.put(orjson.loads(m.payload))
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.connect(host, port)
        self.client.loop_start()

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(TIMEOUT_S)

    def publish(self, topic: str, payload: bytes, content_type: str | None = None) -> None:
        props = None
        if content_type:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = content_type
        info = self.client.publish(topic, payload, qos=1, properties=props)
        info.wait_for_publish(TIMEOUT_S)  # the broker has it (PUBACK from the broker)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def client(broker: str) -> Iterator[Client]:
    c = Client(broker)
    yield c
    c.close()


@pytest.fixture
def source(request: pytest.FixtureRequest, daemon: Daemon, broker: str
           ) -> Iterator[Callable[[], MqttSource]]:
    """Starts MqttSources for this test's device, subscribed; stops them all at teardown."""
    started: list[MqttSource] = []
    device = request.node.name.replace("[", "-").replace("]", "")

    def start() -> MqttSource:
        s = MqttSource(daemon, broker, device)
        s.start()
        started.append(s)
        assert s.subscribed.wait(TIMEOUT_S), "the source did not subscribe"
        return s

    start.device = device  # type: ignore[attr-defined]
    yield start
    for s in started:
        s.stop()


def sample(task: str = "t1", y: Any = 0, x: Any = None) -> dict[str, Any]:
    return {"task": task, "x": [0.1, 0.2, 0.3, 0.4] if x is None else x, "y": y}


def accepted(daemon: Daemon) -> int:
    return daemon.status()["accepted"]


def test_valid_samples_are_journaled_and_learned(daemon: Daemon, source: Any,
                                                  client: Client) -> None:
    source()
    topic = f"edgecl/{source.device}/samples"
    client.publish(topic, orjson.dumps(sample(y="b", x=[1, 2, 3, 4])))  # 1
    client.publish(topic, orjson.dumps({"samples": [sample(y=i % 3) for i in range(4)]}))  # 4
    client.publish(topic, b"\n".join(orjson.dumps(sample(y="c")) for _ in range(3)))  # 3
    rows = np.arange(8, dtype="<f4").reshape(2, 4)
    binary = orjson.dumps({"task": "t1", "y": [0, "a"]}) + b"\n" + rows.tobytes()
    client.publish(topic, binary, content_type=BINARY_TYPE)  # 2
    wait_for(lambda: accepted(daemon) == 10, "10 samples journaled")
    wait_for(lambda: daemon.status()["learned"] == 10, "10 samples learned")
    status = daemon.status()
    assert status["rejected"] == 0
    assert status["tasks"]["t1"]["accepted"] == 10
    with closing(sqlite3.connect(daemon.journal.path)) as db:  # the learner reads its own
        (last,) = db.execute("SELECT x FROM chunks ORDER BY seq DESC LIMIT 1").fetchone()
    assert np.frombuffer(last, "<f4").reshape(2, 4).tolist() == rows.tolist()


def test_invalid_messages_are_rejected_and_reported(daemon: Daemon, source: Any,
                                                    client: Client) -> None:
    source()
    topic = f"edgecl/{source.device}/samples"
    client.subscribe(f"edgecl/{source.device}/rejected")
    client.publish(topic, orjson.dumps(sample(x=[1, 2, 3])))  # wrong shape
    client.publish(topic, orjson.dumps(sample(y="zebra")))  # unknown class
    client.publish(topic, b"{not json")
    poisoned = orjson.dumps({"task": "t1", "y": [0], "dtype": []}) + b"\n" + bytes(16)
    client.publish(topic, poisoned, BINARY_TYPE)  # was a TypeError, never acked: a stuck queue
    for task in ("t1", "t2", "t3", "t4"):  # t4 is beyond max_tasks=3: refused at the journal
        client.publish(topic, orjson.dumps(sample(task=task)))
    reports = [client.received.get(timeout=TIMEOUT_S) for _ in range(5)]
    assert [r["topic"] for r in reports] == [topic] * 5
    assert all(isinstance(r["mid"], int) for r in reports)
    assert "sample.x" in reports[0]["error"] and "4 numbers" in reports[0]["error"]
    assert "'zebra' is not a class of task" in reports[1]["error"]
    assert "malformed JSON" in reports[2]["error"]
    assert "dtype []" in reports[3]["error"] and reports[3]["status"] == 400
    assert "max_tasks" in reports[4]["error"] and reports[4]["status"] == 409
    wait_for(lambda: accepted(daemon) == 3, "the 3 valid samples journaled")
    assert daemon.status()["rejected"] == 5
    assert set(daemon.status()["tasks"]) == {"t1", "t2", "t3"}


def test_rejected_messages_are_acked(daemon: Daemon, source: Any, client: Client) -> None:
    first = source()
    topic = f"edgecl/{source.device}/samples"
    client.publish(topic, orjson.dumps(sample(y=7)))
    wait_for(lambda: daemon.status()["rejected"] == 1, "the rejection")
    first.stop()
    source()  # a redelivery of the rejected message would come before the next one
    client.publish(topic, orjson.dumps(sample()))
    wait_for(lambda: accepted(daemon) == 1, "the valid sample")
    assert daemon.status()["rejected"] == 1


def test_messages_published_while_stopped_are_delivered(daemon: Daemon, source: Any,
                                                        client: Client) -> None:
    first = source()  # creates the persistent session and its subscription
    topic = f"edgecl/{source.device}/samples"
    client.publish(topic, orjson.dumps(sample()))
    wait_for(lambda: accepted(daemon) == 1, "the first sample")
    first.stop()
    for i in range(9):
        client.publish(topic, orjson.dumps(sample(y=i % 3)))
    assert accepted(daemon) == 1
    source()
    wait_for(lambda: accepted(daemon) == 10, "the 9 samples published while stopped")
    wait_for(lambda: daemon.status()["learned"] == 10, "10 samples learned")
    client.publish(topic, orjson.dumps(sample()))  # after anything redelivered
    wait_for(lambda: accepted(daemon) == 11, "a sample after the restart")


def test_backpressure_holds_the_message_unacked(daemon: Daemon, source: Any, client: Client,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    checks = []

    def lagging() -> None:
        checks.append(time.monotonic())
        raise Backpressure(99, 0.05)

    monkeypatch.setattr(daemon, "check_backpressure", lagging)
    first = source()
    topic = f"edgecl/{source.device}/samples"
    client.publish(topic, orjson.dumps({"samples": [sample() for _ in range(5)]}))
    wait_for(lambda: len(checks) >= 3, "retries while the learner lags")
    assert accepted(daemon) == 0
    first.stop()  # gives up the message in hand, unacked
    monkeypatch.undo()
    source()
    wait_for(lambda: accepted(daemon) == 5, "the redelivered message")
    client.publish(topic, orjson.dumps(sample()))
    wait_for(lambda: accepted(daemon) == 6, "the next message")


def test_no_ack_before_the_journal_is_durable(daemon: Daemon, source: Any, client: Client,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    held: list[Future[Any]] = []

    def never_durable(samples: Any) -> Future[Any]:
        held.append(Future())
        return held[-1]

    monkeypatch.setattr(daemon, "submit", never_durable)
    monkeypatch.setattr(MqttSource, "stop_grace_s", 0.1)
    first = source()
    topic = f"edgecl/{source.device}/samples"
    client.publish(topic, orjson.dumps(sample()))
    wait_for(lambda: len(held) == 1, "the journal write")
    first.stop()
    monkeypatch.undo()
    source()
    wait_for(lambda: accepted(daemon) == 1, "the redelivered message")
    client.publish(topic, orjson.dumps(sample()))
    wait_for(lambda: accepted(daemon) == 2, "the next message")


@pytest.mark.parametrize("url", ["http://127.0.0.1:1883", "127.0.0.1", "mqtt://", "mqtt://h:x",
                                 "mqtt://h:1883/path", "mqtt://u:secret@h"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="MQTT URL"):
        parse_url(url)
    assert parse_url("mqtt://broker") == BrokerAddress(False, "broker", 1883, None)
    assert parse_url("mqtts://dev@broker") == BrokerAddress(True, "broker", 8883, "dev")


def test_a_broker_with_tls_and_a_password(tmp_path: Path, daemon: Daemon) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "wrist", "s3cret"],
                   check=True, capture_output=True)
    listener = (f"allow_anonymous false\npassword_file {passwords}\ncafile {cert}\n"
                f"certfile {cert}\nkeyfile {key}\n"
                "user root\n")  # run as root, it would read them as user mosquitto: it cannot
    with mosquitto(tmp_path, listener) as port:
        url = f"mqtts://wrist@127.0.0.1:{port}"
        wrong = MqttSource(daemon, url, "dev", password="guess", ca_file=cert)
        wrong.start()
        try:
            assert not wrong.subscribed.wait(2)  # refused: the log says why, status counts it
            assert daemon.status()["ingest_events"]["mqtt_connection_refused"] >= 1
        finally:
            wrong.stop()
        right = MqttSource(daemon, url, "dev", password="s3cret", ca_file=cert)
        right.start()
        try:
            wait_for(right.subscribed.is_set, "subscribed over TLS with the password")
        finally:
            right.stop()
    with pytest.raises(ValueError, match="a CA file is for TLS"):
        MqttSource(daemon, "mqtt://wrist@127.0.0.1", "dev", "s3cret", ca_file=cert)


BROKER_SETTINGS = Path(__file__).parent.parent / "deploy" / "mosquitto" / "edgecl.conf"
BURST = 5000


def publish_numbered(url: str, topic: str, sender: str, seqs: range) -> None:
    """Publish one numbered sample per seq at QoS 1, pipelined; returns once the broker has
    acknowledged every one (PUBACK)."""
    address = parse_url(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, orjson.dumps({"samples": [sample(y=n % 3)],
                                                     "sender": sender, "sender_seq": n}), qos=1)
                 for n in seqs]
        for info in infos:
            info.wait_for_publish(60)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.parametrize("settings", ["stock", "documented"])
@pytest.mark.parametrize("daemon_during_burst", ["away", "running"])
def test_a_burst_is_learned_or_counted_missing_never_lost_silently(
        tmp_path: Path, daemon: Daemon, settings: str, daemon_during_burst: str) -> None:
    """5,000 numbered messages published at once: every one the broker acknowledged is
    journaled or counted missing. mosquitto's stock settings drop what queues beyond 1,000
    while the daemon is away: counted. With deploy/mosquitto/edgecl.conf nothing is dropped."""
    extra = BROKER_SETTINGS.read_text() if settings == "documented" else ""
    with mosquitto(tmp_path, settings=extra) as port:
        url = f"mqtt://127.0.0.1:{port}"
        source = MqttSource(daemon, url, "burst")
        source.start()  # the daemon's session and subscription: the broker queues for it
        assert source.subscribed.wait(TIMEOUT_S)
        if daemon_during_burst == "away":
            source.stop()
        topic, sender = "edgecl/burst/samples", "pub-1"
        try:
            publish_numbered(url, topic, sender, range(1, BURST + 1))
            if daemon_during_burst == "away":
                source.start()
            publish_numbered(url, topic, sender, range(BURST + 1, BURST + 2))  # the last one
            wait_for(lambda: sender in daemon.journal.senders
                     and daemon.journal.senders[sender].seq == BURST + 1, "the last message",
                     timeout=120)
        finally:
            source.stop()
    journaled, missing = accepted(daemon), daemon.status()["missing"]
    assert journaled + missing == BURST + 1  # one sample a message
    (metric,) = [m for m in DaemonCollector(daemon).collect() if m.name == "edgecl_learn_missing"]
    assert metric.samples[0].value == missing
    if settings == "documented":
        assert missing == 0
    elif daemon_during_burst == "away":
        assert missing == BURST - 1000  # beyond stock max_queued_messages 1000: dropped
    wait_for(lambda: daemon.status()["learned"] == journaled, "everything journaled learned",
             timeout=120)
