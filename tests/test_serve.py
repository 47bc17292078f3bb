"""`edgecl serve`: KServe v2 over HTTP, hot reload, refusal of bad versions, bad requests, auth.

Every server listens on an ephemeral loopback port inside the test process and is shut down by
the test; waits are bounded.
"""

import contextlib
import http.client
import json
import logging
import math
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from test_export import CLASSES, trained_checkpoint
from typer.testing import CliRunner

from edgecl import repository
from edgecl.cli import app
from edgecl.export import Exporter
from edgecl.serve import ListenError, create_server
from edgecl.serve.client import Client, ServeError
from edgecl.serve.kserve import BINARY_HEADER
from edgecl.serve.metrics import ServerMetrics
from edgecl.serve.runtime import choose_providers

WAIT_S = 10.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(learner, repo) with t0 and t1 exported once for the whole module."""
    folder = tmp_path_factory.mktemp("exported")
    learner = trained_checkpoint(folder)
    exporter = Exporter(folder / "c.pt")
    for task in ("t0", "t1"):
        exporter.export(task, folder / "repo")
    return learner, folder / "repo"


@pytest.fixture
def repo(exported, tmp_path):
    """A private copy of the exported repository (tests add versions to it)."""
    return Path(shutil.copytree(exported[1], tmp_path / "repo"))


@pytest.fixture
def learner(exported):
    return exported[0]


@contextlib.contextmanager
def running(repo, poll_s=0.05, **options):
    server = create_server(repo, port=0, **options)
    thread = threading.Thread(target=server.run, args=(poll_s,), daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, "the server to start")
        yield server
    finally:
        server.shutdown()
        thread.join(WAIT_S)


def wait_for(condition, what):
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def request(conn, method, path, body=None, headers=None):
    """(status, parsed JSON or text, response headers) on a keep-alive connection."""
    if isinstance(body, dict | list):
        body = json.dumps(body).encode()
    conn.request(method, path, body, headers or {})
    r = conn.getresponse()
    data = r.read()
    is_json = r.getheader("Content-Type") == "application/json"
    return r.status, json.loads(data) if is_json else data.decode(), r


def connect(server):
    host, port = server.socket.getsockname()[:2]
    return http.client.HTTPConnection(host, port, timeout=WAIT_S)


def infer_body(x, name="input", datatype="FP32", shape=None):
    x = np.asarray(x)
    return {"inputs": [{"name": name, "shape": list(x.shape) if shape is None else shape,
                        "datatype": datatype, "data": x.ravel().tolist()}]}


def samples(text):
    """{(name, labels): value} of every sample in a Prometheus text exposition."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(server, sample):
    """The value of one sample of /metrics, given as `name{label="value",...}` with the labels in
    any order; 0 if absent."""
    (key,) = samples(f"{sample} 0\n")
    return samples(server.metrics.render().decode()).get(key, 0.0)


def republish(repo, source, task, model=None, **changes):
    """Publish `source`'s model (or `model` bytes) as the next version of `task`."""
    fields = repository.read_manifest(source).model_dump(exclude={"version"})
    data = (source / repository.MODEL_FILE).read_bytes() if model is None else model
    return repository.publish(repo, data, {**fields, "task": task, **changes})


def place(repo, source, task, version, manifest=None, **changes):
    """Write version `version` of `task` by hand: `source`'s model with `manifest` text (or its
    manifest JSON with `changes`; with manifest="folder", a folder named manifest.json).

    It is built in a hidden folder and renamed into place whole, as `publish` does, so a poll
    never sees it half written.
    """
    staging = repo / task / ".staging-test"
    staging.mkdir()
    shutil.copy(source / repository.MODEL_FILE, staging)
    if manifest == "folder":
        (staging / repository.MANIFEST_FILE).mkdir()
    else:
        fields = {**json.loads((source / repository.MANIFEST_FILE).read_text()),
                  "task": task, "version": version, **changes}
        (staging / repository.MANIFEST_FILE).write_text(manifest or json.dumps(fields))
    staging.rename(repo / task / str(version))


