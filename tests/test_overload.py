"""Overload at the edge: HAProxy with deploy/haproxy/haproxy.cfg in front of a real API process.

From 16 to 4,000 connections of wrk POSTing /appointments (it resends at once whatever it gets,
Retry-After included), the edge keeps goodput near what 16 connections get, answers every request
(2xx, or a 503 problem with Retry-After and X-Request-ID, on a connection kept alive), keeps p99
low, and the process's /health, /ready and /metrics answer quickly throughout. Half-sent requests
stay at the edge. The negative control: the same load straight at the process, where goodput
collapses. The bounds here are looser than the benchmark's targets (bench/bench.py's overload
section), so that a busy CI machine does not fail them: the design leaves room under both.

Needs Debian's haproxy and wrk: without them the tests are skipped, unless REQUIRE_HAPROXY=1 (CI),
where they fail.
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import time
import uuid

import pytest
import requests

from support import Edge, Probes, require_tools, run_wrk, wait_until

pytestmark = pytest.mark.slow

LEVELS = (16, 256, 1000, 4000)
SECONDS = 4
WARMUP_SECONDS = 1
# What this guards against is a collapse: straight at the process, goodput falls to 0.03-0.11 of
# 16 connections' (the negative control below). How near 1.0 it stays is the benchmark's to
# measure (make bench, section 7: targets 0.8 and 0.5, measured 0.99 / 0.94 / 0.78); here the
# load generator, HAProxy, the API and PostgreSQL share 2 cores with CI's other work, and a run
# has come in at 0.59 at 256 connections. So: four times the collapse, not the target.
MIN_RATIO = {256: 0.4, 1000: 0.4, 4000: 0.25}
MAX_P99_MS = 600
PROBE_P99_MS = 150
BODY = {"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}


@pytest.fixture
def tools():
    require_tools("haproxy", "wrk", required_by="REQUIRE_HAPROXY")


@pytest.fixture
def api(tools, services, db_url):
    # WARNING: no log line per request, as a busy production service would run at INFO to a
    # collector; here the lines would go to a file the test never reads.
    return services("appointments.py", db_url, LOG_LEVEL="WARNING").wait_healthy()


@pytest.fixture
def edge(api, tmp_path):
    with Edge(api.base_url, tmp_path) as edge:
        yield edge


def shed_response(url: str) -> tuple[requests.Response, requests.Response]:
    """Two POSTs on one kept-alive connection."""
    with requests.Session() as session:
        first = session.post(url + "/appointments", json=BODY, headers={"X-Request-ID": "shed-check-1"}, timeout=5)
        second = session.post(url + "/appointments", json=BODY, timeout=5)
    return first, second


def test_goodput_holds_and_every_request_is_answered_from_16_to_4000_connections(api, edge, capsys):
    """Through the edge: goodput at 256 and 1,000 connections near 16's, at 4,000 still half; p99
    low; only 2xx and 503 with Retry-After and X-Request-ID, never a closed connection or a socket
    error; the process's probes answer quickly throughout; the edge's metrics count what it shed."""
    probes = Probes([api.base_url])
    probes.start()
    figures = {}
    try:
        for connections in LEVELS:
            run_wrk(edge.url + "/appointments", connections, WARMUP_SECONDS)
            figures[connections] = run_wrk(edge.url + "/appointments", connections, SECONDS)
    finally:
        probes.halt.set()
        probes.join(10)
    base = figures[16]["goodput"]
    shown = {
        c: {
            "goodput": round(f["goodput"]), "ratio": round(f["goodput"] / base, 2), "shed_per_s": round(f["shed"] / f["duration_s"]),
            "p50_ms": f["p50_us"] / 1000, "p99_ms": f["p99_us"] / 1000, "max_ms": f["max_us"] / 1000,
            "other": f["other"], "no_retry": f["no_retry"], "no_id": f["no_id"], "closed": f["closed"],
            "socket_errors": f["errors_connect"] + f["errors_read"] + f["errors_write"] + f["errors_timeout"],
        }
        for c, f in figures.items()
    }
    probe_figures = probes.summary()[api.base_url]
    with capsys.disabled():
        print("\noverload through the edge:", json.dumps({"levels": shown, "probes": probe_figures}, indent=2))

    for connections, row in shown.items():
        assert row["other"] == row["no_retry"] == row["no_id"] == row["closed"] == row["socket_errors"] == 0, (connections, row)
        assert row["p99_ms"] <= MAX_P99_MS, (connections, row)
    for connections, ratio in MIN_RATIO.items():
        assert shown[connections]["ratio"] >= ratio, (connections, shown[connections])
    assert shown[4000]["shed_per_s"] > 0, "4,000 connections must be more than the process serves"
    for path, row in probe_figures.items():
        assert row["n"] >= 20 and row["not_200"] == 0, (path, row)
        assert row["p99_ms"] <= PROBE_P99_MS, (path, row)
    denied = sum(
        float(line.rsplit(" ", 1)[1])
        for line in edge.metrics().splitlines()
        if line.startswith('haproxy_frontend_requests_denied_total{proxy="appointments"}')
    )
    assert denied >= sum(f["shed"] for f in figures.values()) * 0.9, "the edge's metrics count its 503s (the shedding alert reads them)"


def test_negative_control_straight_at_the_process_goodput_collapses(api, capsys):
    """The same load without the edge: at 256 connections goodput falls far below 16's and p99
    passes a second, which the test above would have caught."""
    run_wrk(api.base_url + "/appointments", 16, WARMUP_SECONDS)
    base = run_wrk(api.base_url + "/appointments", 16, SECONDS)
    crowded = run_wrk(api.base_url + "/appointments", 256, SECONDS + 2)
    ratio = crowded["goodput"] / base["goodput"]
    with capsys.disabled():
        print(f"\nstraight at the process: 16 -> {base['goodput']:.0f}/s, 256 -> {crowded['goodput']:.0f}/s "
              f"(ratio {ratio:.2f}), p99 {crowded['p99_us'] / 1000:.0f} ms")
    assert ratio < MIN_RATIO[256] or crowded["p99_us"] / 1000 > MAX_P99_MS, (base, crowded)


def test_a_shed_request_is_a_503_problem_with_retry_after_and_the_callers_id_on_a_kept_alive_connection(api, tmp_path):
    """With the shedding threshold at 0, every request is shed: the answer is the API's kind of
    problem (application/problem+json), after the tarpit's pause, with Retry-After, the caller's
    X-Request-ID (a new one otherwise), and the connection stays open for the next request."""
    with Edge(api.base_url, tmp_path, CLINIC_EDGE_SHED_AT="0") as shedding:
        began = time.monotonic()
        first, second = shed_response(shedding.url)
        took = time.monotonic() - began
    for response in (first, second):
        assert response.status_code == 503, response.text
        assert response.headers["Content-Type"] == "application/problem+json"
        assert int(response.headers["Retry-After"]) >= 1
        assert response.headers.get("Connection", "").lower() != "close"
        assert response.json()["status"] == 503 and "capacity" in response.json()["detail"]
        assert response.json()["request_id"] == response.headers["X-Request-ID"]
    assert first.headers["X-Request-ID"] == "shed-check-1"
    uuid.UUID(second.headers["X-Request-ID"])
    assert took >= 0.5, "each 503 is held back by the tarpit (300 ms)"


def test_with_no_api_process_ready_the_edge_answers_503_problem_details(api, edge):
    """The API stopped: the edge's own 503 is a problem with Retry-After and an X-Request-ID,
    not HAProxy's HTML page."""
    api.stop()
    (answered,) = wait_until(lambda: _answer_503(edge.url), 10, what="the edge to see the API gone")
    assert answered.headers["Content-Type"] == "application/problem+json"
    assert answered.headers["Retry-After"] and answered.json()["request_id"] == answered.headers["X-Request-ID"]


