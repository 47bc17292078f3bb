"""The HTTP stack both services share (edgecl.web): slow bodies, the connection limit, TLS, and
large bodies parsed off the event loop. Exercised through `edgecl serve`."""

import http.client
import socket
import ssl
import subprocess
import threading

import numpy as np
import pytest
from test_serve import GOOD, exported, infer_body, repo, request, running, wait_for  # noqa: F401

from edgecl import web
from edgecl.web import HTTPServer, ListenError


def test_a_body_that_does_not_arrive_in_time_is_a_408(repo, monkeypatch):  # noqa: F811
    monkeypatch.setattr(web, "BODY_TIMEOUT_S", 0.5)
    with running(repo) as server:
        host, port = server.socket.getsockname()[:2]
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"POST /v2/models/t0/infer HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"inputs\"")  # and then nothing
            answer = sock.recv(4096).decode()
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in answer


def test_connections_beyond_the_limit_get_a_503_not_memory(repo):  # noqa: F811
    with running(repo) as server:
        server._uvicorn.config.limit_concurrency = 2  # as if --max-connections were 2
        host, port = server.socket.getsockname()[:2]
        idle = [socket.create_connection((host, port), timeout=10) for _ in range(2)]
        try:
            wait_for(lambda: len(server._uvicorn.server_state.connections) >= 2, "2 open")
            conn = http.client.HTTPConnection(host, port, timeout=10)
            assert request(conn, "GET", "/v2/health/live")[0] == 503
        finally:
            for sock in idle:
                sock.close()
        wait_for(lambda: len(server._uvicorn.server_state.connections) == 0, "all closed")
        conn = http.client.HTTPConnection(host, port, timeout=10)
        assert request(conn, "GET", "/v2/health/live")[0] == 200


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True,
                       capture_output=True)
    except FileNotFoundError:
        pytest.skip("openssl is not installed")
    return cert, key


def test_tls_serves_https_and_refuses_plain_http(repo, certificate):  # noqa: F811
    with running(repo, tls=certificate, token="s3cret") as server:
        assert server.url.startswith("https://127.0.0.1:")
        host, port = server.socket.getsockname()[:2]
        context = ssl.create_default_context(cafile=str(certificate[0]))
        conn = http.client.HTTPSConnection(host, port, timeout=10, context=context)
        status, answer, _ = request(conn, "POST", "/v2/models/t0/infer", infer_body(GOOD),
                                    {"Authorization": "Bearer s3cret"})
        assert status == 200 and answer["outputs"][0]["shape"] == [1, 3]
        plain = http.client.HTTPConnection(host, port, timeout=10)
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            request(plain, "GET", "/v2/health/live")


def test_a_bad_certificate_is_a_listen_error(tmp_path):
    (tmp_path / "c.pem").write_text("not a certificate")
    with pytest.raises(ListenError, match="TLS certificate"):
        HTTPServer(lambda *a: None, port=0, tls=(tmp_path / "c.pem", tmp_path / "c.pem"))


def test_a_large_body_is_parsed_off_the_loop_and_answered_the_same(repo):  # noqa: F811
    big = np.full((4000, 1, 4, 4), 0.5, dtype=np.float32)  # about 300 KB of JSON
    with running(repo) as server:
        host, port = server.socket.getsockname()[:2]
        probes = []

        def probe() -> None:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            probes.append(request(conn, "GET", "/v2/health/live")[0])

        conn = http.client.HTTPConnection(host, port, timeout=30)
        thread = threading.Thread(target=probe)
        thread.start()
        status, answer, _ = request(conn, "POST", "/v2/models/t0/infer", infer_body(big))
        thread.join(10)
        assert status == 200 and answer["outputs"][0]["shape"] == [4000, 3]
        small = request(conn, "POST", "/v2/models/t0/infer", infer_body(GOOD))[1]
        assert answer["outputs"][0]["data"][:3] == small["outputs"][0]["data"]
        assert probes == [200]
