"""`edgecl serve` under load from a second process: wrk over loopback, keep-alive, batch 1.

    apt-get install -y wrk
    .venv/bin/python benchmarks/serve_load.py [--checkpoint CKPT --task T] [--seconds 10]

Exports the task's model (default: GEM's MLP 2x100 on pmnist, untrained: the same cost) into a
temp repository, starts `edgecl serve` on 127.0.0.1 in a subprocess, then measures:
  - onnxruntime alone, in this process with the server's session settings: p50 per batch-1 call;
  - wrk, 1 connection: p50 / p99 latency (wrk --latency);
  - wrk, 8 connections: requests/s;
  - the server's overhead: HTTP p50 - onnxruntime p50.
Each wrk run is bounded by --seconds; the server is stopped at the end. `--server threaded` runs
the same request handling (edgecl.serve.kserve) in the standard library's ThreadingHTTPServer
with keep-alive instead: the alternative `edgecl serve`'s uvicorn + httptools was measured
against.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from edgecl.checkpoint import save_checkpoint
from edgecl.export import Exporter
from edgecl.learners import LearnerSpec, build_learner
from edgecl.serve.runtime import load_model
from edgecl.setup import load_config

LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = io.open("{body}", "rb"):read("*a")
"""
THREADED_APP = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from edgecl.serve.kserve import encode_response, parse_request
from edgecl.web import RequestError
from edgecl.serve.runtime import load_model

model = load_model(Path(sys.argv[1]), ["CPUExecutionProvider"], threads=1)

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    wbufsize = 1 << 16

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            request = parse_request(body, None, model.manifest.input)
            status, data = 200, encode_response(model.manifest, model.infer(request.x), request)[0]
        except RequestError as e:
            status, data = e.status, str(e).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
server.daemon_threads = True
print("listening on http://127.0.0.1:%s" % sys.argv[2], file=sys.stderr, flush=True)
server.serve_forever()
"""
PMNIST_SHAPE, PMNIST_CLASSES = (1, 28, 28), 10


def export_model(checkpoint: str | None, task: str | None, repo: Path, body: str
                 ) -> tuple[Path, np.ndarray]:
    """Export the task's model into `repo`; returns its version folder and a batch-1 input:
    the task's first test sample (`body` "real") or uniform noise ("random", the worst case for
    JSON: every value has 17 digits, none is 0)."""
    if checkpoint is None:  # an untrained MLP of models/finetune.yaml costs what a trained one does
        cfg = load_config("models/finetune.yaml", {"device": "cpu"})
        learner = build_learner(LearnerSpec(cfg, PMNIST_SHAPE, PMNIST_CLASSES, "shared", 1))
        learner.register_task("task00")
        checkpoint = str(repo.parent / "checkpoint.pt")
        save_checkpoint(checkpoint, learner)
    exporter = Exporter(Path(checkpoint))
    task = task or exporter.tasks[0]
    m = exporter.export(task, repo)
    test = exporter.real_inputs(task).task
    if body == "real" and test is None:
        raise SystemExit(f"no test set for {task}: use --body random")
    shape = (1, *m.input.shape[1:])
    x = (test.x_test[:1].numpy() if body == "real"
         else np.random.default_rng(0).random(shape, dtype=np.float32))
    return repo / m.task / str(m.version), x


@contextlib.contextmanager
def server(kind: str, repo: Path, version_dir: Path, port: int) -> Iterator[tuple[str, int]]:
    """Start the server in a subprocess; yields its URL and pid; stops it on exit."""
    if kind == "edgecl":
        edgecl = Path(sys.executable).parent / "edgecl"
        cmd = [str(edgecl), "serve", "--repo", str(repo), "--port", str(port), "--threads", "1"]
    else:
        cmd = [sys.executable, "-c", THREADED_APP, str(version_dir), str(port)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"listening on (http://[\d.]+:\d+)", proc.stderr.readline())
            url = found and found[1]
        if url is None or not _accepts(port):
            raise SystemExit(f"the server did not start: {' '.join(cmd)}")
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.stderr.close()


def _accepts(port: int, wait_s: float = 30.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        time.sleep(0.05)
    return False


def infer_over_http(url: str, body: bytes) -> np.ndarray:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("POST", parts.path, body, {"Content-Type": "application/json"})
    out = json.loads(conn.getresponse().read())["outputs"][0]
    conn.close()
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def onnxruntime_p50_us(version_dir: Path, x: np.ndarray, calls: int = 20000) -> float:
    model = load_model(version_dir, ["CPUExecutionProvider"], threads=1)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        model.infer(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[calls // 10:]) * 1e6


def wrk(url: str, script: Path, connections: int, seconds: float, threads: int = 1
        ) -> dict[str, float]:
    """One wrk run: latency percentiles and maximum in microseconds, requests/s, non-2xx
    responses and socket errors (connect, read, write, timeout) counted."""
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections), "-d",
                          f"{seconds:g}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True,
                         timeout=seconds + 60).stdout
    result = {f"p{q}_us": _us(re.search(rf"^\s+{q}%\s+(\S+)", out, re.MULTILINE)[1])
              for q in (50, 90, 99)}
    result["max_us"] = _us(re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)[1])
    result["requests_per_s"] = float(re.search(r"Requests/sec:\s+(\S+)", out)[1])
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non_2xx"] = int(errors[1]) if errors else 0
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    result["socket_errors"] = sum(map(int, socket.groups())) if socket else 0
    return result


def _us(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1, "ms": 1e3, "s": 1e6, "m": 6e7}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--task")
    parser.add_argument("--seconds", type=float, default=10.0, help="per wrk run")
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--server", choices=["edgecl", "threaded"], default="edgecl")
    parser.add_argument("--body", choices=["real", "random"], default="real")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        version_dir, x = export_model(args.checkpoint, args.task, repo, args.body)
        task = version_dir.parent.name
        # written as a generic client's json module writes it: float64 reprs
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}]}
        (Path(tmp) / "body.json").write_text(json.dumps(body))
        script = Path(tmp) / "post.lua"
        script.write_text(LUA.format(body=Path(tmp) / "body.json"))

        ort_p50 = onnxruntime_p50_us(version_dir, x)
        with server(args.server, repo, version_dir, args.port) as (url, _):
            target = f"{url}/v2/models/{task}/infer"
            model = load_model(version_dir, ["CPUExecutionProvider"])  # right before fast:
            np.testing.assert_allclose(infer_over_http(target, json.dumps(body).encode()),
                                       model.infer(x), atol=1e-5)
            one = wrk(target, script, 1, args.seconds)
            eight = wrk(target, script, 8, args.seconds)
    if one["socket_errors"] or eight["socket_errors"]:
        raise SystemExit(f"wrk saw socket errors: {one['socket_errors']} with 1 client, "
                         f"{eight['socket_errors']} with 8")
    report = {
        "server": args.server, "task": task, "body": args.body,
        "body_bytes": len(json.dumps(body)),
        "onnxruntime_p50_us": round(ort_p50, 1),
        "c1": one, "c8": eight,
        "server_overhead_p50_us": round(one["p50_us"] - ort_p50, 1),
    }
    print(f"onnxruntime p50 {ort_p50:.1f} us | 1 client: p50 {one['p50_us']:.0f} us, "
          f"p99 {one['p99_us']:.0f} us, {one['requests_per_s']:.0f} req/s | 8 clients: "
          f"{eight['requests_per_s']:.0f} req/s, p99 {eight['p99_us']:.0f} us | "
          f"overhead p50 {report['server_overhead_p50_us']:.0f} us")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
