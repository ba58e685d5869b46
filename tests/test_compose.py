"""End to end through Docker: the Dockerfile and docker-compose.yml run the whole system.

The steps share one compose project and run in file order (pytest's default); once a step fails,
the later ones are skipped. It talks to the published ports on 127.0.0.1 only and inspects the
database with `exec -T db psql`.

    1. up -d --build; every healthcheck turns healthy; image checks (non-root, no compiler); the
       API answers only through the edge (HAProxy), with a request id
    2. appointments started and ended over HTTP are billed, with the right totals; then
       --scale appointments=2: the edge finds the second replica and spreads requests over both
    3. stop billing-worker (exit 0 on SIGTERM); 50 ends stay pending; start it; all billed once
    4. --scale billing-worker=3 on a backlog while more ends arrive; still exactly once
    5. restart db: both services recover by themselves, nothing is lost; down + up on the
       existing volume keeps the data
    6. backups: the backup service took a base backup and WAL is archived; the runbooks of
       docs/operations.md, run as written (deploy/postgres/restore): a DROP TABLE undone to the
       time the db log gives, then the data volume deleted and restored to the last archived WAL
    7. stop (every container exits 0) and down -v, leaving nothing behind

Plus the static checks: hadolint on the Dockerfile and `config -q` on the compose file.

Needs a Docker engine and docker-compose 1.29 (or the `docker compose` v2 plugin). Without an
engine the tests are skipped, unless REQUIRE_DOCKER=1 (CI), where they fail. The engine is never
started or stopped here: CI runs shared/containers/engine-up and stand-in-images before, and
engine-down after.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import decimal
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

import support

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "clinic-billing:compose-test"  # one fixed tag: warm runs reuse the build cache
DB_USER, DB_NAME = "clinic", "clinic_e2e"  # not the defaults, to prove they are configurable
APPOINTMENTS_PORT, BILLING_PORT = 8080, 8081  # inside the containers
# Every variable docker-compose.yml reads: taken out of the inherited environment (a developer's
# shell must not change what the test runs) and set in the test's own env file.
COMPOSE_VARS = re.compile(
    r"POSTGRES_\w+|APPOINTMENTS_\w+|BILLING_\w+|HOURLY_RATE|APP_TIMEZONE|LOG_LEVEL|LOG_FORMAT|PUBLISH_IP|REQUEST_TIMEOUT_SECONDS"
    r"|CLINIC_\w+|BACKUP_\w+|WAL_\w+|COMPOSE_PROJECT_NAME|COMPOSE_FILE|COMPOSE_PROFILES"
)
CENTS = decimal.Decimal("0.01")
RATE = decimal.Decimal("200.00")  # HOURLY_RATE's default, which the test leaves in force


def unavailable(reason: str):
    support.unavailable(reason, "REQUIRE_DOCKER")


def run(cmd: list[str], timeout: float = 120, check: bool = True, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"`{' '.join(cmd)}` exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


@functools.lru_cache(maxsize=1)
def compose_command() -> tuple[str, ...] | None:
    """docker-compose (v1, what this machine has) first, else the `docker compose` v2 plugin."""
    if shutil.which("docker-compose"):
        return ("docker-compose",)
    if shutil.which("docker") and run(["docker", "compose", "version"], check=False, timeout=30).returncode == 0:
        return ("docker", "compose")
    return None


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not COMPOSE_VARS.fullmatch(k)}


def price(seconds: int) -> decimal.Decimal:
    """The rule, independently of the code under test: R$200/hour for every started minute."""
    minutes = -(-seconds // 60)
    return (RATE * minutes / 60).quantize(CENTS, rounding=decimal.ROUND_HALF_UP)


def test_price_rule_of_this_test():
    assert price(0) == decimal.Decimal("0.00")
    assert price(1) == price(59) == price(60) == decimal.Decimal("3.33")
    assert price(61) == decimal.Decimal("6.67")
    assert price(3600) == decimal.Decimal("200.00")
    assert price(5400) == decimal.Decimal("300.00")
    assert price(5341) == decimal.Decimal("300.00")  # 89 min 1 s: 90 started minutes


def wait_for(what: str, check, timeout: float, interval: float = 0.5):
    """Polls check() until it returns something truthy; exceptions count as 'not yet'."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except Exception as exc:  # noqa: BLE001 - reported if the deadline passes
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_range(count: int) -> int:
    """The first of `count` consecutive ports that are free now."""
    for _ in range(200):
        base = secrets.randbelow(20000) + 30000
        if all(port_is_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports found")


# ---------------------------------------------------------------------------------------------
# Static checks: no engine needed.


def hadolint_binary() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint():
    hadolint = hadolint_binary()
    if hadolint is None:
        unavailable("hadolint is not installed: make venv (it installs requirements-dev.lock)")
    for dockerfile in (ROOT / "Dockerfile", ROOT / "deploy" / "postgres" / "Dockerfile"):
        proc = run([hadolint, "--no-color", str(dockerfile)], check=False, timeout=60)
        assert proc.returncode == 0, f"hadolint findings in {dockerfile}:\n{proc.stdout}{proc.stderr}"


def test_compose_file_is_valid(tmp_path):
    compose = compose_command()
    if compose is None:
        unavailable("neither docker-compose nor the docker compose plugin is installed")
    base = [*compose, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml")]
    example = [*base, "--env-file", str(ROOT / ".env.example")]
    run([*example, "config", "-q"], env=clean_env(), timeout=60)

    # No .env at all: plain `docker compose up` still works (a local-only default password), and
    # a password from the env file replaces it everywhere it is used.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    plain = yaml.safe_load(run([*base, "--env-file", str(empty), "config"], env=clean_env(), timeout=60).stdout)
    assert plain["services"]["db"]["environment"]["POSTGRES_PASSWORD"]
    chosen = tmp_path / "chosen.env"
    chosen.write_text("POSTGRES_PASSWORD=s3cret-from-env\nCLINIC_API_PASSWORD=api-from-env\nCLINIC_WORKER_PASSWORD=worker-from-env\n")
    mine = yaml.safe_load(run([*base, "--env-file", str(chosen), "config"], env=clean_env(), timeout=60).stdout)
    assert mine["services"]["db"]["environment"]["POSTGRES_PASSWORD"] == "s3cret-from-env"
    assert mine["services"]["migrate"]["environment"]["PGPASSWORD"] == "s3cret-from-env"
    # Each service logs in as its own role, with the password migrate gave that role.
    for service, role, password in (("appointments", "clinic_api", "api-from-env"), ("billing-worker", "clinic_worker", "worker-from-env")):
        environment = mine["services"][service]["environment"]
        assert environment["DATABASE_URL"].startswith(f"postgresql://{role}@db:5432/")
        assert environment["PGPASSWORD"] == password
        assert mine["services"]["migrate"]["environment"][f"CLINIC_{role.split('_')[1].upper()}_PASSWORD"] == password

    config = yaml.safe_load(run([*example, "config"], env=clean_env(), timeout=60).stdout)
    services = config["services"]
    assert set(services) == {"db", "backup", "migrate", "appointments", "edge", "billing-worker"}
    assert not any("container_name" in s for s in services.values()), "fixed names break --scale"
    assert "ports" not in services["db"], "the database is not published on the host"
    # The official image plus pgBackRest, one image for db and backup; archiving on by default.
    assert services["db"]["build"]["context"] in ("deploy/postgres", str(ROOT / "deploy" / "postgres"))
    assert (ROOT / "deploy" / "postgres" / "Dockerfile").read_text().count("FROM postgres:15-bookworm\n") == 1
    assert services["backup"]["image"] == services["db"]["image"]
    assert "archive_mode=on" in services["db"]["command"] and "archive_command=pgbackrest --stanza=clinic archive-push %p" in services["db"]["command"]
    for name in ("db", "backup"):
        volumes = [v if isinstance(v, dict) else dict(zip(("source", "target"), v.split(":"))) for v in services[name]["volumes"]]
        assert {v["target"]: v["source"] for v in volumes}["/var/lib/pgbackrest"].endswith("pgbackrest"), "the repository's own volume"
    for name in ("migrate", "appointments", "billing-worker"):
        assert services[name]["image"] == services["appointments"]["image"], "one image for all"
        assert services[name].get("init") is True, name
    for name in ("db", "appointments", "edge", "billing-worker"):
        assert services[name]["healthcheck"]["test"], name
    assert services["billing-worker"]["restart"] == "unless-stopped"
    # The edge owns host port 80; the API is reached through it only (and so it scales).
    assert "ports" not in services["appointments"]
    assert services["edge"]["image"] == "haproxy:2.6-bookworm"
    assert "80" in json.dumps(services["edge"]["ports"]), "the edge defaults to host port 80"
    # compose v1 renders a volume as "source:target:mode", v2 as a mapping.
    volumes = [v if isinstance(v, dict) else dict(zip(("source", "target"), v.split(":"))) for v in services["edge"]["volumes"]]
    mounted = {v["target"]: v["source"] for v in volumes}
    assert Path(mounted["/usr/local/etc/haproxy/haproxy.cfg"]) == ROOT / "deploy" / "haproxy" / "haproxy.cfg"
    assert "8081-8089" in json.dumps(services["billing-worker"]["ports"]), "a host port range per replica"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "change-me" not in dockerfile and not re.search(r"^\s*(ENV|ARG)\b.*PASSWORD", dockerfile, re.M | re.I)


# ---------------------------------------------------------------------------------------------
# The running system.


class Stack:
    """One compose project on free host ports, with helpers to drive and inspect it."""

    def __init__(self, compose: tuple[str, ...], workdir: Path):
        self.project = f"clinic-e2e-{os.getpid()}-{secrets.token_hex(3)}"
        self.api_port = free_port_range(1)
        self.billing_base = free_port_range(4)  # 3 replicas, plus one spare
        self.env_file = workdir / "compose.env"
        # One token that both services accept: the API from the token itself, the billing service
        # from its digest (the two forms .env.example shows).
        self.token = secrets.token_urlsafe(32)
        # The passwords exist only in this file and the containers' environment.
        self.env_file.write_text(
            "\n".join(
                [
                    f"POSTGRES_PASSWORD={secrets.token_urlsafe(24)}",
                    f"POSTGRES_USER={DB_USER}",
                    f"POSTGRES_DB={DB_NAME}",
                    "PUBLISH_IP=127.0.0.1",
                    f"APPOINTMENTS_HOST_PORT={self.api_port}",
                    f"BILLING_HOST_PORTS={self.billing_base}-{self.billing_base + 3}",
                    f"CLINIC_BILLING_IMAGE={IMAGE}",
                    # Small batches, so that three replicas share a backlog over many transactions.
                    "BILLING_BATCH_SIZE=5",
                    f"CLINIC_API_PASSWORD={secrets.token_urlsafe(24)}",
                    f"CLINIC_WORKER_PASSWORD={secrets.token_urlsafe(24)}",
                    f"APPOINTMENTS_API_TOKENS={self.token}",
                    f"BILLING_API_TOKENS=sha256:{hashlib.sha256(self.token.encode()).hexdigest()}",
                ]
            )
            + "\n"
        )
        self.base = [
            *compose,
            "--project-directory", str(ROOT),
            "-f", str(ROOT / "docker-compose.yml"),
            "--env-file", str(self.env_file),
            "-p", self.project,
        ]
        self.env = clean_env()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.http = self.session()

    def session(self) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.token}"
        return session

    # -- compose and docker

    def compose(self, *args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
        return run([*self.base, *args], timeout=timeout, check=check, env=self.env)

    def containers(self, service: str | None = None) -> list[dict]:
        """docker inspect of the project's containers (running or not), sorted by name."""
        label = f"label=com.docker.compose.project={self.project}"
        cmd = ["docker", "ps", "-aq", "--filter", label]
        if service:
            cmd += ["--filter", f"label=com.docker.compose.service={service}"]
        ids = run(cmd, timeout=30).stdout.split()
        if not ids:
            return []
        found = json.loads(run(["docker", "inspect", *ids], timeout=30).stdout)
        return sorted(found, key=lambda c: c["Name"])

    def state(self) -> dict[str, str]:
        """name -> 'healthy' / 'starting' / 'exited(0)' ..."""
        out = {}
        for c in self.containers():
            st = c["State"]
            health = (st.get("Health") or {}).get("Status")
            out[c["Name"].lstrip("/")] = health if st["Running"] and health else f"{st['Status']}({st['ExitCode']})"
        return out

    def wait_healthy(self, workers: int = 1, timeout: float = 120, apis: int = 1) -> None:
        def ok():
            cs = self.containers()
            by_service: dict[str, list[dict]] = {}
            for c in cs:
                by_service.setdefault(c["Config"]["Labels"]["com.docker.compose.service"], []).append(c)
            healthy = lambda c: c["State"]["Running"] and c["State"].get("Health", {}).get("Status") == "healthy"  # noqa: E731
            return (
                len(by_service.get("db", [])) == 1
                and len(by_service.get("appointments", [])) == apis
                and len(by_service.get("edge", [])) == 1
                and len(by_service.get("billing-worker", [])) == workers
                and all(healthy(c) for s in ("db", "appointments", "edge", "billing-worker") for c in by_service[s])
                and all(c["State"]["Status"] == "exited" and c["State"]["ExitCode"] == 0 for c in by_service.get("migrate", []))
            )

        try:
            wait_for(f"db, {apis} appointments, edge and {workers} billing-worker(s) healthy", ok, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; containers: {self.state()}") from None

    def worker_urls(self) -> list[str]:
        """The billing read API of each running replica, on its published host port."""
        urls = []
        for c in self.containers("billing-worker"):
            if c["State"]["Running"]:
                binding = c["NetworkSettings"]["Ports"][f"{BILLING_PORT}/tcp"][0]
                assert binding["HostIp"] == "127.0.0.1", binding
                urls.append(f"http://127.0.0.1:{binding['HostPort']}")
        return urls

    def psql(self, sql: str) -> list[list[str]]:
        out = self.compose(
            "exec", "-T", "db", "psql", "-v", "ON_ERROR_STOP=1", "-U", DB_USER, "-d", DB_NAME, "-At", "-c", sql,
            timeout=60,
        ).stdout
        return [line.split("|") for line in out.splitlines() if line]

    def logs(self, tail: int = 150) -> str:
        proc = self.compose("logs", "--no-color", f"--tail={tail}", timeout=60, check=False)
        return proc.stdout + proc.stderr

    # -- the system's API

    def start_and_end(self, physician: uuid.UUID, start: dt.datetime, seconds: int, session=None) -> dict:
        http = session or self.http
        body = {"physician_id": str(physician), "patient_id": str(uuid.uuid4()), "start_date": f"{start:%Y-%m-%d %H:%M:%S}"}
        created = http.post(f"{self.api}/appointments", json=body, timeout=10)
        assert created.status_code == 201, created.text
        appointment_id = created.json()["id"]
        end = start + dt.timedelta(seconds=seconds)
        ended = http.post(f"{self.api}/appointments/{appointment_id}/end", json={"end_date": f"{end:%Y-%m-%d %H:%M:%S}"}, timeout=10)
        assert ended.status_code == 200, ended.text
        got = ended.json(parse_float=decimal.Decimal)
        assert got["price"] == price(seconds), (seconds, got)
        assert got["billing_status"] == "pending", got
        return {"id": appointment_id, "price": price(seconds)}

    def billing(self, physician: uuid.UUID) -> dict[str, dict]:
        """Per appointment of this physician: its price, queue row and billing entries."""
        rows = self.psql(
            f"""
            SELECT a.id, a.price, coalesce(q.status, '-'), coalesce(q.attempts, 0),
                   count(e.appointment_id), coalesce(sum(e.total_price), 0)
            FROM appointments a
            LEFT JOIN billing_queue q ON q.appointment_id = a.id
            LEFT JOIN billing_entries e ON e.appointment_id = a.id
            WHERE a.physician_id = '{physician}'
            GROUP BY a.id, a.price, q.status, q.attempts
            """
        )
        return {
            r[0]: {"price": decimal.Decimal(r[1]), "status": r[2], "attempts": int(r[3]), "entries": int(r[4]), "billed": decimal.Decimal(r[5])}
            for r in rows
        }

    def assert_billed_exactly_once(self, physician: uuid.UUID, expected: list[dict], timeout: float = 60) -> None:
        """Every appointment in expected gets exactly one entry of its price, in one attempt."""
        want = {e["id"]: e["price"] for e in expected}
        wait_for(
            f"{len(want)} billing entries for physician {physician}",
            lambda: sum(r["entries"] for r in self.billing(physician).values()) >= len(want),
            timeout,
        )
        got = self.billing(physician)
        assert set(got) == set(want)
        wrong = {
            k: r for k, r in got.items()
            if not (r["entries"] == 1 and r["billed"] == r["price"] == want[k] and r["status"] == "billed" and r["attempts"] == 1)
        }
        assert not wrong, f"{len(wrong)} of {len(want)} not billed exactly once at their price: {list(wrong.items())[:5]}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    compose = compose_command()
    if compose is None:
        unavailable("neither docker-compose nor the docker compose plugin is installed")
    if not shutil.which("docker"):
        unavailable("the docker CLI is not installed")
    info = run(["docker", "info", "--format", "{{.ServerVersion}}"], check=False, timeout=30)
    if info.returncode != 0:
        unavailable(f"no Docker engine answers (`docker info`: {(info.stderr or info.stdout).strip()[:300]})")
    s = Stack(compose, tmp_path_factory.mktemp("compose"))
    try:
        yield s
    finally:
        s.http.close()
        proc = s.compose("down", "-v", "--remove-orphans", "-t", "10", timeout=180, check=False)
        # Whatever down missed (it failed, or the run was interrupted midway) goes too.
        label = f"label=com.docker.compose.project={s.project}"
        leftovers = run(["docker", "ps", "-aq", "--filter", label], check=False).stdout.split()
        if leftovers:
            run(["docker", "rm", "-f", "-v", *leftovers], check=False)
        for kind in ("volume", "network"):
            names = run(["docker", kind, "ls", "-q", "--filter", label], check=False).stdout.split()
            if names:
                run(["docker", kind, "rm", *names], check=False)
        if proc.returncode != 0:
            print(f"down failed:\n{proc.stdout}{proc.stderr}")


_failed: list[str] = []


def step(fn):
    """The steps build on each other: after a failure, the rest are skipped, and the failing one
    prints the containers' state and their last log lines."""

    @functools.wraps(fn)
    def wrapper(stack, *args, **kwargs):
        if _failed:
            pytest.skip(f"an earlier step failed: {_failed[0]}")
        started = time.monotonic()
        try:
            fn(stack, *args, **kwargs)
        except BaseException as exc:  # pytest.fail and pytest-timeout's failure are BaseExceptions
            if isinstance(exc, pytest.skip.Exception):
                raise
            _failed.append(fn.__name__)
            try:
                print(f"--- state of {stack.project}: {stack.state()}")
                print(f"--- docker-compose logs (last lines per container)\n{stack.logs()}")
            except Exception as exc:  # noqa: BLE001
                print(f"(could not collect logs: {exc})")
            raise
        finally:
            print(f"{fn.__name__}: {time.monotonic() - started:.1f}s")

    return wrapper


@step
def test_1_up_build_and_every_healthcheck_turns_healthy(stack):
    stack.compose("up", "-d", "--build", timeout=900)
    stack.wait_healthy(workers=1, timeout=120)
    for url in (stack.api, *stack.worker_urls()):
        assert stack.http.get(f"{url}/health", timeout=5).status_code == 200
        assert stack.http.get(f"{url}/ready", timeout=5).json() == {"status": "ready"}
    assert "schema.sql applied" in stack.compose("logs", "--no-color", "migrate").stdout

    # The image: a non-root user, its own HEALTHCHECK, no compiler and no pip cache left.
    image = json.loads(run(["docker", "image", "inspect", IMAGE]).stdout)[0]["Config"]
    assert image["User"] not in ("", "0", "root") and not image["User"].startswith(("0:", "root:")), image["User"]
    assert not [e for e in image["Env"] if re.search(r"PASSWORD|SECRET|DATABASE_URL", e)], image["Env"]
    assert stack.compose("exec", "-T", "appointments", "id", "-u").stdout.strip() != "0"
    # The image's own HEALTHCHECK (compose sets its own per service) finds either service.
    kind, *probe_cmd = image["Healthcheck"]["Test"]
    assert kind == "CMD", image["Healthcheck"]
    for service in ("appointments", "billing-worker"):
        stack.compose("exec", "-T", service, *probe_cmd, timeout=30)
    probe = (
        "import glob, shutil, sys; "
        "found = [t for t in ('gcc', 'cc', 'c++', 'g++', 'clang', 'make') if shutil.which(t)]"
        " + glob.glob('/root/.cache/pip') + glob.glob('/tmp/pip-*'); "
        "print(found); sys.exit(1 if found else 0)"
    )
    run(["docker", "run", "--rm", "--user", "0", "--entrypoint", "python", IMAGE, "-c", probe], timeout=60)
    # The database is reachable from the services only: nothing published on the host.
    (db,) = stack.containers("db")
    assert not db["HostConfig"].get("PortBindings"), db["HostConfig"]["PortBindings"]
    # The API only through the edge, which answers with a request id (the caller's, or its own)
    # that the API logged, and with problem details of its own when the path is not the API's.
    (api,) = stack.containers("appointments")
    assert not api["HostConfig"].get("PortBindings"), api["HostConfig"]["PortBindings"]
    (edge,) = stack.containers("edge")
    assert edge["Config"]["User"] in ("haproxy", "99", "99:99"), edge["Config"]["User"]
    mine = stack.http.get(f"{stack.api}/appointments/{uuid.uuid4()}", headers={"X-Request-ID": "through-the-edge"}, timeout=5)
    assert mine.status_code == 404 and mine.headers["X-Request-ID"] == "through-the-edge", mine.headers
    made = stack.http.get(f"{stack.api}/appointments/{uuid.uuid4()}", timeout=5)
    assert made.json()["request_id"] == made.headers["X-Request-ID"]
    wait_for("the API's log line of that request", lambda: '"request_id":"through-the-edge"' in stack.compose("logs", "--no-color", "appointments").stdout, 15)


PHYSICIAN = {step_name: uuid.uuid4() for step_name in ("basic", "two_apis", "stopped", "scale", "scale_live", "restart", "reup", "pitr", "pitr_after", "lost_volume")}
START = dt.datetime(2024, 3, 1, 8, 0, 0)


@step
def test_2_ended_appointments_are_billed_with_the_right_totals(stack):
    durations = [3600, 5400, 61, 59, 0, 5341, 8 * 3600 + 1]  # 200.00, 300.00, 6.67, 3.33, 0.00, 300.00, 1603.33
    done = [stack.start_and_end(PHYSICIAN["basic"], START + dt.timedelta(days=i), s) for i, s in enumerate(durations)]
    stack.assert_billed_exactly_once(PHYSICIAN["basic"], done, timeout=30)

    # The same through the billing read API and the appointments API.
    (worker,) = stack.worker_urls()
    for appointment in done:
        entry = stack.http.get(f"{worker}/billing-entries/{appointment['id']}", timeout=5)
        assert entry.status_code == 200, entry.text
        assert entry.json(parse_float=decimal.Decimal)["total_price"] == appointment["price"]
        shown = stack.http.get(f"{stack.api}/appointments/{appointment['id']}", timeout=5).json()
        assert shown["billing_status"] == "billed", shown
    listed = stack.http.get(f"{worker}/billing-entries", params={"limit": 50}, timeout=5).json(parse_float=decimal.Decimal)
    assert {e["appointment_id"]: e["total_price"] for e in listed} == {a["id"]: a["price"] for a in done}
    assert stack.http.get(f"{worker}/billing-entries/{uuid.uuid4()}", timeout=5).status_code == 404
    # Without the token, both refuse; the services log in as their own roles, not the superuser.
    assert requests.get(f"{worker}/billing-entries", timeout=5).status_code == 401
    assert requests.get(f"{stack.api}/appointments/{done[0]['id']}", timeout=5).status_code == 401
    logins = stack.psql("SELECT DISTINCT usename FROM pg_stat_activity WHERE application_name IN ('appointments', 'billing-worker') ORDER BY 1")
    assert logins == [["clinic_api"], ["clinic_worker"]], logins


@step
def test_2b_two_api_replicas_behind_the_edge_share_the_requests(stack):
    """--scale appointments=2: the edge finds the new replica by Docker's DNS and sends it
    requests; every request is answered; back to one replica, nothing is lost."""
    stack.compose("up", "-d", "--scale", "appointments=2", timeout=300)
    stack.wait_healthy(workers=1, apis=2, timeout=120)
    ids = {c["Id"] for c in stack.containers("appointments")}

    def served_by_both():
        done = [stack.start_and_end(PHYSICIAN["two_apis"], START + dt.timedelta(minutes=i), 60) for i in range(10)]
        served.extend(done)
        counts = {
            c: run(["docker", "logs", c], timeout=60).stderr.count('"route":"/appointments/{appointment_id}/end"') for c in ids
        }
        return all(counts.values())

    served: list[dict] = []
    wait_for("both API replicas to serve ends through the edge", served_by_both, 60, interval=0)
    stack.assert_billed_exactly_once(PHYSICIAN["two_apis"], served, timeout=60)
    stack.compose("up", "-d", "--scale", "appointments=1", timeout=300)
    stack.wait_healthy(workers=1, apis=1, timeout=120)
    assert stack.http.get(f"{stack.api}/ready", timeout=5).status_code == 200


@step
def test_3_with_the_worker_stopped_charges_wait_then_are_billed_once(stack):
    began = time.monotonic()
    stack.compose("stop", "billing-worker")
    took = time.monotonic() - began
    (worker,) = stack.containers("billing-worker")
    assert worker["State"]["ExitCode"] == 0, f"billing-worker exited {worker['State']['ExitCode']} on SIGTERM"
    assert took < 8, f"stop took {took:.1f}s: SIGTERM was not honoured before docker's 10 s kill"

    physician = PHYSICIAN["stopped"]
    done = [stack.start_and_end(physician, START + dt.timedelta(hours=i), 60 * i + i % 7) for i in range(50)]
    rows = stack.billing(physician)
    assert len(rows) == 50
    assert all(r["entries"] == 0 and r["status"] == "pending" and r["attempts"] == 0 for r in rows.values()), rows
    shown = stack.http.get(f"{stack.api}/appointments/{done[0]['id']}", timeout=5).json()
    assert shown["billing_status"] == "pending"

    stack.compose("start", "billing-worker")
    stack.assert_billed_exactly_once(physician, done, timeout=60)
    stack.wait_healthy(workers=1, timeout=60)
    (url,) = stack.worker_urls()  # the replica may have another port of the range now
    entry = stack.http.get(f"{url}/billing-entries/{done[-1]['id']}", timeout=5).json(parse_float=decimal.Decimal)
    assert entry["total_price"] == done[-1]["price"]


@step
def test_4_three_workers_bill_a_backlog_exactly_once(stack):
    stack.compose("stop", "billing-worker")
    backlog = [stack.start_and_end(PHYSICIAN["scale"], START + dt.timedelta(hours=i), 30 * i + 17) for i in range(150)]
    assert all(r["entries"] == 0 for r in stack.billing(PHYSICIAN["scale"]).values())

    # Scaling up on a backlog: the stopped replica starts and two new ones are created, and the
    # backlog goes to whichever claims it first.
    stack.compose("up", "-d", "--scale", "billing-worker=3", timeout=300)
    stack.assert_billed_exactly_once(PHYSICIAN["scale"], backlog, timeout=90)
    stack.wait_healthy(workers=3, timeout=90)
    shares_before = billed_per_replica(stack)

    # Then a burst of ends with all three replicas listening: every NOTIFY wakes all of them for
    # the same rows, so they race for each row (SKIP LOCKED), and each must still be billed once.
    def end_one(i):
        with stack.session() as session:
            return stack.start_and_end(PHYSICIAN["scale_live"], START + dt.timedelta(hours=i), 45 * i + 3, session)

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        live = list(pool.map(end_one, range(150), timeout=120))
    stack.assert_billed_exactly_once(PHYSICIAN["scale_live"], live, timeout=90)

    shares = billed_per_replica(stack)
    burst = {r: shares.get(r, 0) - shares_before.get(r, 0) for r in shares}
    print(f"entries billed per replica: until the burst {shares_before}, in the burst {burst}")
    assert sum(burst.values()) == len(live), (burst, len(live))
    assert sum(1 for n in burst.values() if n) >= 2, f"one replica billed the whole burst: {burst}"

    # Each replica has its own host port, and each serves the same ledger.
    urls = stack.worker_urls()
    assert len(set(urls)) == 3, urls
    sample = backlog[77]
    for url in urls:
        entry = stack.http.get(f"{url}/billing-entries/{sample['id']}", timeout=5).json(parse_float=decimal.Decimal)
        assert entry["total_price"] == sample["price"], url


def billed_per_replica(stack) -> dict[str, int]:
    """Entries billed by each worker container so far, from its JSON "batch" log lines (their
    "billed" field); waits until they add up to the ledger (a worker logs just after its commit)."""

    def shares():
        out: dict[str, int] = {}
        for c in stack.containers("billing-worker"):
            logs = run(["docker", "logs", c["Id"]], timeout=60)
            name = c["Name"].lstrip("/")
            lines = (json.loads(line) for line in (logs.stdout + logs.stderr).splitlines() if line.startswith("{"))
            out[name] = sum(line.get("billed", 0) for line in lines if line.get("event") == "batch")
        ((entries,),) = stack.psql("SELECT count(*) FROM billing_entries")
        return out if sum(out.values()) == int(entries) else None

    return wait_for("the workers' log lines to account for every billing entry", shares, 15)


@step
def test_5_after_a_database_restart_both_services_recover_and_nothing_is_lost(stack):
    def totals():
        ((appointments, queued, entries),) = stack.psql(
            "SELECT (SELECT count(*) FROM appointments), (SELECT count(*) FROM billing_queue), (SELECT count(*) FROM billing_entries)"
        )
        return int(appointments), int(queued), int(entries)

    before = totals()
    assert before[0] == before[1] == before[2] == 7 + len(stack.billing(PHYSICIAN["two_apis"])) + 50 + 150 + 150
    services = {c["Id"]: (c["State"]["StartedAt"], c["RestartCount"]) for s in ("appointments", "billing-worker") for c in stack.containers(s)}

    stack.compose("restart", "db")
    stack.wait_healthy(workers=3, timeout=90)
    for url in (stack.api, *stack.worker_urls()):
        wait_for(f"{url}/ready", lambda: stack.http.get(f"{url}/ready", timeout=3).status_code == 200, 60)
    assert totals() == before

    # No process was restarted: each recovered in place.
    after = {c["Id"]: (c["State"]["StartedAt"], c["RestartCount"]) for s in ("appointments", "billing-worker") for c in stack.containers(s)}
    assert after == services

    done = [stack.start_and_end(PHYSICIAN["restart"], START + dt.timedelta(hours=i), 3600 + i) for i in range(10)]
    stack.assert_billed_exactly_once(PHYSICIAN["restart"], done, timeout=60)

    # down (the volume stays) and up again: the schema is re-applied to the existing database,
    # and every row is still there.
    stack.compose("down", timeout=180)
    stack.compose("up", "-d", timeout=300)
    stack.wait_healthy(workers=1, timeout=120)
    assert totals() == (before[0] + 10, before[1] + 10, before[2] + 10)
    again = [stack.start_and_end(PHYSICIAN["reup"], START, 90 * 60)]
    stack.assert_billed_exactly_once(PHYSICIAN["reup"], again, timeout=60)


def runbook_commands() -> list[str]:
    """The restore commands the runbooks of docs/operations.md give, as written there."""
    text = (ROOT / "docs" / "operations.md").read_text()
    return re.findall(r"^deploy/postgres/restore .*$", text, re.M)


def restore(stack, *args: str) -> subprocess.CompletedProcess:
    """deploy/postgres/restore, with this project's compose command (COMPOSE, as it documents)."""
    env = {**stack.env, "COMPOSE": " ".join(stack.base)}
    return run([str(ROOT / "deploy" / "postgres" / "restore"), *args], timeout=600, env=env)


@step
def test_6_backups_undo_a_mistake_and_survive_losing_the_data_volume(stack):
    # The backup service's first full backup, recorded for /metrics; WAL segments archived.
    wait_for("the first base backup", lambda: stack.psql("SELECT count(*) FROM base_backups WHERE kind = 'full'") == [["1"]], 120)
    ((archived, failing),) = stack.psql("SELECT archived_count, last_failed_time > last_archived_time FROM pg_stat_archiver")
    assert int(archived) > 0 and failing in ("f", ""), (archived, failing)
    # A write is archived within a few seconds by itself (archive_timeout, which the healthcheck's
    # wake-up makes count from the server's start): the RPO docs/operations.md states.
    ((segment,),) = stack.psql("SELECT last_archived_wal FROM pg_stat_archiver")
    stack.start_and_end(PHYSICIAN["pitr"], START - dt.timedelta(days=1), 60)
    wait_for("the write's segment archived", lambda: stack.psql("SELECT last_archived_wal FROM pg_stat_archiver") != [[segment]], 5, 0.2)
    metrics = stack.http.get(f"{stack.api}/metrics", timeout=5).text
    assert re.search(r"^clinic_base_backup_age_seconds \d", metrics, re.M) and "clinic_wal_archive_failing 0.0" in metrics, metrics[-1500:]
    commands = runbook_commands()
    assert any(c.startswith("deploy/postgres/restore --time ") for c in commands) and "deploy/postgres/restore --latest" in commands, commands

    def totals():
        ((appointments, queued, entries),) = stack.psql(
            "SELECT (SELECT count(*) FROM appointments), (SELECT count(*) FROM billing_queue), (SELECT count(*) FROM billing_entries)"
        )
        return int(appointments), int(queued), int(entries)

    # An operator's mistake, then the runbook: the time of the DROP from the db log, restore to it.
    before = totals()
    stack.psql("DROP TABLE billing_queue CASCADE")
    logs = stack.compose("logs", "--no-color", "--no-log-prefix", "db", timeout=60).stdout
    found = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ UTC) .*statement: DROP TABLE billing_queue CASCADE", logs, re.M)
    assert len(found) == 1, logs[-3000:]
    done = restore(stack, "--time", found[0])
    assert json.loads(done.stdout)["counts"]["pending"] == 0, done.stdout  # reconcile's report; exit 0
    stack.wait_healthy(workers=1, timeout=120)
    assert totals() == before
    after_mistake = [stack.start_and_end(PHYSICIAN["pitr_after"], START + dt.timedelta(hours=i), 600 + i) for i in range(5)]
    stack.assert_billed_exactly_once(PHYSICIAN["pitr_after"], after_mistake, timeout=60)

    # Ends acknowledged, then (well past the RPO) the data volume is gone: the db killed, its
    # volume deleted; the runbook restores the last archived WAL into a new one.
    acked = [stack.start_and_end(PHYSICIAN["lost_volume"], START + dt.timedelta(hours=i), 900 + i) for i in range(10)]
    time.sleep(6)
    stack.compose("kill", "db")
    stack.compose("rm", "-f", "-s", "db", "backup")
    run(["docker", "volume", "rm", f"{stack.project}_pgdata"], timeout=60)
    restore(stack, "--latest")
    stack.wait_healthy(workers=1, timeout=120)
    stack.assert_billed_exactly_once(PHYSICIAN["lost_volume"], acked, timeout=60)
    assert totals() == (before[0] + 15, before[1] + 15, before[2] + 15)


@step
def test_7_everything_stops_cleanly_and_down_leaves_nothing(stack):
    began = time.monotonic()
    stack.compose("stop", "-t", "10", timeout=120)
    took = time.monotonic() - began
    assert took < 9, f"stop took {took:.1f}s: something waited for docker's 10 s kill"
    codes = {c["Name"].lstrip("/"): c["State"]["ExitCode"] for c in stack.containers()}
    assert codes and all(code == 0 for code in codes.values()), f"exit codes after SIGTERM: {codes}"

    stack.compose("down", "-v", "--remove-orphans", timeout=180)
    label = f"label=com.docker.compose.project={stack.project}"
    for kind in (["ps", "-aq"], ["volume", "ls", "-q"], ["network", "ls", "-q"]):
        left = run(["docker", *kind, "--filter", label]).stdout.split()
        assert not left, f"left after down -v: docker {' '.join(kind)} -> {left}"