def test_infer_returns_the_learners_logits(repo, learner):
    x = torch.rand(5, 1, 4, 4)
    with running(repo) as server, Client(server.url) as client:
        assert client.ready()
        for task in ("t0", "t1"):
            np.testing.assert_allclose(client.infer(task, x.numpy()),
                                       learner.predict(x, task).numpy(), atol=1e-5)
        expected = [CLASSES[k] for k in learner.predict(x, "t1").argmax(1)]
        assert client.classify("t1", x.numpy()) == expected
        assert client.infer("t0", x[:1].numpy(), version=1).shape == (1, 3)
        with pytest.raises(ServeError, match="HTTP 404: task 't0' serves version 1, not '7'"):
            client.infer("t0", x.numpy(), version=7)


def test_health_metadata_and_server_metadata(repo):
    with running(repo) as server:
        conn = connect(server)
        assert request(conn, "GET", "/v2/health/live")[:2] == (200, {"live": True})
        assert request(conn, "GET", "/v2/health/ready")[:2] == (200, {"ready": True})
        assert request(conn, "GET", "/v2/models/t0/ready")[:2] == (200, {"name": "t0",
                                                                         "ready": True})
        status, meta, _ = request(conn, "GET", "/v2/models/t1")
        assert status == 200 and meta["name"] == "t1" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 4, 4]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
        assert meta["parameters"]["classes"] == CLASSES
        assert request(conn, "GET", "/v2")[1]["name"] == "edgecl"
        assert request(conn, "GET", "/v2/models/nope")[0] == 404


def test_an_empty_repository_is_live_but_not_ready(tmp_path):
    with running(tmp_path) as server:
        conn = connect(server)
        assert request(conn, "GET", "/v2/health/live")[0] == 200
        assert request(conn, "GET", "/v2/health/ready")[:2] == (503, {"ready": False})


GOOD = np.full((1, 1, 4, 4), 0.5, dtype=np.float32)


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/v2/models/t0/infer", b"{", 400, "malformed JSON"),
    ("/v2/models/t0/infer", b"\xff\xfe", 400, "malformed JSON"),
    ("/v2/models/t0/infer", b"[" * 100_000 + b"]" * 100_000, 400, "malformed JSON"),
    ("/v2/models/t0/infer", b"[1]", 400, "must be a JSON object"),
    ("/v2/models/t0/infer", {"inputs": []}, 400, '"inputs" must be a list of one tensor'),
    ("/v2/models/t0/infer", infer_body(GOOD, name="x"), 400, "unknown input 'x'"),
    ("/v2/models/t0/infer", infer_body(GOOD, datatype="FP64"), 400, "datatype must be FP32"),
    ("/v2/models/t0/infer", infer_body(np.zeros((1, 1, 4, 5))), 400,
     "shape must be [batch >= 1, 1, 4, 4], got [1, 1, 4, 5]"),
    ("/v2/models/t0/infer", infer_body(GOOD, shape=[0, 1, 4, 4]), 400, "shape must be"),
    ("/v2/models/t0/infer", infer_body(GOOD, shape=[2, 1, 4, 4]), 400,
     '"data" has 16 values; shape [2, 1, 4, 4] needs 32'),
    ("/v2/models/t0/infer", infer_body(GOOD * np.nan), 400, "malformed JSON"),  # NaN: not JSON
    ("/v2/models/t0/infer", infer_body(np.full(16, 1e39), shape=[1, 1, 4, 4]), 400,
     "the input has 16 non-finite value(s): NaN, Inf or beyond float32's range"),
    ("/v2/models/t0/infer", infer_body(np.array(["1"] * 16), shape=[1, 1, 4, 4]), 400,
     "must hold only numbers"),
    ("/v2/models/t0/infer", {"inputs": [{"name": "input", "shape": [1, 1, 4, 4],
                                         "datatype": "FP32", "data": [[1, 2], [3]]}]}, 400,
     "evenly nested"),
    ("/v2/models/t0/infer", {"inputs": [{"name": "input", "shape": [1, 1, 4, 4],
                                         "datatype": "FP32", "data": [True] + [0.5] * 15}]},
     400, "must hold only numbers"),  # numpy alone would read it as 1.0
    ("/v2/models/t0/infer", {**infer_body(GOOD), "id": nested(300)}, 400,
     '"id" must be a string'),  # parses (orjson reads 1,024 levels) but could not be echoed
    ("/v2/models/nope/infer", infer_body(GOOD), 404, "unknown task 'nope'; serving: t0, t1"),
    ("/v2/models/t0/explain", infer_body(GOOD), 404, "no such endpoint: POST"),
])
def test_bad_requests_get_a_4xx_that_says_why_and_the_server_lives_on(repo, path, body, status,
                                                                      message):
    with running(repo) as server:
        conn = connect(server)
        got, answer, _ = request(conn, "POST", path, body)
        assert got == status and message in answer["error"]
        assert request(conn, "POST", "/v2/models/t0/infer", infer_body(GOOD))[0] == 200
        assert metric(server, f'edgecl_requests_total{{task="",code="{status}"}}') + metric(
            server, f'edgecl_requests_total{{task="t0",code="{status}"}}') == 1


