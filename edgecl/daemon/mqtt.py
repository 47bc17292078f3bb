"""MQTT ingest for `edgecl learn`: labelled samples from a broker, acknowledged once durable.

`MqttSource(daemon, "mqtt://host:1883", device)` subscribes to `edgecl/<device>/samples` at
QoS 1 (`mqtts://user@host:8883`: TLS, verified against the system's CAs or `ca_file`, and a
username whose password is given apart from the URL, which command lines and logs show) as
client `edgecl-learn-<device>` (MQTT 5, clean start off, a session that does not
expire), so the broker keeps what is published while the daemon is down and delivers it when
the daemon comes back.

The QoS/ack contract (at least once):
- Manual acks: the PUBACK of a message goes out only after `daemon.submit` resolved, i.e. its
  samples are durable in the journal. A message not acked stays in the broker's session and
  is delivered again on the next connection (after a reconnect or a restart of the daemon).
- An invalid message (`SampleError`: bad JSON, wrong shape, unknown class, a task beyond
  `max_tasks`, ...) is acked so the broker does not deliver it forever, counted as rejected,
  and reported as `{"error", "status", "topic", "mid"}` on `edgecl/<device>/rejected` (QoS 1).
- Backpressure (the learner lags) and journal write errors: the message in hand is retried
  (every `retry_after_s`, or `JOURNAL_RETRY_S`) and stays unacked meanwhile; the broker stops
  sending once its inflight window (our Receive Maximum) is full. Nothing is dropped.
- A message acked on one connection is acked on that connection only: when the connection
  dropped between delivery and durability, the ack is skipped and the broker's redelivery is
  journaled again. Duplicates are possible then (and after a crash between the journal write
  and the PUBACK); loss is not.

Payloads are any of `edgecl.daemon.schema`'s forms. The content type comes from the MQTT 5
Content Type property: `application/vnd.edgecl.samples` means the binary form, a JSON type or
none means JSON (one sample, `{"samples": [...]}`, or NDJSON). A publisher speaking MQTT 3.1.1
cannot set the property, so its payloads are always read as JSON. An end of task is a JSON
message on the same topic, `{"end_task": "site-a", "samples": 240}` (`samples`: how many of the
task's samples the publisher had acknowledged, on any transport, before it sent the end; see
`edgecl.daemon.schema`): it follows the task's samples published before it on this topic, and
waits in the journal for those sent another way.

Group commit: paho's network thread only queues deliveries; one worker thread takes every
delivery waiting (up to our Receive Maximum), validates and submits them all to the journal in
order, which commits them together (hundreds of messages per transaction under load), then
acks each in order once durable (paho's `ack` and `publish` queue a packet and wake the network
thread: both are safe from another thread while `loop_start` runs it). A message held back
(backpressure, a journal error) holds back the ones after it: order is kept.

Broker drops. A broker may drop QoS 1 messages it accepted (mosquitto's stock
`max_queued_messages 1000`: what is queued for a client beyond that while it is away or slow is
discarded, and nobody is told). The daemon cannot see what never reaches it; a publisher that
numbers its messages (`sender`, `sender_seq`: see `edgecl.daemon.schema`) makes every dropped
message a counted `missing` one. The broker settings that drop nothing are in docs/learn.md.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgecl.daemon.daemon import ADMISSION_ERRORS, Daemon, Refusal
from edgecl.daemon.journal import Appended
from edgecl.daemon.schema import SampleError

log = logging.getLogger("edgecl.learn")
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
RECEIVE_MAXIMUM = 512  # unacked QoS 1 messages the broker may have in flight to us
SESSION_EXPIRY_S = 0xFFFFFFFF  # MQTT 5: the session never expires
KEEPALIVE_S = 30
RECONNECT_DELAY_S = (1, 30)  # paho's reconnect backoff: min, max

POLL_S = 0.2  # how often waiting threads look at the stop flag


@dataclass(frozen=True)
class Delivery:
    """One PUBLISH as the worker sees it; `connection` counts the connections made."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    content_type: str
    connection: int


@dataclass(frozen=True)
class BrokerAddress:
    tls: bool
    host: str
    port: int
    username: str | None


