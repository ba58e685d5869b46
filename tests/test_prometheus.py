"""A real Prometheus (the Debian package) scraping both running services and the edge (HAProxy)
in front of the API with deploy/prometheus/prometheus.yml, and evaluating
deploy/prometheus/alerts.yml.

The only changes to the shipped config: targets point at this test's loopback ports, and scrapes
and rule evaluations run every second instead of every 15. Without haproxy the edge's job is left
out (REQUIRE_HAPROXY=1 makes that a failure).
"""

import contextlib
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from support import ROOT, Edge, free_port, has_tool, require_tools, wait_until

DEPLOY = ROOT / "deploy" / "prometheus"


@pytest.fixture
def prometheus_binary():
    require_tools("prometheus", required_by="REQUIRE_PROMETHEUS")
    return shutil.which("prometheus")


def shipped_config_pointed_at(targets: dict[str, str]) -> dict:
    """The shipped config, each job's target replaced; a job without a target here is left out."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "alerts.yml")]
    config["scrape_configs"] = [job for job in config["scrape_configs"] if job["job_name"] in targets]
    for job in config["scrape_configs"]:
        (static,) = job["static_configs"]
        static["targets"] = [targets[job["job_name"]]]
    return config


@pytest.fixture
def edge_in_front(tmp_path):
    """An Edge(api_url) maker, or None without haproxy (a failure under REQUIRE_HAPROXY=1)."""
    if not has_tool("haproxy", "REQUIRE_HAPROXY"):
        yield None  # the scrape goes on without the edge's job
        return
    with contextlib.ExitStack() as stack:
        yield lambda api_url: stack.enter_context(Edge(api_url, tmp_path))


class Prometheus:
    def __init__(self, binary: str, config: dict):
        self.dir = Path(tempfile.mkdtemp(prefix="clinic-prometheus-"))
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(self.dir / "prometheus.log", "wb")
        self.popen = subprocess.Popen(
            [
                binary,
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def ready(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(f"prometheus exited: {(self.dir / 'prometheus.log').read_text()[-3000:]}")
        try:
            return requests.get(self.url + "/-/ready", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def query(self, promql: str) -> list[dict]:
        body = requests.get(self.url + "/api/v1/query", params={"query": promql}, timeout=5).json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def alert_state(self, name: str) -> str | None:
        alerts = requests.get(self.url + "/api/v1/alerts", timeout=5).json()["data"]["alerts"]
        return next((a["state"] for a in alerts if a["labels"]["alertname"] == name), None)

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_prometheus_scrapes_both_services_and_fires_the_pending_age_alert(prometheus_binary, services, db_url, db, edge_in_front):
    api = services("appointments.py", db_url).wait_healthy()
    worker = services("billing_worker.py", db_url).wait_healthy()
    targets = {"clinic-appointments": api.base_url.removeprefix("http://"), "clinic-billing": worker.base_url.removeprefix("http://")}
    edge = edge_in_front(api.base_url) if edge_in_front else None
    if edge is not None:
        targets["clinic-edge"] = f"127.0.0.1:{edge.metrics_port}"
    front = edge.url if edge is not None else api.base_url
    prometheus = Prometheus(prometheus_binary, shipped_config_pointed_at(targets))
    try:
        wait_until(prometheus.ready, 30, interval=0.2, what="prometheus /-/ready")
        wait_until(lambda: prometheus.scalar("sum(up)") == len(targets), 30, interval=0.2, what="every target up")

        ended = []
        for _ in range(3):
            start = requests.post(front + "/appointments", json={"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}, timeout=5)
            requests.post(f"{front}/appointments/{start.json()['id']}/end", timeout=5).raise_for_status()
            ended.append(start.json()["id"])
        wait_until(lambda: db.execute("SELECT count(*) AS n FROM billing_entries").fetchone()["n"] == 3, 15, what="3 charges billed")

        # What Prometheus saw is what the database says.
        billed = lambda: prometheus.scalar('sum(clinic_billing_charges_total{outcome="billed"})')  # noqa: E731
        wait_until(lambda: billed() == 3, 15, interval=0.2, what="clinic_billing_charges_total = 3 in prometheus")
        wait_until(lambda: prometheus.scalar("sum(clinic_appointments_ended_total)") == 3, 15, interval=0.2, what="ends counted")
        assert prometheus.scalar('max(clinic_billing_queue_rows{status="pending"})') == 0
        assert prometheus.scalar("max(clinic_billing_oldest_pending_age_seconds)") == 0
        assert prometheus.alert_state("ClinicChargePendingTooLong") is None
        if edge is not None:  # the series the shedding alert divides: the six requests went through the edge
            through = lambda: prometheus.scalar('sum(haproxy_frontend_http_requests_total{job="clinic-edge",proxy="appointments"})')  # noqa: E731
            wait_until(lambda: (through() or 0) >= 6, 15, interval=0.2, what="the edge's requests in prometheus")
            assert prometheus.scalar('sum(haproxy_frontend_requests_denied_total{job="clinic-edge",proxy="appointments"})') == 0
            assert prometheus.alert_state("ClinicApiSheddingLoad") is None

        # Billing down, an end waiting: the gauge (the API exports it too) and then the alert.
        worker.stop()
        start = requests.post(api.base_url + "/appointments", json={"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4())}, timeout=5)
        requests.post(f"{api.base_url}/appointments/{start.json()['id']}/end", timeout=5).raise_for_status()
        # Two minutes of waiting without waiting two minutes: the charge became due 120 s ago.
        db.execute("UPDATE billing_queue SET available_at = now() - interval '120 seconds' WHERE status = 'pending'")
        oldest = lambda: prometheus.scalar("max(clinic_billing_oldest_pending_age_seconds)") or 0  # noqa: E731
        wait_until(lambda: oldest() >= 120, 15, interval=0.2, what="the pending age in prometheus")
        assert prometheus.scalar('max(clinic_billing_queue_rows{status="pending"})') == 1
        wait_until(lambda: prometheus.alert_state("ClinicChargePendingTooLong") == "firing", 15, interval=0.2, what="the alert firing")
    finally:
        prometheus.stop()
