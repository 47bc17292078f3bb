"""`edgecl serve` against models and repositories that would wedge it: a graph that loops
forever, one that takes a single batch size, one whose outputs are not finite, a repository
whose disk is unmounted, and requests that run long or large.

The models are built with onnx's helper API (no torch): a 4 -> 3 linear map, optionally behind
an ONNX `Loop` whose trip count is fixed or read from the input.
"""

import http.client
import json
import logging
import shutil
import sys
import threading
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families
from test_serve import running

from edgecl import repository
from edgecl.serve import http as serve_http
from edgecl.serve.runtime import ModelRefused, Prober, probe_version

WAIT_S = 20.0  # generous: a loaded 2-core machine
W = (np.arange(12, dtype=np.float32).reshape(4, 3) - 6) / 10
FOREVER = 1 << 62  # Loop iterations: about 250,000 years at 2 us each


def graph(kind: str = "linear", trip: int | None = None, input_batch: int | str = "N"
          ) -> bytes:
    """An ONNX model `input` [batch, 4] -> `logits` [batch, 3] (x @ W).

    kind: linear; loop (a Loop of `trip` iterations first, or max(x) iterations when `trip`
    is None); reshape (a Reshape to [4, 4] inside: only batch 4 runs); nan (logits + sqrt(-1)).
    `input_batch`: the input's declared batch axis (an int fixes it).
    """
    inits = [numpy_helper.from_array(W, "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"])]
    out = "mm"
    if kind == "reshape":
        inits.append(numpy_helper.from_array(np.array([4, 4], np.int64), "shape4"))
        nodes.insert(0, helper.make_node("Reshape", ["input", "shape4"], ["x"]))
    else:
        nodes.insert(0, helper.make_node("Identity", ["input"], ["x"]))
    if kind == "nan":
        inits.append(numpy_helper.from_array(np.array(-1.0, np.float32), "minus1"))
        nodes += [helper.make_node("Sqrt", ["minus1"], ["nan"]),
                  helper.make_node("Add", ["mm", "nan"], ["withnan"])]
        out = "withnan"
    if kind == "loop":
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
             helper.make_node("Add", ["v", "one"], ["v_out"])], "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v", TensorProto.FLOAT, [])],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [])],
            [numpy_helper.from_array(np.array(1.0, np.float32), "one")])
        inits += [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                  numpy_helper.from_array(np.array(True), "true")]
        if trip is None:
            nodes += [helper.make_node("ReduceMax", ["input"], ["max"], keepdims=0),
                      helper.make_node("Cast", ["max"], ["trip"], to=TensorProto.INT64)]
        else:
            inits.append(numpy_helper.from_array(np.array(trip, np.int64), "trip"))
        nodes += [helper.make_node("Loop", ["trip", "true", "zero"], ["count"], body=body),
                  helper.make_node("Mul", ["count", "zero"], ["nothing"]),
                  helper.make_node("Add", [out, "nothing"], ["looped"])]
        out = "looped"
    nodes.append(helper.make_node("Identity", [out], ["logits"]))
    g = helper.make_graph(
        nodes, kind, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [input_batch, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


LINEAR = (repository.probe_input([4]) @ W).tolist()  # the probe logits of every graph here


def probe_logits(model: bytes) -> list[list[float]]:
    """What export writes in the manifest: the model's logits for the probe input."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": repository.probe_input([4])})[0].tolist()


def hanging() -> bytes:
    return graph("loop", trip=FOREVER)


def publish(repo, task, model: bytes, logits=None) -> int:
    """Publish `model` as the next version of `task`; returns its version."""
    fields = {
        "task": task, "created": "2025-01-01T00:00:00Z", "sha256": repository.sha256_of(model),
        "opset": 17, "ir_version": 8, "input": {"name": "input", "shape": [-1, 4]},
        "output": {"name": "logits", "shape": [-1, 3]}, "classes": ["a", "b", "c"],
        "normalisation": "none", "input_range": None, "method": "test", "head": "shared",
        "source_checkpoint": "none", "source_sha256": "0" * 64,
        "verification": {"tolerance": 1e-4, "max_abs_diff": 0.0, "argmax_mismatches": 0,
                         "random_inputs": 0, "real_inputs": 0, "real_data": "none"},
        "probe": {"seed": 0, "batch": 4,
                  "logits": probe_logits(model) if logits is None else logits},
        "exporter": {"test": "1"}}
    return repository.publish(repo, model, fields).version


def wait_for(condition, what, seconds=WAIT_S):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds:g} s waiting for {what}"
        time.sleep(0.02)


def call(server, method, path, body=None):
    host, port = server.socket.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request(method, path, None if body is None else json.dumps(body).encode())
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def infer(server, task, x):
    x = np.asarray(x, dtype=np.float32)
    status, answer = call(server, "POST", f"/v2/models/{task}/infer", {"inputs": [
        {"name": "input", "shape": list(x.shape), "datatype": "FP32",
         "data": x.ravel().tolist()}]})
    assert status == 200, answer
    return np.asarray(answer["outputs"][0]["data"]).reshape(answer["outputs"][0]["shape"])


def metric(server, name, **labels):
    text = server.metrics.render().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


X = np.random.default_rng(1).random((3, 4), dtype=np.float32)


@pytest.fixture
def repo(tmp_path):
    """t0 and t1, one good version each (t0's a Loop of max(x) iterations: none on the probe)."""
    publish(tmp_path, "t0", graph("loop"))
    publish(tmp_path, "t1", graph())
    return tmp_path


# --- (a) a graph that never ends ---------------------------------------------------------------


def test_a_version_that_hangs_is_refused_in_time_without_holding_up_other_tasks(repo):
    publish(repo, "t1", graph())  # t1 version 2
    timeout_s = 8.0
    with running(repo, probe_timeout_s=timeout_s) as server:
        assert server.models.get("t1").version == 2
        started = time.monotonic()
        publish(repo, "t0", hanging(), LINEAR)  # t0 version 2: never ends
        wait_for(lambda: ("t0", 2) in server.models.probing(), "t0 version 2's probe")
        (repo / "t1" / "2" / "BAD").write_text("rolled back while t0's probe hangs")
        server.models.refresh()  # a rollback is not held up by the hung probe...
        assert server.models.get("t1").version == 1
        assert ("t0", 2) in server.models.probing()  # ...which is still running
        np.testing.assert_allclose(infer(server, "t0", X), X @ W, rtol=1e-5)
        wait_for(lambda: ("t0", 2) in server.models.refusals(), "the refusal",
                 timeout_s + WAIT_S)
        assert time.monotonic() - started >= timeout_s - 0.5  # refused at the limit, not before
        why = server.models.refusals()["t0", 2]
        assert why.startswith("timeout: ") and f"did not finish within {timeout_s:g} s" in why
        assert metric(server, "edgecl_model_refused_total", task="t0", reason="timeout") == 1
        assert server.models.get("t0").version == 1
        np.testing.assert_allclose(infer(server, "t0", X), X @ W, rtol=1e-5)
        time.sleep(0.3)  # more polls: a refused version is not probed again
        assert not server.models.probing()
        assert metric(server, "edgecl_model_refused_total", task="t0", reason="timeout") == 1
        publish(repo, "t0", graph())  # a good version 3 still gets through
        wait_for(lambda: server.models.get("t0").version == 3, "t0 version 3")


def test_stopping_does_not_wait_for_a_hung_probe(repo):
    with running(repo, probe_timeout_s=3600.0) as server:
        publish(repo, "t0", hanging(), LINEAR)
        wait_for(lambda: ("t0", 2) in server.models.probing(), "the probe")
        started = time.monotonic()
        server.shutdown()
        server.models.stop()  # what run() does on its way out; kills the probe
        assert time.monotonic() - started < WAIT_S
        assert ("t0", 2) not in server.models.refusals()  # cut short: no verdict


def test_at_start_a_hanging_newest_version_falls_back_to_the_previous(repo):
    publish(repo, "t0", hanging(), LINEAR)
    with running(repo, probe_timeout_s=2.0) as server:
        assert server.models.get("t0").version == 1
        assert server.models.refusals()["t0", 2].startswith("timeout: ")


def test_a_version_whose_probe_process_dies_is_refused_as_a_crash(repo, tmp_path_factory,
                                                                  monkeypatch):
    # A graph that crashes onnxruntime is hard to build on purpose: a probe process that dies
    # of a signal stands in for one.
    fake = tmp_path_factory.mktemp("bin") / "python"
    fake.write_text("#!/bin/sh\nkill -SEGV $$\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(ModelRefused, match="the probe process died of SIGSEGV") as e:
        probe_version(repo / "t1" / "1", Prober(10.0))
    assert e.value.reason == "crash"


# --- (b) a graph that takes one batch size -----------------------------------------------------


@pytest.mark.parametrize(("model", "message"), [
    (graph(input_batch=4), "the graph's batch axis is fixed at 4: every request of another "
                           "batch size would fail"),
    (graph("reshape"), "the graph cannot take a batch of 1 ("),
])
def test_a_version_that_takes_one_batch_size_is_refused_naming_the_batch(repo, model, message):
    with running(repo) as server:
        publish(repo, "t1", model)
        wait_for(lambda: ("t1", 2) in server.models.refusals(), "the refusal")
        why = server.models.refusals()["t1", 2]
        assert why.startswith("verify: ") and message in why
        assert metric(server, "edgecl_model_refused_total", task="t1", reason="verify") == 1
        assert server.models.get("t1").version == 1
        x = np.random.default_rng(2).random((5, 4), dtype=np.float32)
        np.testing.assert_allclose(infer(server, "t1", x), x @ W, rtol=1e-5)


# --- non-finite outputs ----------------------------------------------------------------------


def test_a_version_with_non_finite_outputs_is_refused_saying_so(repo):
    nan = graph("nan")
    with running(repo) as server:
        publish(repo, "t1", nan, LINEAR)
        fields = repository.read_manifest(repo / "t1" / "1").model_dump(exclude={"version"})
        # what export writes for NaN logits: pydantic serialises NaN as null
        repository.publish(repo, nan, {**fields, "sha256": repository.sha256_of(nan),
                                       "probe": {**fields["probe"],
                                                 "logits": [[float("nan")] * 3] * 4}})
        wait_for(lambda: {("t1", 2), ("t1", 3)} <= server.models.refusals().keys(),
                 "the refusals")
        refusals = server.models.refusals()
        assert refusals["t1", 2].startswith("verify: ")
        assert "the probe gives 12 non-finite logit(s) (NaN or infinity)" in refusals["t1", 2]
        assert refusals["t1", 3].startswith("manifest: ")
        assert "probe.logits.0.0 is null, not a number" in refusals["t1", 3]
        assert "NaN or infinite when it was exported" in refusals["t1", 3]
        assert "Input should be a valid number" not in refusals["t1", 3]
        assert server.models.get("t1").version == 1


# --- (c) an unmounted repository ---------------------------------------------------------------


def test_an_emptied_repository_keeps_every_model_serving(repo, tmp_path_factory, caplog):
    aside = tmp_path_factory.mktemp("aside")
    with running(repo, poll_s=3600.0) as server, caplog.at_level(logging.WARNING):
        for task in ("t0", "t1"):  # the mountpoint stays, what was mounted on it goes
            shutil.move(repo / task, aside / task)
        assert list(repo.iterdir()) == []
        for _ in range(2):
            server.models.refresh()
        assert sorted(server.models.all()) == ["t0", "t1"]
        assert not server.models.repository_available
        np.testing.assert_allclose(infer(server, "t1", X), X @ W, rtol=1e-5)
        assert call(server, "GET", "/v2/health/ready")[0] == 200
        assert metric(server, "edgecl_repository_unavailable_total") == 1  # once, not per poll
        assert caplog.text.count("lists no task any more") == 1
        for task in ("t0", "t1"):  # mounted again
            shutil.move(aside / task, repo / task)
        server.models.refresh()
        assert server.models.repository_available
        (repo / "t1" / "1" / "BAD").write_text("")  # and rollbacks work again
        server.models.refresh()
        assert sorted(server.models.all()) == ["t0"]


# --- requests that run long or large -----------------------------------------------------------


def answered_while_it_runs(server, x):
    """Infer `x` on t0 (which loops max(x) times: seconds) in a thread; the health probes
    answer while it runs."""
    answers = []
    worker = threading.Thread(target=lambda: answers.append(infer(server, "t0", x)))
    wait_for(lambda: server.guard.busy == 0, "earlier requests to end")
    worker.start()
    try:
        wait_for(lambda: server.guard.busy == 1, "the long request")
        assert call(server, "GET", "/v2/health/live") == (200, {"live": True})
        assert call(server, "GET", "/v2/health/ready")[0] == 200
        assert worker.is_alive() and not answers  # answered while inference ran
    finally:
        worker.join(120)
    np.testing.assert_allclose(answers[0], x @ W, rtol=1e-5)


def test_health_probes_are_answered_while_a_long_batch_runs(repo):
    rows = serve_http.INLINE_MAX_VALUES // 4 + 1  # too large to run on the event loop
    x = np.zeros((rows, 4), dtype=np.float32)
    x[0, 0] = 3e6
    with running(repo, max_batch=rows) as server:
        answered_while_it_runs(server, x)


def test_a_model_once_slow_never_runs_on_the_event_loop_again(repo):
    with running(repo) as server:
        slow = np.full((1, 4), 1e5, dtype=np.float32)  # a small request, but 0.1 s or so
        np.testing.assert_allclose(infer(server, "t0", slow), slow @ W, rtol=1e-5)
        answered_while_it_runs(server, np.full((1, 4), 3e6, dtype=np.float32))


def test_memory_is_handed_back_after_a_burst_of_large_requests(repo, monkeypatch):
    trims = []
    monkeypatch.setattr(serve_http, "release_freed_memory", lambda: trims.append(1))
    monkeypatch.setattr(serve_http, "TRIM_QUIET_S", 0.2)
    with running(repo, max_batch=100_000) as server:
        infer(server, "t1", X)
        time.sleep(0.5)
        assert trims == []  # small requests leave the allocator alone
        large = np.random.default_rng(3).random((40_000, 4), dtype=np.float32)  # 1.5 MB JSON
        for _ in range(3):
            np.testing.assert_allclose(infer(server, "t1", large), large @ W, rtol=1e-4,
                                       atol=1e-6)
        wait_for(lambda: trims, "memory to be handed back")
        time.sleep(0.5)
        assert len(trims) <= 3  # after the burst (or its pauses: TRIM_QUIET_S), not before