def binary_request(x, binary_output):
    """Triton's binary tensor extension: a JSON header, then the raw float32 values."""
    header = json.dumps({
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": binary_output}}).encode()
    return header + x.astype("<f4").tobytes(), {BINARY_HEADER: str(len(header))}


def test_binary_tensors_in_and_out(repo, learner):
    x = torch.rand(3, 1, 4, 4)
    expected = learner.predict(x, "t1").numpy()
    with running(repo) as server:
        conn = connect(server)
        body, headers = binary_request(x.numpy(), binary_output=True)
        conn.request("POST", "/v2/models/t1/infer", body, headers)
        response = conn.getresponse()
        data = response.read()
        n = int(response.getheader(BINARY_HEADER))
        output = json.loads(data[:n])["outputs"][0]
        assert output["parameters"] == {"binary_data_size": 3 * 3 * 4}
        logits = np.frombuffer(data[n:], "<f4").reshape(output["shape"])
        np.testing.assert_allclose(logits, expected, atol=1e-5)
        body, headers = binary_request(x.numpy(), binary_output=False)
        status, answer, _ = request(conn, "POST", "/v2/models/t1/infer", body, headers)
        assert status == 200
        np.testing.assert_allclose(answer["outputs"][0]["data"], expected.ravel(), atol=1e-5)
        status, answer, _ = request(conn, "POST", "/v2/models/t1/infer", body[:-4], headers)
        assert status == 400 and "binary_data_size 192 must equal the 188 bytes" in answer["error"]
        for length in (str(len(body) + 1), "²"):  # "²".isdigit() but int("²") fails
            status, answer, _ = request(conn, "POST", "/v2/models/t1/infer", body,
                                        {BINARY_HEADER: length})
            assert status == 400 and "is not a length within" in answer["error"]


def raw_exchange(server, data: bytes) -> bytes:
    with socket.create_connection(server.socket.getsockname()[:2], timeout=WAIT_S) as s:
        s.sendall(data)
        return s.recv(65536)


def test_oversized_bodies_are_refused_and_malformed_http_answered(repo):
    with running(repo, max_body_bytes=1024) as server:
        conn = connect(server)
        status, answer, response = request(conn, "POST", "/v2/models/t0/infer", b"x" * 2000)
        assert status == 413 and "over the limit of 1,024 bytes" in answer["error"]
        assert response.getheader("Connection") == "close"
        chunked = (b"POST /v2/models/t0/infer HTTP/1.1\r\nHost: x\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n"
                   b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n")
        assert raw_exchange(server, chunked).startswith(b"HTTP/1.1 413")
        assert raw_exchange(server, b"GET / / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")
        assert request(connect(server), "GET", "/v2/health/live")[0] == 200


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("PUT", "/v2/models/t0/infer", "POST"),
    ("DELETE", "/v2/models/t0", "GET"),
    ("HEAD", "/v2/health/ready", "GET"),
])
def test_other_methods_get_405_with_allow(repo, method, path, allow):
    with running(repo) as server:
        conn = connect(server)
        conn.request(method, path)
        response = conn.getresponse()
        response.read()
        assert response.status == 405 and response.getheader("Allow") == allow


def test_requests_share_one_keep_alive_connection(repo):
    with running(repo) as server:
        assert server.socket.proto == socket.IPPROTO_TCP  # else asyncio leaves Nagle on
        conn = connect(server)
        request(conn, "GET", "/v2/health/live")
        sock = conn.sock
        for _ in range(3):
            assert request(conn, "POST", "/v2/models/t0/infer", infer_body(GOOD))[0] == 200
        assert conn.sock is sock


def test_a_bearer_token_guards_everything_but_health(repo):
    with running(repo, token="s3cret") as server:
        conn = connect(server)
        status, _, response = request(conn, "POST", "/v2/models/t0/infer", infer_body(GOOD))
        assert status == 401 and response.getheader("WWW-Authenticate") == "Bearer"
        wrong = {"Authorization": "Bearer nope"}
        assert request(connect(server), "GET", "/metrics", headers=wrong)[0] == 401
        assert request(connect(server), "GET", "/v2/health/ready")[0] == 200
        with Client(server.url, token="s3cret") as client:
            assert client.infer("t0", GOOD).shape == (1, 3)
        for given in ("bearer s3cret", "BEARER  s3cret"):  # RFC 9110: scheme case-insensitive
            assert request(connect(server), "GET", "/metrics",
                           headers={"Authorization": given})[0] == 200
        for given in ("Bearers3cret", "Basic s3cret", "Bearer s3cre"):
            assert request(connect(server), "GET", "/metrics",
                           headers={"Authorization": given})[0] == 401


def test_an_ipv6_address_is_announced_in_brackets(repo):
    try:
        with running(repo, host="::1") as server, Client(server.url) as client:
            assert re.fullmatch(r"http://\[::1\]:\d+", server.url) and client.ready()
    except ListenError:
        pytest.skip("no IPv6 loopback here")


@contextlib.contextmanager
def infer_in_background(server, task, x):
    """A thread inferring `x` on `task` without pause; yields the status of every answer."""
    statuses, stop = [], threading.Event()

    def load() -> None:
        with Client(server.url) as client:
            while not stop.is_set():
                try:
                    client.infer(task, x.numpy())
                    statuses.append(200)
                except ServeError as e:
                    statuses.append(e.status)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        yield statuses
    finally:
        stop.set()
        worker.join(WAIT_S)


def no_request_fails_while(server, task, x, change, done, what):
    """Infer `x` on `task` without pause while `change()` runs and until `done()`: every answer
    before, during and after it is a 200."""
    with infer_in_background(server, task, x) as statuses:
        wait_for(lambda: len(statuses) >= 5, f"requests before {what}")
        change()
        wait_for(done, what)
        n = len(statuses)
        wait_for(lambda: len(statuses) >= n + 5, f"requests after {what}")
    assert set(statuses) == {200}


def test_a_new_version_is_swapped_in_without_failing_a_request(repo, learner):
    x = torch.rand(3, 1, 4, 4)
    with running(repo) as server:
        no_request_fails_while(  # t0's version 2 computes what t1 does
            server, "t0", x, lambda: republish(repo, repo / "t1" / "1", "t0"),
            lambda: server.models.get("t0").version == 2, "the reload to version 2")
        with Client(server.url) as client:
            np.testing.assert_allclose(client.infer("t0", x.numpy()),
                                       learner.predict(x, "t1").numpy(), atol=1e-5)
        assert metric(server, 'edgecl_model_version{task="t0"}') == 2
        assert metric(server, 'edgecl_model_reloads_total{task="t0"}') == 1
        republish(repo, repo / "t0" / "1", "t9")  # a new task appears too
        wait_for(lambda: server.models.get("t9") is not None, "the new task")


def corrupt(repo, kind):
    """Version 2 of t0, broken in one way; returns the refusal reason expected."""
    source = repo / "t1" / "1"
    if kind == "sha256":
        republish(repo, source, "t0", sha256="0" * 64)
    elif kind == "load":
        junk = b"not an onnx graph"
        republish(repo, source, "t0", model=junk, sha256=repository.sha256_of(junk))
    elif kind == "verify":
        probe = repository.read_manifest(source).probe
        wrong = [[v + 1.0 for v in row] for row in probe.logits]
        republish(repo, source, "t0", probe={**probe.model_dump(), "logits": wrong})
    else:
        place(repo, source, "t0", 2, manifest="{not json")
    return kind


@pytest.mark.parametrize("kind", ["sha256", "load", "verify", "manifest"])
def test_a_corrupt_version_is_refused_and_the_old_one_keeps_serving(repo, learner, kind):
    x = torch.rand(2, 1, 4, 4)
    with running(repo) as server, Client(server.url) as client:
        reason = corrupt(repo, kind)
        refused = f'edgecl_model_refused_total{{task="t0",reason="{reason}"}}'
        wait_for(lambda: metric(server, refused) == 1, f"refusal for {reason}")
        time.sleep(0.2)  # several more polls: a refused version is not retried
        assert metric(server, refused) == 1
        assert server.models.get("t0").version == 1
        np.testing.assert_allclose(client.infer("t0", x.numpy()),
                                   learner.predict(x, "t0").numpy(), atol=1e-5)
        republish(repo, repo / "t0" / "1", "t0")  # a good version 3 still gets through
        wait_for(lambda: server.models.get("t0").version == 3, "version 3")


def test_at_start_a_corrupt_newest_version_falls_back_to_the_previous(repo):
    corrupt(repo, "sha256")
    with running(repo) as server:
        assert server.models.get("t0").version == 1
        assert metric(server, 'edgecl_model_refused_total{task="t0",reason="sha256"}') == 1
        assert metric(server, 'edgecl_model_version{task="t0"}') == 1


def unreadable(repo, kind):
    """Version 2 of t0 that once raised OSError or ValueError while loading; returns the
    refusal reason expected."""
    source = repo / "t1" / "1"
    if kind == "manifest folder":
        place(repo, source, "t0", 2, manifest="folder")
        return "manifest"
    if kind == "negative shape":
        place(repo, source, "t0", 2, input={"name": "input", "shape": [-1, -1, 4, 4]})
        return "verify"
    probe = repository.read_manifest(source).probe.model_dump()
    place(repo, source, "t0", 2, probe={**probe, "logits": [[0.0], *probe["logits"][1:]]})
    return "manifest"


UNREADABLE = ["manifest folder", "negative shape", "ragged probe"]


@pytest.mark.parametrize("kind", UNREADABLE)
def test_an_unreadable_version_is_refused_and_other_tasks_still_reload(repo, kind):
    with running(repo) as server:
        reason = unreadable(repo, kind)
        republish(repo, repo / "t1" / "1", "t1")  # scanned after t0's bad version 2
        wait_for(lambda: server.models.get("t1").version == 2, "t1's version 2")
        refused = f'edgecl_model_refused_total{{task="t0",reason="{reason}"}}'
        wait_for(lambda: metric(server, refused) == 1, f"refusal for {reason}")
        time.sleep(0.2)  # several more polls: it is not retried
        assert metric(server, refused) == 1 and server.models.get("t0").version == 1


@pytest.mark.parametrize("kind", UNREADABLE)
def test_at_start_an_unreadable_version_is_refused(repo, kind):
    reason = unreadable(repo, kind)
    with running(repo) as server:
        assert server.models.get("t0").version == 1 and server.models.get("t1").version == 1
        assert metric(server, f'edgecl_model_refused_total{{task="t0",reason="{reason}"}}') == 1


def test_only_ascii_digit_folders_are_versions(tmp_path):
    for name in ("1", "3", "0", "²", "١", ".staging-5"):
        (tmp_path / "t0" / name).mkdir(parents=True)
    assert repository.versions(tmp_path, "t0") == [1, 3]


def test_metrics_count_requests_and_latencies(repo):
    with running(repo) as server:
        conn = connect(server)
        for _ in range(3):
            request(conn, "POST", "/v2/models/t1/infer", infer_body(GOOD))
        status, text, response = request(conn, "GET", "/metrics")
        assert status == 200 and response.getheader("Content-Type") == CONTENT_TYPE_LATEST
        got = samples(text)
        assert got["edgecl_requests_total", frozenset({("task", "t1"), ("code", "200")})] == 3
        assert got["edgecl_inference_seconds_count", frozenset({("task", "t1")})] == 3
        assert got["edgecl_request_seconds_bucket",
                   frozenset({("task", "t1"), ("le", "+Inf")})] == 3
        assert got["edgecl_model_version", frozenset({("task", "t0")})] == 1
        assert got["edgecl_up_seconds", frozenset()] > 0
        assert not [name for name, _ in got if name.endswith("_created")]
        assert "(request received, before its body is read, to response sent)" in text


def test_metrics_up_seconds_is_computed_at_scrape_time():
    metrics = ServerMetrics()
    first = samples(metrics.render().decode())["edgecl_up_seconds", frozenset()]
    time.sleep(0.01)
    assert samples(metrics.render().decode())["edgecl_up_seconds", frozenset()] > first


def test_histogram_buckets_are_cumulative_and_bounds_inclusive():
    metrics = ServerMetrics()
    for seconds in (0.0001, 0.0003, 7.0):
        metrics.inference("t", seconds)
    (family,) = [f for f in text_string_to_metric_families(metrics.render().decode())
                 if f.name == "edgecl_inference_seconds"]
    assert family.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert buckets["0.0001"] == 1  # the bound is inclusive
    assert buckets["0.00025"] == 1
    assert buckets["0.0005"] == 2  # and counts are cumulative
    assert buckets["1.0"] == 2
    other = {s.name: s.value for s in family.samples if not s.name.endswith("_bucket")}
    assert buckets["+Inf"] == 3 == other["edgecl_inference_seconds_count"]
    assert math.isclose(other["edgecl_inference_seconds_sum"], 7.0004)


def test_providers_are_chosen_by_availability_or_as_asked():
    assert choose_providers()[-1] == "CPUExecutionProvider"
    assert choose_providers(["cpu"]) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match=r"NopeExecutionProvider not available.*CPUExecution"):
        choose_providers(["NopeExecutionProvider"])


