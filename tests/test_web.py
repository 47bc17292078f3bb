"""The HTTP stack both services share (edgecl.web): slow bodies and heads, the connection
limits, TLS, and large bodies parsed off the event loop. Exercised through `edgecl serve`;
floods of connections are tests/test_connection_flood.py's."""

import http.client
import socket
import ssl
import subprocess
import threading

import numpy as np
import pytest
from test_serve import (  # noqa: F401
    GOOD,
    connect,
    exported,
    infer_body,
    repo,
    request,
    running,
    wait_for,
)

from edgecl import web
from edgecl.web import HTTPServer, ListenError


def read_until_closed(sock: socket.socket) -> str:
    """Everything the server sends until it closes the connection (an answer may come in
    several packets)."""
    received = []
    while chunk := sock.recv(4096):
        received.append(chunk)
    return b"".join(received).decode()


def test_a_body_that_does_not_arrive_in_time_is_a_408(repo, monkeypatch):  # noqa: F811
    monkeypatch.setattr(web, "BODY_TIMEOUT_S", 0.5)
    with running(repo) as server:
        host, port = server.socket.getsockname()[:2]
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"POST /v2/models/t0/infer HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"inputs\"")  # and then nothing
            answer = read_until_closed(sock)
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in answer


def slow_posts(server, n):
    """`n` connections each holding an infer request in flight: head sent, body not."""
    host, port = server.socket.getsockname()[:2]
    socks = []
    for _ in range(n):
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(b"POST /v2/models/t0/infer HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        socks.append(sock)
    wait_for(lambda: server.guard.busy >= n, f"{n} requests in flight")
    return socks


def test_requests_beyond_the_limit_in_flight_get_a_503_but_health_probes_do_not(repo):  # noqa: F811
    with running(repo) as server:
        server.guard.max_connections = server.guard.max_per_client = 2  # --max-connections 2
        busy = slow_posts(server, 2)
        try:
            status, _, response = request(connect(server), "GET", "/v2")
            assert status == 503 and response.getheader("Connection") == "close"
            assert request(connect(server), "GET", "/v2/health/live")[0] == 200
            assert request(connect(server), "GET", "/v2/health/ready")[0] == 200
            assert server.guard.shed == 1
        finally:
            for sock in busy:
                sock.close()
        wait_for(lambda: server.guard.busy == 0, "the requests to end")
        assert request(connect(server), "GET", "/v2")[0] == 200


def test_one_client_address_gets_half_the_requests_in_flight(repo):  # noqa: F811
    with running(repo) as server:
        server.guard.max_connections, server.guard.max_per_client = 4, 2
        busy = slow_posts(server, 2)
        try:  # all from 127.0.0.1: its share is taken
            assert request(connect(server), "GET", "/v2")[0] == 503
        finally:
            for sock in busy:
                sock.close()


def test_an_idle_keep_alive_connection_is_closed_at_the_idle_timeout(repo, monkeypatch):  # noqa: F811
    monkeypatch.setattr(web, "IDLE_TIMEOUT_S", 0.3)
    with running(repo) as server:
        conn = connect(server)
        assert request(conn, "GET", "/v2/health/live")[0] == 200
        sock = conn.sock
        sock.settimeout(10)
        assert sock.recv(1) == b""  # closed by the server
        assert server.guard.closed["idle_timeout"] == 1


def test_a_head_sent_in_part_gets_a_408_at_the_head_timeout(repo):  # noqa: F811
    with running(repo, head_timeout_s=0.3) as server:
        host, port = server.socket.getsockname()[:2]
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # no blank line
            answer = read_until_closed(sock)
            assert answer.startswith("HTTP/1.1 408")
            assert "the request head did not arrive within 0.3 s" in answer
        conn = connect(server)  # a second request on a keep-alive connection: its head too
        assert request(conn, "GET", "/v2/health/live")[0] == 200
        conn.sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        conn.sock.settimeout(10)
        assert conn.sock.recv(4096).startswith(b"HTTP/1.1 408")
        wait_for(lambda: server.guard.closed["head_timeout"] == 2, "2 closed")


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
    with running(repo, max_batch=4000) as server:
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


def test_a_batch_over_the_row_limit_is_a_413_that_says_so(repo):  # noqa: F811
    with running(repo, max_batch=8) as server:
        conn = connect(server)
        ok = np.full((8, 1, 4, 4), 0.5, dtype=np.float32)
        assert request(conn, "POST", "/v2/models/t0/infer", infer_body(ok))[0] == 200
        status, answer, _ = request(conn, "POST", "/v2/models/t0/infer",
                                    infer_body(np.concatenate([ok, ok[:1]])))
        assert status == 413
        assert answer["error"] == ("a batch of 9 rows is over the limit of 8 rows per request; "
                                   "send it in parts")
        assert request(conn, "POST", "/v2/models/t0/infer", infer_body(ok))[0] == 200