def _post(url: str) -> requests.Response:
    return requests.post(url + "/appointments", json=BODY, timeout=5)


def _answer_503(url: str) -> list[requests.Response]:
    """[the answer] when it is a 503 (a list: a Response of 400 or more is falsy)."""
    with contextlib.suppress(requests.RequestException):
        response = _post(url)
        return [response] if response.status_code == 503 else []
    return []


def test_5000_half_sent_requests_at_the_edge_do_not_delay_a_normal_request(api, edge, capsys):
    """5,000 connections that send half a request and stall: a normal request still answers
    within a second (the edge holds them; the API never sees them), and the edge ends them."""
    held = []
    try:
        for _ in range(5000):
            sock = socket.create_connection(("127.0.0.1", edge.port), timeout=5)
            sock.sendall(b"POST /appointments HTTP/1.1\r\nHost: clinic\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"phys")
            held.append(sock)
        times = []
        for _ in range(5):
            began = time.monotonic()
            response = _post(edge.url)
            times.append(time.monotonic() - began)
            assert response.status_code == 201, response.text
        with capsys.disabled():
            print(f"\n5,000 half-sent requests held: normal requests took {[round(t * 1000) for t in times]} ms")
        assert max(times) < 1.0, times
        # The edge ends each after `timeout http-request` (5 s) with a 408 problem.
        held[0].settimeout(10)
        reply = held[0].recv(4096)
        assert b" 408 " in reply.split(b"\r\n", 1)[0] and b"application/problem+json" in reply, reply[:300]
    finally:
        for sock in held:
            sock.close()
    assert statistics.mean(times) < 0.5