def parse_url(url: str) -> BrokerAddress:
    """`mqtt[s]://[user@]host[:port]`; anything else is a ValueError naming `url`."""
    form = "mqtt://[user@]host[:port] or mqtts://[user@]host[:port]"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"MQTT URL {url!r}: {e}") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"MQTT URL {url!r}: expected {form}")
    if parts.password is not None:
        raise ValueError(f"MQTT URL {url!r}: a password does not go in the URL (command lines "
                         "and logs show it); give it in a file (--mqtt-password-file)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"MQTT URL {url!r}: expected {form}, nothing more")
    return BrokerAddress(parts.scheme == "mqtts", parts.hostname,
                         port or DEFAULT_PORTS[parts.scheme], parts.username)


def check_device(device: str) -> str:
    """A device name usable as one MQTT topic level."""
    if not device or any(c in device for c in "/+#\0"):
        raise ValueError(f"device {device!r}: must be one MQTT topic level (no '/', '+', '#')")
    return device


class MqttSource:
    """Ingest from `edgecl/<device>/samples`; `start()` connects (retrying until the broker
    answers), `stop()` finishes the message in hand and disconnects."""

    stop_grace_s = 10.0  # at stop, how long the message in hand may wait for the journal

    def __init__(self, daemon: Daemon, url: str, device: str, password: str | None = None,
                 ca_file: Path | None = None) -> None:
        self.daemon = daemon
        self.address = parse_url(url)
        self.host, self.port = self.address.host, self.address.port
        if password is not None and self.address.username is None:
            raise ValueError(f"MQTT URL {url!r}: a password needs a user (mqtt://user@host)")
        if ca_file is not None and not self.address.tls:
            raise ValueError(f"MQTT URL {url!r}: a CA file is for TLS (mqtts://)")
        self.password = password
        self.ca_file = ca_file
        self.device = check_device(device)
        self.client_id = f"edgecl-learn-{device}"
        self.topic = f"edgecl/{device}/samples"
        self.rejected_topic = f"edgecl/{device}/rejected"
        self.subscribed = threading.Event()  # set while subscribed on a live connection
        self._lock = threading.Lock()  # the connection count and state, and every ack
        self._connection = 0
        self._connected = False
        self._stopping = threading.Event()
        self._queue: queue.Queue[Delivery] = queue.Queue(maxsize=2 * RECEIVE_MAXIMUM)
        self._client: mqtt.Client | None = None
        self._worker: threading.Thread | None = None

    # --- start and stop --------------------------------------------------------------------
    def start(self) -> None:
        if self._client is not None:
            raise RuntimeError("MqttSource already started")
        self._stopping.clear()
        self._client = self._make_client()
        self._worker = threading.Thread(target=self._work, name="edgecl-mqtt", daemon=True)
        self._worker.start()
        self._client.connect_async(self.host, self.port, KEEPALIVE_S, clean_start=False,
                                   properties=self._connect_properties())
        self._client.loop_start()
        log.info("MQTT: connecting to %s:%d as %s", self.host, self.port, self.client_id)

    def stop(self) -> None:
        """Finish the message in hand (ack it once durable), then disconnect. Messages queued
        but not taken stay unacked: the broker delivers them again on the next start."""
        self._stopping.set()
        if self._worker is not None:
            self._worker.join()
        if self._client is not None:
            self._client.disconnect()  # after the PUBACKs already queued
            self._client.loop_stop()
        self._client, self._worker = None, None
        self.subscribed.clear()
        self._drain()

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        client.enable_logger(logging.getLogger("edgecl.daemon.mqtt"))
        if self.address.username is not None:
            client.username_pw_set(self.address.username, self.password)
        if self.address.tls:
            client.tls_set(ca_certs=str(self.ca_file) if self.ca_file else None)
        client.reconnect_delay_set(*RECONNECT_DELAY_S)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    @staticmethod
    def _connect_properties() -> Properties:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        props.ReceiveMaximum = RECEIVE_MAXIMUM
        return props

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    # --- paho callbacks (the network thread) -----------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            self.daemon.count("mqtt_connection_refused")
            log.error("MQTT: %s:%d refused the connection: %s", self.host, self.port, reason)
            return
        with self._lock:
            self._connection += 1
            self._connected = True
        log.info("MQTT: connected to %s:%d (session present: %s)", self.host, self.port,
                 flags.session_present)
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        client.subscribe(self.topic, options=options)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reasons: list[ReasonCode], properties: Properties | None) -> None:
        if any(r.is_failure for r in reasons):
            log.error("MQTT: subscribing to %s refused: %s", self.topic, reasons)
            return
        log.info("MQTT: subscribed to %s", self.topic)
        self.subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       reason: ReasonCode, properties: Properties | None) -> None:
        with self._lock:
            self._connected = False
        self.subscribed.clear()
        if not self._stopping.is_set():
            self.daemon.count("mqtt_disconnected")
            log.warning("MQTT: disconnected from %s:%d (%s); reconnecting", self.host,
                        self.port, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        content_type = getattr(message.properties, "ContentType", None) or ""
        with self._lock:
            connection = self._connection
        delivery = Delivery(message.mid, message.qos, message.topic, message.payload,
                            content_type, connection)
        while not self._stopping.is_set():  # full only past the broker's inflight window
            try:
                self._queue.put(delivery, timeout=POLL_S)
                return
            except queue.Full:
                continue

    # --- the worker thread -----------------------------------------------------------------
    def _work(self) -> None:
        held: list[Delivery] = []  # taken, not yet acked, in delivery order
        while not self._stopping.is_set():
            held += self._take(wait=not held)
            if not held:
                continue
            try:
                held = self._handle(held)
            except Exception:  # the worker goes on; the messages stay unacked (redelivered)
                log.exception("MQTT: %d message(s) failed", len(held))
                held = []

    def _take(self, wait: bool) -> list[Delivery]:
        """Every delivery waiting (at most RECEIVE_MAXIMUM); with `wait`, at least one unless
        POLL_S passes first."""
        taken: list[Delivery] = []
        try:
            if wait:
                taken.append(self._queue.get(timeout=POLL_S))
            while len(taken) < RECEIVE_MAXIMUM:
                taken.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return taken

    def _handle(self, deliveries: list[Delivery]) -> list[Delivery]:
        """Journal `deliveries` in order, together, and ack those durable. Returns those held
        back to retry (a refusal with a delay: those the journal refused, and from the first
        one refused before the journal on), after waiting the longest delay."""
        submitted: list[tuple[Delivery, concurrent.futures.Future[Appended]]] = []
        untried: list[Delivery] = []
        delays = [0.0]
        for i, delivery in enumerate(deliveries):
            outcome = self._submit(delivery)
            if isinstance(outcome, Refusal):
                untried, delays = deliveries[i:], [outcome.retry_after_s or 0.0]
                break
            if outcome is not None:
                submitted.append((delivery, outcome))
        held = []
        for delivery, future in submitted:
            outcome = self._journal(delivery, future)
            if isinstance(outcome, Appended):
                self._ack(delivery)
            elif isinstance(outcome, Refusal):
                held.append(delivery)
                delays.append(outcome.retry_after_s or 0.0)
        held += untried
        if held:
            self._stopping.wait(max(delays))
        return held

    def _submit(self, delivery: Delivery
                ) -> concurrent.futures.Future[Appended] | Refusal | None:
        """The journal's future for the message; a Refusal to retry later; None when it was
        refused for good (acked and reported)."""
        d = self.daemon
        try:
            return d.submit(d.parse(delivery.payload, delivery.content_type))
        except SampleError as e:
            self._reject(delivery, d.refusal(e))
        except ADMISSION_ERRORS as e:  # e.g. a task beyond max_tasks, backpressure
            refusal = d.refusal(e)
            if refusal.retry_after_s is not None:
                log.log(logging.ERROR if refusal.status == 507 else logging.DEBUG,
                        "MQTT: holding message %d unacked (%s); retrying in %g s",
                        delivery.mid, refusal.message, refusal.retry_after_s)
                return refusal
            self._reject(delivery, refusal)
        return None

    def _journal(self, delivery: Delivery, future: concurrent.futures.Future[Appended]
                 ) -> Appended | Refusal | None:
        """The future's result once durable; a Refusal to retry later; None when the journal
        refused the message for good (acked and reported) or stopping took longer than the
        grace (it stays unacked)."""
        deadline: float | None = None
        while True:
            done, _ = concurrent.futures.wait([future], timeout=POLL_S)
            if done:
                break
            if self._stopping.is_set():
                deadline = deadline or time.monotonic() + self.stop_grace_s
                if time.monotonic() >= deadline:
                    log.warning("MQTT: stopping before the journal write completed; the "
                                "message stays unacked")
                    return None
        try:
            return future.result()
        except ADMISSION_ERRORS as e:
            refusal = self.daemon.refusal(e)
            if refusal.retry_after_s is not None:
                return refusal
            self._reject(delivery, refusal)
            return None

    def _ack(self, delivery: Delivery) -> None:
        """PUBACK on the connection that delivered the message, else none (redelivered)."""
        client = self._client
        with self._lock:
            if client is not None and self._connected \
                    and delivery.connection == self._connection:
                client.ack(delivery.mid, delivery.qos)
                return
        log.info("MQTT: message %d journaled but its connection is gone: the broker's "
                 "redelivery will be journaled again", delivery.mid)

    def _reject(self, delivery: Delivery, refusal: Refusal) -> None:
        log.warning("MQTT: rejected message %d on %s: %s", delivery.mid, delivery.topic,
                    refusal.message)
        report = {"error": refusal.message, "status": refusal.status, "topic": delivery.topic,
                  "mid": delivery.mid}
        if self._client is not None:
            self._client.publish(self.rejected_topic, orjson.dumps(report), qos=1)
        self._ack(delivery)
