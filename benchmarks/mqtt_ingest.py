"""MQTT ingest rate of `edgecl learn`: messages journaled per second, one at a time vs grouped.

    .venv/bin/python benchmarks/mqtt_ingest.py [--messages 20000] [--repeats 3] [--out r.json]

A mosquitto broker of our own (deploy/mosquitto/edgecl.conf's settings, so nothing is dropped)
and an in-process daemon (fine-tuning a small MLP on 4-value samples, learning off the critical
path: `max_lag` above the backlog). The daemon subscribes, goes away, --messages one-sample
JSON messages are published (numbered: `sender`, `sender_seq`), then the daemon comes back and
drains its queue: the rate is messages / seconds from its start to the last message durable.
"grouped" is the daemon as shipped (every delivery waiting journaled in one transaction);
"one at a time" sets the Receive Maximum, and so the group, to 1: each message waits for its
own commit before the next is taken, as MQTT ingest worked before group commit. Both modes run
--repeats times, alternating, each on a fresh state dir; min / median / max are reported with
the load average (on a shared machine absolute rates say more about the neighbours).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import mosquitto  # noqa: E402  (the tests' broker starter)

from edgecl.daemon import mqtt as mqtt_ingest  # noqa: E402
from edgecl.daemon.daemon import Daemon  # noqa: E402
from edgecl.setup import build_config  # noqa: E402

SENDER = "bench"


def new_daemon(state_dir: Path, messages: int) -> Daemon:
    cfg = build_config({"device": "cpu", "net": {"name": "mlp", "hidden": [16]},
                        "method": {"name": "finetune"},
                        "stream": {"input_shape": [4], "classes": ["a", "b", "c"],
                                   "head": "shared", "max_tasks": 3, "batch_size": 32},
                        "learn": {"holdout": 0.0, "max_lag": 2 * messages}})
    return Daemon(cfg, state_dir)


def publish(url: str, topic: str, messages: int) -> None:
    address = mqtt_ingest.parse_url(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, orjson.dumps({
            "samples": [{"task": "t1", "x": [0.1, 0.2, 0.3, n % 7], "y": n % 3}],
            "sender": SENDER, "sender_seq": n}), qos=1) for n in range(1, messages + 1)]
        for info in infos:
            info.wait_for_publish(120)
    finally:
        client.disconnect()
        client.loop_stop()


def drain_rate(url: str, folder: Path, messages: int, group: int) -> float:
    """Messages/s at which a daemon that was away journals its queued messages."""
    mqtt_ingest.RECEIVE_MAXIMUM = group
    daemon = new_daemon(folder / "state", messages)
    daemon.start()
    source = mqtt_ingest.MqttSource(daemon, url, f"bench-{group}-{time.monotonic_ns()}")
    try:
        source.start()
        assert source.subscribed.wait(30), "the daemon did not subscribe"
        source.stop()
        publish(url, source.topic, messages)
        t0 = time.perf_counter()
        source.start()
        while daemon.journal.senders.get(SENDER) is None \
                or daemon.journal.senders[SENDER].seq < messages:
            time.sleep(0.01)
        seconds = time.perf_counter() - t0
        assert daemon.journal.missing == 0
        return messages / seconds
    finally:
        source.stop()
        daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    shipped = mqtt_ingest.RECEIVE_MAXIMUM
    modes = {"one at a time": 1, "grouped": shipped}
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    settings = (ROOT / "deploy" / "mosquitto" / "edgecl.conf").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        broker_dir = Path(tmp, "broker")
        broker_dir.mkdir()
        with mosquitto(broker_dir, settings=settings) as port:
            url = f"mqtt://127.0.0.1:{port}"
            for repeat in range(args.repeats):
                for mode, group in modes.items():
                    folder = Path(tmp, f"{repeat}-{group}")
                    rates[mode].append(drain_rate(url, folder, args.messages, group))
                    print(f"repeat {repeat + 1}/{args.repeats} {mode:>13}: "
                          f"{rates[mode][-1]:,.0f} messages/s", flush=True)
    load = os.getloadavg()[0]
    summary = {mode: {"min": min(r), "median": statistics.median(r), "max": max(r)}
               for mode, r in rates.items()}
    ratio = summary["grouped"]["median"] / summary["one at a time"]["median"]
    print(f"\n{args.messages:,} one-sample messages, receive maximum {shipped}, load average "
          f"{load:.1f}")
    for mode, s in summary.items():
        print(f"{mode:>13}: median {s['median']:,.0f} messages/s (min {s['min']:,.0f}, "
              f"max {s['max']:,.0f})")
    print(f"grouped / one at a time: {ratio:.1f}x")
    if args.out:
        args.out.write_text(json.dumps({"messages": args.messages, "rates": rates,
                                        "summary": summary, "ratio": ratio,
                                        "load_average": load}, indent=1))


if __name__ == "__main__":
    main()