def test_cli_serves_until_sigterm(repo):
    edgecl = Path(sys.executable).parent / "edgecl"
    proc = subprocess.Popen([str(edgecl), "serve", "--repo", str(repo), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "listening on" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        url = re.search(r"listening on (http://[\d.]+:\d+)", line)
        assert url, f"no address announced: {line!r}"
        with Client(url[1]) as client:
            assert client.ready() and client.infer("t0", GOOD).shape == (1, 3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


@pytest.mark.parametrize(("args", "message"), [
    (["--repo", "/nonexistent"], "no such model repository"),
    (["--providers", "nope"], "nope not available"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(repo, args, message):
    r = CliRunner().invoke(app, ["serve", "--repo", str(repo), "--port", "0", *args])
    assert r.exit_code == 2 and message in r.output


def test_cli_says_cannot_listen_only_when_the_socket_cannot_bind(repo, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(app, ["serve", "--repo", str(repo), "--port", str(port)])
    assert r.exit_code == 2
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in r.output

    def unlistable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(repository, "tasks", unlistable)
    r = CliRunner().invoke(app, ["serve", "--repo", str(repo), "--port", "0"])
    assert r.exit_code == 2
    assert f"error: {repo}: cannot read the model repository (Permission denied)" in r.output
    assert "cannot listen" not in r.output


def test_cli_refuses_a_token_file_that_is_not_utf8(repo, tmp_path):
    (tmp_path / "token").write_bytes(b"\xff\xfesecret")
    r = CliRunner().invoke(app, ["serve", "--repo", str(repo), "--port", "0",
                                 "--token-file", str(tmp_path / "token")])
    assert r.exit_code == 2 and "token: the token file is not UTF-8 text" in r.output


# --- model rollback: a version marked BAD or removed stops serving within one poll ---------------


def polled_by_hand(repo):
    """A server whose poller never fires on its own: each `server.models.refresh()` is one poll."""
    return running(repo, poll_s=3600.0)


def mark_bad(repo, task, version, reason=""):
    (repo / task / str(version) / "BAD").write_text(reason)


@pytest.mark.parametrize("how", ["BAD file", "folder removed"])
def test_rolling_the_serving_version_back_serves_the_previous_within_one_poll(repo, learner,
                                                                              how):
    x = torch.rand(3, 1, 4, 4)
    republish(repo, repo / "t1" / "1", "t0")  # t0's version 2 computes what t1 does
    with polled_by_hand(repo) as server, Client(server.url) as client:
        assert server.models.get("t0").version == 2
        np.testing.assert_allclose(client.infer("t0", x.numpy()),
                                   learner.predict(x, "t1").numpy(), atol=1e-5)
        if how == "BAD file":
            mark_bad(repo, "t0", 2, "accuracy fell on site B\n")
        else:
            shutil.rmtree(repo / "t0" / "2")
        server.models.refresh()  # one poll
        assert server.models.get("t0").version == 1
        np.testing.assert_allclose(client.infer("t0", x.numpy()),
                                   learner.predict(x, "t0").numpy(), atol=1e-5)
        assert client.metadata("t0")["versions"] == ["1"]
        assert metric(server, 'edgecl_model_version{task="t0"}') == 1
        assert server.models.get("t1").version == 1  # other tasks untouched
        server.models.refresh()  # and it stays there
        assert server.models.get("t0").version == 1


def test_the_poller_rolls_back_while_requests_run_and_none_fails(repo, learner):
    x = torch.rand(2, 1, 4, 4)
    republish(repo, repo / "t1" / "1", "t0")
    with running(repo) as server:
        no_request_fails_while(
            server, "t0", x, lambda: mark_bad(repo, "t0", 2),
            lambda: server.models.get("t0").version == 1, "the rollback to version 1")
        with Client(server.url) as client:
            np.testing.assert_allclose(client.infer("t0", x.numpy()),
                                       learner.predict(x, "t0").numpy(), atol=1e-5)


def test_rollback_skips_older_versions_that_are_bad_or_refused(repo):
    corrupt(repo, "sha256")  # t0 version 2: refused
    republish(repo, repo / "t0" / "1", "t0")  # version 3: good
    republish(repo, repo / "t0" / "1", "t0")  # version 4: good
    with polled_by_hand(repo) as server:
        assert server.models.get("t0").version == 4
        mark_bad(repo, "t0", 3)
        mark_bad(repo, "t0", 4)
        server.models.refresh()
        assert server.models.get("t0").version == 1  # 4 and 3 BAD, 2 refused
        assert metric(server, 'edgecl_model_refused_total{task="t0",reason="sha256"}') == 1


def test_a_task_with_no_good_version_left_stops_being_served(repo):
    with polled_by_hand(repo) as server:
        conn = connect(server)
        mark_bad(repo, "t1", 1)
        server.models.refresh()
        assert server.models.get("t1") is None and server.models.get("t0").version == 1
        assert metric(server, 'edgecl_model_version{task="t1"}') == 0  # the gauge is gone
        assert metric(server, 'edgecl_model_version{task="t0"}') == 1
        status, answer, _ = request(conn, "POST", "/v2/models/t1/infer", infer_body(GOOD))
        assert status == 404 and "serving: t0" in answer["error"]
        assert request(conn, "GET", "/v2/health/ready")[0] == 200  # t0 still serves
        shutil.rmtree(repo / "t0")  # the whole task folder
        server.models.refresh()
        assert server.models.all() == {}
        assert request(conn, "GET", "/v2/health/ready")[:2] == (503, {"ready": False})
        (repo / "t1" / "1" / "BAD").unlink()  # un-marked: served again at the next poll
        server.models.refresh()
        assert server.models.get("t1").version == 1


def test_a_version_marked_bad_is_not_served_at_start_and_newer_ones_still_are(repo):
    republish(repo, repo / "t0" / "1", "t0")
    mark_bad(repo, "t0", 2)
    with polled_by_hand(repo) as server:
        assert server.models.get("t0").version == 1
        published = republish(repo, repo / "t0" / "1", "t0")
        assert published.version == 3  # a version marked BAD keeps its number taken
        server.models.refresh()
        assert server.models.get("t0").version == 3


def test_a_repository_folder_that_vanishes_is_no_rollback(repo, tmp_path):
    with polled_by_hand(repo) as server:
        repo.rename(tmp_path / "elsewhere")  # an unmounted disk, say
        server.models.refresh()
        assert sorted(server.models.all()) == ["t0", "t1"]
        (tmp_path / "elsewhere").rename(repo)
        mark_bad(repo, "t0", 1)
        server.models.refresh()
        assert sorted(server.models.all()) == ["t1"]


OUT_OF_RANGE = 'edgecl_input_out_of_range_total{task="t0"}'


def infer_status(server, x):
    with contextlib.closing(connect(server)) as conn:
        return request(conn, "POST", "/v2/models/t0/infer", infer_body(x))[:2]


def test_pixels_sent_unscaled_are_refused_by_default_and_jitter_is_not(repo):
    lo, hi = repository.read_manifest(repo / "t0" / "1").input_range
    x = np.random.default_rng(0).uniform(lo, hi, (2, 1, 4, 4)).astype(np.float32)
    jitter = x.copy()
    jitter.flat[0], jitter.flat[1] = lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)
    with running(repo) as server:
        assert infer_status(server, jitter)[0] == 200
        status, body = infer_status(server, np.round(x * 255))
        assert status == 400
        assert f"[{lo:.4g}, {hi:.4g}]" in body["error"] and "trained on" in body["error"]
        assert metric(server, OUT_OF_RANGE) == 1


def test_the_range_guard_can_warn_or_be_off(repo, caplog):
    pixels = np.full((1, 1, 4, 4), 200.0, np.float32)
    with running(repo, input_range="warn") as server, caplog.at_level(logging.WARNING):
        assert [infer_status(server, pixels)[0] for _ in range(3)] == [200] * 3
        assert metric(server, OUT_OF_RANGE) == 3
        assert caplog.text.count("outside the range task 't0' was trained on") == 1
    with running(repo, input_range="off") as server:
        assert infer_status(server, pixels)[0] == 200
        assert metric(server, OUT_OF_RANGE) == 0


@pytest.mark.parametrize("options, message", [({"input_range": "strict"}, "use one of off"),
                                              ({"range_tolerance": -1}, "a number >= 0")])
def test_a_bad_range_guard_setting_is_refused(repo, options, message):
    with pytest.raises(ValueError, match=message):
        create_server(repo, port=0, **options)


# --- bounded growth: old versions pruned -------------------------------------------------------


def versions_made(tmp_path, n, bad=()):
    for v in range(1, n + 1):
        (tmp_path / "t0" / str(v)).mkdir(parents=True)
        if v in bad:
            mark_bad(tmp_path, "t0", v)
    return tmp_path


def test_prune_keeps_the_newest_versions_and_removes_the_rest(tmp_path):
    repo = versions_made(tmp_path, 8)
    (repo / "t0" / ".pruning-leftover" / "x").mkdir(parents=True)  # a prune cut short
    (repo / "t0" / ".staging-other").mkdir()  # an export's: not prune's to remove
    assert repository.prune(repo, "t0", keep=3) == [1, 2, 3, 4, 5]
    assert repository.versions(repo, "t0") == [6, 7, 8]
    assert sorted(p.name for p in (repo / "t0").iterdir()) == [".staging-other", "6", "7", "8"]
    assert repository.prune(repo, "t0", keep=3) == []
    assert repository.prune(repo, "t0", keep=1) == [6, 7]
    assert repository.prune(repo, "nope") == []
    with pytest.raises(ValueError, match="at least its newest version"):
        repository.prune(repo, "t0", keep=0)


def test_prune_keeps_what_a_server_rolled_back_to_and_what_is_serving(tmp_path):
    repo = versions_made(tmp_path, 8, bad={7, 8})
    assert repository.prune(repo, "t0", keep=2) == [1, 2, 3, 4]  # 7, 8 BAD: 5, 6 stay too
    repo = versions_made(tmp_path / "b", 8, bad={4, 5, 6, 7, 8})
    assert repository.prune(repo, "t0", keep=3) == []  # the good ones are 1-3
    repo = versions_made(tmp_path / "c", 6)
    assert repository.prune(repo, "t0", keep=2, serving=[3]) == [1, 2]
    assert repository.prune(repo, "t0", keep=repository.DEFAULT_KEEP) == []


def test_a_server_keeps_serving_while_old_versions_are_pruned(repo):
    for _ in range(6):
        republish(repo, repo / "t0" / "1", "t0")
    with polled_by_hand(repo) as server:
        assert server.models.get("t0").version == 7
        assert repository.prune(repo, "t0", keep=3) == [1, 2, 3, 4]
        server.models.refresh()
        assert server.models.get("t0").version == 7
        assert request(connect(server), "POST", "/v2/models/t0/infer", infer_body(GOOD))[0] == 200
        mark_bad(repo, "t0", 7)
        server.models.refresh()
        assert server.models.get("t0").version == 6
        assert republish(repo, repo / "t0" / "5", "t0").version == 8  # numbers keep rising
