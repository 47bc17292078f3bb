"""Connection floods (edgecl.web's ConnectionGuard): sockets that send nothing, or half a
request head, cannot lock other clients out of either service, health probes stay answerable,
and the server closes such sockets itself within the head timeout.

Loopback only; every wait is a poll against a deadline generous enough for a loaded 2-core
machine (no timing is asserted beyond "within N seconds").
"""

import contextlib
import http.client
import select
import socket
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgecl import web
from edgecl.serve import create_server
from edgecl.web import HEAD_TIMEOUT_S, MAX_CONNECTIONS, HTTPServer

SLACK_S = 15.0  # on top of the head timeout: a loaded machine, 128 sockets to close
FLOOD = MAX_CONNECTIONS  # sockets of each kind: as many as the server has slots
HALF_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "  # and then nothing


async def health_app(scope, receive, send):
    """A trivial ASGI app: /healthz answers 200, /work 200, anything else 404."""
    if scope["type"] != "http":
        return
    found = scope["path"] in ("/healthz", "/work")
    await web.send_response(send, web.json_response(200 if found else 404, {"ok": found}))


@contextlib.contextmanager
def running(server, serve):
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 10.0, "the server to start")
        yield server
    finally:
        server.shutdown()
        thread.join(10.0)


def wait_until(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds:g} s waiting for {what}"
        time.sleep(0.05)


def address(server):
    return server.socket.getsockname()[:2]


def flood(server, n, data=b"", source="127.0.0.1"):
    """`n` raw connections from `source`, each having sent `data` (maybe nothing)."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((source, 0))
        s.settimeout(10.0)
        s.connect(address(server))
        if data:
            s.sendall(data)
        socks.append(s)
    return socks


def still_open(socks, seconds):
    """The sockets of `socks` the server has not closed within `seconds` (what it sent before
    closing, a 408 say, is read and dropped)."""
    waiting = set(socks)
    deadline = time.monotonic() + seconds
    while waiting and time.monotonic() < deadline:
        readable, _, _ = select.select(list(waiting), [], [], 0.2)
        for s in readable:
            try:
                data = s.recv(65536)
            except (ConnectionError, TimeoutError):
                data = b""
            if not data:
                waiting.discard(s)
    return waiting


def get(server, path, timeout=10.0):
    host, port = address(server)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def close_all(socks):
    for s in socks:
        s.close()


def check_flood_is_harmless(server, health_path):
    """64 silent sockets and 64 half heads: a probe answers 200 at once, and the server itself
    closes every flooding socket within the head timeout (plus slack)."""
    socks = flood(server, FLOOD) + flood(server, FLOOD, HALF_HEAD)
    try:
        started = time.monotonic()
        assert get(server, health_path) == 200
        assert time.monotonic() - started < HEAD_TIMEOUT_S  # not merely after the timeout
        assert not still_open(socks, HEAD_TIMEOUT_S + SLACK_S)
        closed = server.guard.closed
        wait_until(lambda: closed["head_timeout"] + closed["evicted"] >= 2 * FLOOD, 10.0,
                   "the closes to be counted")
        assert get(server, health_path) == 200
    finally:
        close_all(socks)


def test_a_flood_of_silent_and_half_sent_connections_locks_no_one_out():
    server = HTTPServer(health_app, port=0)
    with running(server, server.serve):
        check_flood_is_harmless(server, "/healthz")
        assert get(server, "/work") == 200  # not only the health path


def test_edgecl_serve_answers_its_probes_under_a_flood_and_counts_the_closes(tmp_path):
    server = create_server(tmp_path, port=0)  # an empty repository: live, not ready
    with running(server, lambda: server.run(3600.0)):
        check_flood_is_harmless(server, "/v2/health/live")
        assert get(server, "/v2/health/ready") == 503  # answered, not refused for load
        text = server.metrics.render().decode()
        closed = {s.labels["reason"]: s.value for f in text_string_to_metric_families(text)
                  for s in f.samples if s.name == "edgecl_connections_closed_total"}
        assert closed["head_timeout"] + closed["evicted"] >= 2 * FLOOD


def test_one_address_cannot_take_the_slots_of_another():
    server = HTTPServer(health_app, port=0)
    with running(server, server.serve):
        try:  # any 127/8 address is loopback on Linux
            attacker = flood(server, 2 * FLOOD, source="127.0.0.2")
        except OSError:
            pytest.skip("127.0.0.2 is not usable as a source address here")
        host, port = address(server)
        clients = [http.client.HTTPConnection(host, port, timeout=10.0) for _ in range(20)]
        try:
            wait_until(lambda: server.guard.open <= server.guard.max_per_client, 10.0,
                       "the flood to be cut to its share")
            for _ in range(2):  # keep-alive connections of another address survive the flood
                for conn in clients:
                    conn.request("GET", "/work")
                    response = conn.getresponse()
                    response.read()
                    assert response.status == 200
            socks = [conn.sock for conn in clients]
            more = flood(server, FLOOD, source="127.0.0.2")
            for conn, sock in zip(clients, socks, strict=True):
                conn.request("GET", "/work")
                assert conn.getresponse().status == 200 and conn.sock is sock
            close_all(more)
        finally:
            close_all(attacker)
            for conn in clients:
                conn.close()
