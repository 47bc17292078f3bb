"""Acceptance: a real sensor set streamed into the daemon as a device would feed it.

BasicMotions' raw accelerometer/gyro windows, labelled by class name, some tasks over HTTP and
some over MQTT at once, each task ended over the *other* transport right after its last sample;
`edgecl serve` on the daemon's repository. Every task is consolidated exactly once, after all of
its samples, and what serve answers on the test windows is what the learner knows at the end.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from test_learn_mqtt import Client as MqttPublisher

from edgecl import repository
from edgecl.daemon.client import LearnClient
from edgecl.daemon.daemon import Daemon
from edgecl.daemon.journal import END, SAMPLE
from edgecl.daemon.service import LearnService, Listeners
from edgecl.data import load_benchmark
from edgecl.serve import create_server
from edgecl.serve.client import Client as ServeClient
from edgecl.setup import build_config

SAMPLES_PER_TASK = 240
TEST_WINDOWS = 400
# task -> (the transport of its samples, the transport of its end)
PLAN = {"task00": ("http", "mqtt"), "task01": ("mqtt", "http"), "task02": ("http", "mqtt")}


@pytest.fixture(scope="module")
def basicmotions():
    pytest.importorskip("aeon")
    return load_benchmark("basicmotions", n_tasks=len(PLAN), samples_per_task=SAMPLES_PER_TASK)


def send_over_mqtt(publisher: MqttPublisher, topic: str, task: str, x: np.ndarray,
                   names: list[str]) -> int:
    """The task's samples as JSON messages of 20, each acknowledged by the broker; how many."""
    for i in range(0, len(names), 20):
        batch = [{"task": task, "x": xi, "y": yi}
                 for xi, yi in zip(x[i:i + 20], names[i:i + 20], strict=True)]
        publisher.publish(topic, orjson.dumps({"samples": batch},
                                              option=orjson.OPT_SERIALIZE_NUMPY))
    return len(names)


def test_a_sensor_stream_over_http_and_mqtt_is_served_as_the_learner_knows_it(
        tmp_path: Path, broker: str, basicmotions) -> None:
    bench = basicmotions
    classes = list(bench.tasks[0].classes)
    cfg = build_config({
        "seed": 0, "device": "cpu", "net": {"name": "mlp", "hidden": [64]},
        "method": {"name": "gem"}, "memory": {"per_task": 64},
        "stream": {"input_shape": list(bench.input_shape), "classes": classes,
                   "max_tasks": len(PLAN)}})  # raw sensor units: normalize auto standardises
    repo = tmp_path / "repo"
    repo.mkdir()
    service = LearnService(Daemon(cfg, tmp_path / "state", repo),
                           Listeners(port=0, mqtt=broker, name="wrist"))
    daemon = service.daemon
    server = create_server(repo, port=0)
    serving = threading.Thread(target=server.run, args=(0.1,))
    service.start()
    serving.start()
    publisher = MqttPublisher(broker)
    topic = "edgecl/wrist/samples"
    try:
        with LearnClient(service.url, batch=20) as client:
            for task in bench.tasks:
                samples_by, end_by = PLAN[task.name]
                x = task.x_train.numpy()
                names = [classes[k] for k in task.y_train.tolist()]
                if samples_by == "http":
                    client.send_many(task.name, x, names)
                    client.flush()
                    acknowledged = client.acknowledged[task.name]
                else:
                    acknowledged = send_over_mqtt(publisher, topic, task.name, x, names)
                if end_by == "mqtt":  # right after the last sample, over the other transport
                    publisher.publish(topic, orjson.dumps(
                        {"end_task": task.name, "samples": acknowledged}))
                else:
                    client.end_task(task.name, samples=acknowledged)
            status = client.wait_learned(120)

        records = daemon.journal.read(0, 100_000)
        for task in bench.tasks:  # one end per task, after every one of its samples
            ends = [c.seq for c in records if c.kind == END and c.task == task.name]
            last_sample = max(c.last for c in records if c.kind == SAMPLE and c.task == task.name)
            assert len(ends) == 1 and ends[0] > last_sample, (task.name, ends, last_sample)
            assert status["tasks"][task.name]["accepted"] == SAMPLES_PER_TASK
        assert set(daemon.learning.rows) == set(PLAN)  # each consolidated (evaluated) once
        assert status["rejected"] == 0 and status["publish"]["behind"] == []

        with ServeClient(server.url) as serve:
            for task in bench.tasks:
                t = status["tasks"][task.name]
                assert t["served_version"] is not None and not t["behind"], t
                deadline = time.monotonic() + 60  # serve's poll, then the version's probe
                while getattr(server.models.get(task.name), "version", None) \
                        != t["served_version"]:
                    assert time.monotonic() < deadline, (task.name, t)
                    time.sleep(0.05)
                versions = serve.metadata(task.name)["versions"]
                assert versions[-1] == str(t["served_version"])
                manifest = repository.read_manifest(repo / task.name / versions[-1])
                train = task.x_train.numpy()  # the range of every window sent, not of a few
                assert manifest.input_range == [float(train.min()), float(train.max())]
                x, y = task.x_test[:TEST_WINDOWS], task.y_test[:TEST_WINDOWS].numpy()
                learner = daemon.call(lambda x=x, name=task.name: daemon.learning.learner.predict(
                    x, name).argmax(1).numpy()).result()
                served = serve.infer(task.name, x.numpy()).argmax(1)
                learner_acc, served_acc = (learner == y).mean(), (served == y).mean()
                assert abs(served_acc - learner_acc) <= 0.005, (task.name, served_acc,
                                                                learner_acc)
                assert learner_acc > 0.5, (task.name, learner_acc)  # raw units, learned
    finally:
        publisher.close()
        service.stop()
        server.shutdown()
        serving.join(10)
