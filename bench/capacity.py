"""Capacity, measured: the API's throughput behind HAProxy, PostgreSQL alone, and the workers' drain.

    .venv/bin/python bench/capacity.py [--seconds 5] [--repeats 2] [--connections 16,64]
                                       [--backlog 100000] [--workers 1,2,4] [--out FILE]
                                       [--database-url postgresql://postgres@127.0.0.1:5432/postgres]

Needs wrk, haproxy and pgbench on the PATH (Debian packages wrk, haproxy, postgresql-client) and a
superuser's URL: every database it makes on that server (clinic_capacity_*) is dropped at the end,
also on an error, Ctrl-C or SIGTERM, after every process it started is stopped. Should this
script be killed outright (SIGKILL), the kernel still sends each of those processes SIGTERM
(setpriv --pdeathsig); only the databases are left then, to drop by hand.

1. Throughput. Two real `python appointments.py` processes (8 waitress threads each, logged in as
   clinic_api, LOG_LEVEL=WARNING so that no log line per request is in the figure) and HAProxy
   with deploy/haproxy/haproxy.cfg (its addresses from the environment; api2 put into
   maintenance through the runtime API for the one-process configuration). wrk (2 threads) drives
   POST /appointments (bench/capacity_start.lua) and POST /appointments/{id}/end
   (bench/bench_end.lua: appointments made open in SQL beforehand, each ended once) at each
   connection count against: one process directly, one behind HAProxy, two behind HAProxy. Each
   cell: a 1 s warm-up, then --seconds measured. No billing worker runs meanwhile.
2. PostgreSQL alone: pgbench (16 clients, -M prepared, as clinic_api) runs the API's own
   statements (appointments.py): the start, the end transaction, and the end without its NOTIFY;
   measured over --seconds inside a run of --seconds + 3, while every client is connected.
3. Drain: a backlog of --backlog ended appointments with their pending charges, inserted and
   ANALYZEd in one transaction that is still open while 1, 2 or 4 `python billing_worker.py`
   processes start (BILLING_POLL_SECONDS=0.2, default batch of 500); its COMMIT (with a NOTIFY,
   as an end sends) is time zero; done when billing_queue has no pending row. Each drain in a
   database of its own; the ledger is checked (one entry per charge) afterwards.

Every cell reads, from before to after its measured window: CPU seconds (utime + stime from
/proc/<pid>/stat) of each service process, of HAProxy and of pgbench; of wrk (getrusage of
the children waited for); of PostgreSQL, summed over its processes in three parts: the client backends of this
run's databases, the server's background processes (WAL writer, checkpointer, autovacuum ...,
shared with everything else on the server) and other databases' backends (other work); the
machine's busy cores (/proc/stat) and load average; the server's WAL written
(pg_current_wal_lsn, server-wide); and, sampled every 0.1 s from pg_stat_activity, what this
run's backends were doing (on CPU, waiting for a lock or for WAL, or idle in a transaction while
the service runs Python). Prints one table per experiment and writes everything as JSON to
bench/results/capacity-<UTC date and time>.json (or --out). Takes about 5 minutes on 2 cores
(7.5 with --repeats 3). docs/scaling.md reads the figures.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import appointments  # noqa: E402
from db import apply_schema  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
# What the services read from the environment, and a backlog as the API would leave it.
from support import MAKE_BACKLOG, SERVICE_VARS  # noqa: E402

HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
START_LUA = ROOT / "bench" / "capacity_start.lua"
END_LUA = ROOT / "bench" / "bench_end.lua"
WRK_THREADS = 2
WARMUP_SECONDS = 1
# Open appointments made for each measured end cell: more than any configuration ends per second
# here (bench_end.lua reports repeats should one run out).
ENDS_PER_SECOND_CEILING = 4000
PGBENCH_CLIENTS = 16
PGBENCH_STATEMENTS = ("start", "end", "end without NOTIFY")
# Open appointments made for each pgbench end run: more than 16 clients end per second here.
PGBENCH_CEILING = 8000
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Open appointments for the end cells (ended by wrk with end_date 15:00: price 400.00).
MAKE_OPEN = """
INSERT INTO appointments (id, physician_id, patient_id, start_date, hourly_rate)
SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), timestamptz '2020-12-01 13:00:00+00', 200.00
FROM generate_series(1, %(n)s)
RETURNING id
"""

# pgbench's open appointments: client c's i-th end is appointment md5('pgbench-<run>-<c>-<i>').
MAKE_PGBENCH_OPEN = """
INSERT INTO appointments (id, physician_id, patient_id, start_date, hourly_rate)
SELECT md5('pgbench-' || %(run)s || '-' || c || '-' || i)::uuid, gen_random_uuid(), gen_random_uuid(),
       timestamptz '2020-12-01 13:00:00+00', 200.00
FROM generate_series(0, %(clients)s - 1) c, generate_series(1, %(per_client)s) i
"""

PG_SETTINGS = (
    "shared_buffers", "max_connections", "synchronous_commit", "fsync", "wal_sync_method", "commit_delay",
    "wal_level", "max_wal_size", "checkpoint_timeout", "autovacuum", "jit", "work_mem",
)


LEGEND = """Columns: CPU per request (or transaction, or charge) of the API processes, HAProxy, PostgreSQL's
backends of this run's database ("PG"), PostgreSQL's background processes ("PG bg": WAL writer,
checkpointer ..., server-wide), the load generator; WAL B: bytes of WAL per request, the server's
whole WAL over the window (other work on the server adds to it: the least of the runs); cores: CPU
seconds per second of the service processes / of PG's backends of this run / of the whole machine
(busy, /proc/stat); load: the 1-minute load average at the start of the window; PG backends: the
average number of this run's backends in each state (pg_stat_activity every 0.1 s), idle left out:
"on CPU", "idle in transaction" (the service's Python runs between two statements of a
transaction), Lock:object (the lock every NOTIFYing transaction takes, held to the end of its
commit), LWLock:WALWrite and IO:WALSync (waiting for a commit's WAL flush)."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Resource readings


def process_cpu(pid: int) -> float | None:
    """utime + stime of a process (all its threads) in seconds; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # fields[0] is field 3 (state) of proc(5)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def machine_jiffies() -> dict[str, int]:
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return {"busy": user + nice + system + irq + softirq, "steal": steal, "idle": idle + iowait}


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Observer:
    """A superuser connection to the server (not to the databases measured) that reads
    PostgreSQL's processes, the WAL position and what this run's backends are doing."""

    def __init__(self, admin_url: str):
        self.conn = psycopg.connect(admin_url, autocommit=True)
        self.own_pid = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        self.postmaster = parent_pid(self.own_pid)
        self.ours: set[str] = set()  # this run's databases

    def postgres_cpu(self) -> dict[int, tuple[str, float]]:
        """pid -> (part, CPU seconds) over PostgreSQL's processes: "ours" (client backends of
        this run's databases), "background" (the postmaster and every non-client process),
        "other" (other databases' backends, and this observer's)."""
        rows = self.conn.execute("SELECT pid, datname, backend_type FROM pg_stat_activity").fetchall()
        parts = {self.postmaster: "background"}
        for pid, datname, backend_type in rows:
            if backend_type != "client backend":
                parts[pid] = "background"
            elif datname in self.ours and pid != self.own_pid:
                parts[pid] = "ours"
            else:
                parts[pid] = "other"
        readings = {pid: (part, process_cpu(pid)) for pid, part in parts.items()}
        return {pid: (part, cpu) for pid, (part, cpu) in readings.items() if cpu is not None}

    def wal_lsn(self) -> str:
        return self.conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]

    def wal_bytes(self, start: str, end: str) -> int:
        return int(self.conn.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, %s::pg_lsn)", [end, start]).fetchone()[0])

    def close(self) -> None:
        self.conn.close()


class ActivitySampler(threading.Thread):
    """Every 0.1 s, what each client backend of this run's databases is doing (pg_stat_activity):
    on CPU (active, no wait event), waiting (active, "<type>:<event>", e.g. Lock:object for the
    NOTIFY queue's lock, IO:WALSync for a commit's flush), "idle in transaction" (the service's
    Python is running inside a transaction) or idle. The result: the average number of backends
    in each state."""

    QUERY = """
    SELECT CASE WHEN state = 'active' AND wait_event IS NULL THEN 'on CPU'
                WHEN state = 'active' THEN wait_event_type || ':' || wait_event
                ELSE state END
    FROM pg_stat_activity
    WHERE backend_type = 'client backend' AND datname = ANY(%s) AND pid <> pg_backend_pid()
    """

    def __init__(self, admin_url: str, databases: list[str], interval: float = 0.1):
        super().__init__(name="activity-sampler", daemon=True)
        self._url, self._databases, self._interval = admin_url, databases, interval
        self._halt = threading.Event()
        self._counts: collections.Counter[str] = collections.Counter()
        self._samples = 0

    def run(self) -> None:
        with psycopg.connect(self._url, autocommit=True, application_name="capacity-sampler") as conn:
            while not self._halt.wait(self._interval):
                states = conn.execute(self.QUERY, [self._databases]).fetchall()
                self._counts.update(state for (state,) in states)
                self._samples += 1

    def result(self) -> dict[str, float]:
        self._halt.set()
        self.join(timeout=5)
        n = max(self._samples, 1)
        return {state: round(count / n, 2) for state, count in self._counts.most_common()}


class Window:
    """The resources used between start() and stop(): named processes, PostgreSQL, the
    machine, the children waited for (wrk), the WAL."""

    def __init__(self, observer: Observer, processes: dict[str, int], admin_url: str, databases: list[str]):
        self._observer, self._processes = observer, processes
        self._sampler = ActivitySampler(admin_url, databases)

    def start(self) -> Window:
        self._sampler.start()
        self._load = loadavg()
        self._lsn = self._observer.wal_lsn()
        self._pg = self._observer.postgres_cpu()
        self._proc = {name: process_cpu(pid) for name, pid in self._processes.items()}
        self._children = children_cpu()
        self._jiffies = machine_jiffies()
        self._t = time.monotonic()
        return self

    def stop(self) -> dict:
        wall = time.monotonic() - self._t
        jiffies = machine_jiffies()
        children = children_cpu()
        proc = {name: process_cpu(pid) for name, pid in self._processes.items()}
        pg_after = self._observer.postgres_cpu()
        lsn = self._observer.wal_lsn()
        postgres = {"ours": 0.0, "background": 0.0, "other": 0.0}
        for pid, (part, cpu) in pg_after.items():
            before = self._pg.get(pid)
            postgres[part] += cpu - (before[1] if before else 0.0)  # a process started meanwhile: all of it
        gone = [pid for pid in self._pg if pid not in pg_after]
        cpu = {name: round(proc[name] - self._proc[name], 3) for name in proc if proc[name] is not None and self._proc[name] is not None}
        return {
            "wall_seconds": round(wall, 3),
            "cpu_seconds": {
                # the client: wrk, waited for in the window; pgbench, still running, read like a service
                "client": round(children - self._children, 3),
                **cpu,
                "postgres": {part: round(value, 3) for part, value in postgres.items()},
            },
            "postgres_processes_gone": len(gone),  # their CPU in the window is missing above
            "machine_busy_cores": round((jiffies["busy"] - self._jiffies["busy"]) / CLK_TCK / wall, 2),
            "machine_steal_cores": round((jiffies["steal"] - self._jiffies["steal"]) / CLK_TCK / wall, 2),
            "load_before": self._load,
            "load_after": loadavg(),
            "wal_bytes_server": self._observer.wal_bytes(self._lsn, lsn),
            "backends": self._sampler.result(),
        }


# ---------------------------------------------------------------------------------------------
# Processes


class Processes:
    """Every process this run starts; stop_all() stops those still running, whatever happened."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, stdout_path: Path | None = None) -> subprocess.Popen:
        log_path = stdout_path or self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            # setpriv --pdeathsig: the kernel sends SIGTERM should this script die without its
            # clean-up (SIGKILL), so nothing is left behind in any case.
            process = subprocess.Popen(
                ["setpriv", "--pdeathsig", "TERM", "--", *argv], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        process.log_path = log_path  # type: ignore[attr-defined]
        self._running.append((name, process))
        return process

    def stop(self, process: subprocess.Popen, timeout: float = 10) -> int:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self._running = [(n, p) for n, p in self._running if p is not process]
        return process.returncode

    def stop_all(self) -> None:
        for _, process in reversed(self._running):
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + 10
        for name, process in reversed(self._running):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"  {name} did not stop on SIGTERM: SIGKILL")
                process.kill()
                process.wait(timeout=5)
        self._running = []


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def wait_http(url: str, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {process.returncode}:\n{tail(process.log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout} s:\n{tail(process.log_path)}")
        time.sleep(0.1)


def service_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARS}
    # Warnings only: no JSON line per request (the README puts its cost at about 9 µs each).
    return {**env, "LOG_LEVEL": "WARNING", "LOG_FORMAT": "json", **values}


def as_role(url: str, role: str) -> str:
    return psycopg.conninfo.make_conninfo(url, user=role)


class HAProxy:
    """haproxy -f deploy/haproxy/haproxy.cfg in the foreground, its addresses in the environment."""

    def __init__(self, processes: Processes, api_ports: list[int], work_dir: Path):
        self.port = free_port()
        self.socket_path = work_dir / "haproxy.sock"
        env = {
            **os.environ,
            "CLINIC_LB_BIND": f"127.0.0.1:{self.port}",
            "CLINIC_API1": f"127.0.0.1:{api_ports[0]}",
            "CLINIC_API2": f"127.0.0.1:{api_ports[1]}",
            "HAPROXY_STATS_SOCKET": str(self.socket_path),
        }
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c refused {HAPROXY_CFG}: {check.stdout}{check.stderr}")
        self.process = processes.start("haproxy", ["haproxy", "-f", str(HAPROXY_CFG), "-db"], env)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_http(self.url + "/ready", self.process)
        self.wait_for("api1", "UP")
        self.wait_for("api2", "UP")

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket_path))
            s.sendall(line.encode() + b"\n")
            return s.makefile(errors="replace").read()

    def status(self, server: str) -> str:
        for row in self.command("show stat").splitlines():
            fields = row.split(",")
            if len(fields) > 17 and fields[0] == "api" and fields[1] == server:
                return fields[17]
        return "unknown"

    def wait_for(self, server: str, status: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while (current := self.status(server)) != status:
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy: {server} is {current}, not {status}, after {timeout} s:\n{tail(self.process.log_path)}")
            time.sleep(0.1)

    def use_servers(self, count: int) -> None:
        """api2 in maintenance (one process) or in service (two)."""
        if count == 1:
            self.command("disable server api/api2")
            self.wait_for("api2", "MAINT")
        else:
            self.command("enable server api/api2")
            self.wait_for("api2", "UP")


# ---------------------------------------------------------------------------------------------
# The experiments


def run_wrk(processes: Processes, work_dir: Path, script: Path, url: str, connections: int, seconds: float, extra: list[str]) -> dict:
    out = work_dir / "wrk.out"
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", str(script), url, *extra]
    process = processes.start("wrk", argv, dict(os.environ), stdout_path=out)
    try:
        process.wait(timeout=seconds + 60)
    finally:
        processes.stop(process)
    text = out.read_text(errors="replace")
    found = re.search(r"^CAPACITY (\{.*\})$", text, re.M)
    if process.returncode != 0 or not found:
        raise RuntimeError(f"wrk failed ({process.returncode}): {text}")
    return json.loads(found.group(1))


def write_open_appointments(conn, n: int, path: Path) -> None:
    ids = conn.execute(MAKE_OPEN, {"n": n}).fetchall()
    path.write_text("".join(f"{i}\n" for (i,) in ids))


def throughput(ctx: dict, op: str, config: dict, connections: int, repeat: int) -> dict:
    """One cell: a warm-up, then the measured wrk run with its resource window."""
    processes, work_dir, seconds = ctx["processes"], ctx["work_dir"], ctx["seconds"]
    if config["via"] == "haproxy":
        ctx["haproxy"].use_servers(config["processes"])
        base = ctx["haproxy"].url
    else:
        base = ctx["api_urls"][0]
    conn = ctx["conn"]
    if op == "start":
        script, url = START_LUA, base + "/appointments"
        warm_args = measured_args = []
    else:
        script, url = END_LUA, base
        warm_ids, ids = work_dir / "warm-ids.txt", work_dir / "ids.txt"
        write_open_appointments(conn, ENDS_PER_SECOND_CEILING * WARMUP_SECONDS, warm_ids)
        write_open_appointments(conn, int(ENDS_PER_SECOND_CEILING * seconds), ids)
        warm_args, measured_args = ["--", str(warm_ids), str(WRK_THREADS)], ["--", str(ids), str(WRK_THREADS)]
    run_wrk(processes, work_dir, script, url, connections, WARMUP_SECONDS, warm_args)
    queued_before = conn.execute("SELECT count(*) FROM billing_queue").fetchone()[0]
    tracked = {"api1": ctx["api"][0].pid, "haproxy": ctx["haproxy"].process.pid}
    if config["processes"] == 2:
        tracked["api2"] = ctx["api"][1].pid
    window = Window(ctx["observer"], tracked, ctx["admin_url"], [ctx["dbname"]]).start()
    wrk = run_wrk(processes, work_dir, script, url, connections, seconds, measured_args)
    resources = window.stop()
    if config["via"] == "direct":
        resources["cpu_seconds"].pop("haproxy", None)  # idle; its health checks only
    queued = conn.execute("SELECT count(*) FROM billing_queue").fetchone()[0] - queued_before
    extra = {}
    if op == "end":  # every end queued one charge; ends beyond the file would have been repeats
        extra = {"queued": queued, "repeats": max(0, wrk["ids_used"] - int(ENDS_PER_SECOND_CEILING * seconds))}
    return cell(op, config, connections, repeat, wrk, resources, **extra)


def cell(experiment: str, config: dict, connections: int, repeat: int, wrk: dict, resources: dict, **extra) -> dict:
    seconds = wrk["duration_us"] / 1e6
    errors = sum(v for k, v in wrk.items() if k.startswith("errors_"))
    result = {
        "experiment": experiment,
        "config": config["name"],
        "via": config["via"],
        "api_processes": config["processes"],
        "connections": connections,
        "repeat": repeat,
        "requests": wrk["requests"],
        "seconds": round(seconds, 3),
        "requests_per_second": round(wrk["requests"] / seconds, 1),
        "p50_ms": wrk["p50_us"] / 1000,
        "p90_ms": wrk["p90_us"] / 1000,
        "p99_ms": wrk["p99_us"] / 1000,
        "max_ms": wrk["max_us"] / 1000,
        "errors": errors,
        "wrk": wrk,
        **resources,
    }
    result.update({k: v for k, v in extra.items() if v is not None})
    result["cpu_ms_per_request"] = per_request(resources["cpu_seconds"], wrk["requests"])
    result["wal_bytes_per_request_server"] = round(resources["wal_bytes_server"] / max(wrk["requests"], 1), 1)
    return result


def per_request(cpu: dict, n: int) -> dict:
    n = max(n, 1)
    api = sum(v for k, v in cpu.items() if k.startswith("api"))
    out = {"api": round(api / n * 1000, 3)}
    for key in ("haproxy", "client"):
        if key in cpu:
            out[key] = round(cpu[key] / n * 1000, 3)
    out["postgres"] = round(cpu["postgres"]["ours"] / n * 1000, 3)
    out["postgres_background"] = round(cpu["postgres"]["background"] / n * 1000, 3)  # server-wide
    return out


def pgbench_script(kind: str) -> str:
    """The API's statements (appointments.py) for pgbench: values in place of its parameters."""
    if kind == "start":
        text = appointments.INSERT_APPOINTMENT
        values = {"id": "gen_random_uuid()", "physician_id": "'ea959b03-5577-45c9-b9f7-a45d3e77ce82'::uuid",
                  "patient_id": "'86158d46-ce33-4e3d-9822-462bbff5782e'::uuid", "start_date": "NULL::timestamptz",
                  "hourly_rate": "200.00"}
        return text.strip() % values + ";\n"
    appointment = "md5('pgbench-' || :run || '-' || :client_id || '-' || :i)::uuid"
    end = appointments.END_AND_QUEUE_CHARGE
    if kind == "end without NOTIFY":
        end = end.replace("SELECT pg_notify('billing_queue', appointment_id::text) FROM queued", "SELECT appointment_id FROM queued")
        assert "pg_notify" not in end
    values = {"id": appointment, "end_date": "timestamptz '2020-12-01 15:00:00+00'", "price": "400.00", "request_id": "'pgbench'"}
    return (
        "\\set i :i + 1\nBEGIN;\n"
        + appointments.LOCK_APPOINTMENT.strip() % {"id": appointment} + ";\n"
        + end.strip() % values + ";\nCOMMIT;\n"
    )


def postgres_alone(ctx: dict, kind: str, run: int, repeat: int) -> dict:
    """pgbench runs the statement for --seconds + 3 s; the window is the --seconds after its first
    second, while every client is connected (a backend that has exited can no longer be read), and
    the transactions counted are those that started in the window (created_at, the rows' now())."""
    conn, work_dir, seconds = ctx["conn"], ctx["work_dir"], ctx["seconds"]
    duration = seconds + 3
    if kind != "start":
        per_client = math.ceil(PGBENCH_CEILING * duration / PGBENCH_CLIENTS)
        conn.execute(MAKE_PGBENCH_OPEN, {"run": run, "clients": PGBENCH_CLIENTS, "per_client": per_client})
    script = work_dir / "pgbench.sql"
    script.write_text(pgbench_script(kind))
    url = as_role(ctx["url"], "clinic_api")
    argv = ["pgbench", "-n", "-M", "prepared", "-c", str(PGBENCH_CLIENTS), "-j", "2", "-T", str(duration),
            "-D", f"run={run}", "-D", "i=0", "-f", str(script), url]
    out = work_dir / "pgbench.out"
    process = ctx["processes"].start("pgbench", argv, dict(os.environ), stdout_path=out)
    try:
        time.sleep(1)
        window = Window(ctx["observer"], {"client": process.pid}, ctx["admin_url"], [ctx["dbname"]]).start()
        t_a = time.time()
        time.sleep(seconds)
        t_b = time.time()
        resources = window.stop()
        if process.poll() is not None:
            raise RuntimeError(f"pgbench ended before the window did: {tail(out)}")
        process.wait(timeout=duration + 60)
    finally:
        ctx["processes"].stop(process)
    text = out.read_text(errors="replace")
    latency = re.search(r"latency average = ([0-9.]+) ms", text)
    if process.returncode != 0 or not latency:
        raise RuntimeError(f"pgbench failed ({process.returncode}): {text}")
    table = "appointments" if kind == "start" else "billing_queue"
    n = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE created_at >= to_timestamp(%s) AND created_at < to_timestamp(%s)")
                     .format(sql.Identifier(table)), [t_a, t_b]).fetchone()[0]
    if kind != "start":
        left = conn.execute("SELECT count(*) FROM appointments WHERE id = md5('pgbench-' || %s || '-0-' || %s)::uuid AND end_date IS NULL",
                            [run, per_client]).fetchone()[0]
        if not left:
            raise RuntimeError(f"pgbench {kind}: client 0 ran out of open appointments (raise PGBENCH_CEILING)")
    return {
        "experiment": "postgres alone",
        "statement": kind,
        "repeat": repeat,
        "clients": PGBENCH_CLIENTS,
        "transactions": n,
        "transactions_per_second": round(n / (t_b - t_a), 1),
        "latency_average_ms": float(latency.group(1)),  # pgbench's, over its whole run
        **resources,
        "cpu_ms_per_transaction": {
            "postgres": round(resources["cpu_seconds"]["postgres"]["ours"] / n * 1000, 3),
            "client": round(resources["cpu_seconds"]["client"] / n * 1000, 3),
        },
    }


def drain(ctx: dict, workers: int, repeat: int) -> dict:
    """A backlog of ctx["backlog"] charges, committed while `workers` workers wait; time until none is pending."""
    admin, processes, n = ctx["admin_url"], ctx["processes"], ctx["backlog"]
    name = f"{ctx['dbname']}_drain{workers}_{repeat}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name), sql.Identifier(ctx["template"])))
    ctx["databases"].append(name)
    ctx["observer"].ours.add(name)
    url = psycopg.conninfo.make_conninfo(admin, dbname=name)
    started = []
    with psycopg.connect(url) as loader:  # one transaction, left open until time zero
        loader.execute(MAKE_BACKLOG, {"n": n})
        loader.execute("ANALYZE appointments")
        loader.execute("ANALYZE billing_queue")
        loader.execute("SELECT pg_notify('billing_queue', '')")
        for k in range(workers):
            port = free_port()
            env = service_env(DATABASE_URL=as_role(url, "clinic_worker"), BILLING_PORT=str(port), BILLING_POLL_SECONDS="0.2")
            started.append((port, processes.start(f"worker{k + 1}", [sys.executable, str(ROOT / "billing_worker.py")], env)))
        for port, process in started:
            wait_http(f"http://127.0.0.1:{port}/health", process)
        time.sleep(0.5)  # their first (empty) passes done
        tracked = {f"worker{k + 1}": process.pid for k, (_, process) in enumerate(started)}
        window = Window(ctx["observer"], tracked, admin, [name]).start()
        t0 = time.time()
        loader.commit()
    with psycopg.connect(url, autocommit=True) as watch:
        deadline = time.monotonic() + 600
        while watch.execute("SELECT EXISTS (SELECT FROM billing_queue WHERE status = 'pending')").fetchone()[0]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"drain with {workers} workers: still pending after 600 s")
            time.sleep(0.05)
        t_done = time.time()
        resources = window.stop()
        for _, process in started:
            processes.stop(process)
        first, last, entries, failed = watch.execute(
            "SELECT extract(epoch FROM min(created_at)), extract(epoch FROM max(created_at)), count(*),"
            " (SELECT count(*) FROM billing_queue WHERE status <> 'billed') FROM billing_entries"
        ).fetchone()
        if entries != n or failed:
            raise RuntimeError(f"drain with {workers} workers: {entries} entries for {n} charges, {failed} not billed")
        sizes = relation_sizes(watch) if repeat == 0 and workers == ctx["workers"][0] else None
    seconds = t_done - t0
    result = {
        "experiment": "drain",
        "workers": workers,
        "repeat": repeat,
        "charges": n,
        "seconds": round(seconds, 3),
        "charges_per_second": round(n / seconds, 1),
        "first_entry_after_seconds": round(float(first) - t0, 3),
        "last_batch_started_after_seconds": round(float(last) - t0, 3),
        **resources,
        "cpu_us_per_charge": {
            "workers": round(sum(v for k, v in resources["cpu_seconds"].items() if k.startswith("worker")) / n * 1e6, 1),
            "postgres": round(resources["cpu_seconds"]["postgres"]["ours"] / n * 1e6, 1),
        },
        "wal_bytes_per_charge_server": round(resources["wal_bytes_server"] / n, 1),
    }
    if sizes:
        result["relation_sizes_after"] = sizes
    return result


def relation_sizes(conn) -> dict:
    """Bytes on disk of each table and index, after VACUUM, and per row (the drain's database:
    every appointment ended, its charge billed, its entry written)."""
    conn.execute("VACUUM (ANALYZE) appointments, billing_queue, billing_entries")
    rows = conn.execute(
        """
        SELECT c.relname, c.relkind, coalesce(i.indrelid::regclass::text, c.relname) AS of_table,
               pg_relation_size(c.oid) AS bytes
        FROM pg_class c LEFT JOIN pg_index i ON i.indexrelid = c.oid
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'i')
        ORDER BY of_table, c.relkind DESC, c.relname
        """
    ).fetchall()
    counts = {t: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(t))).fetchone()[0]
              for t in ("appointments", "billing_queue", "billing_entries")}
    toast = {t: conn.execute("SELECT coalesce(pg_relation_size(reltoastrelid), 0) FROM pg_class WHERE oid = %s::regclass", [t]).fetchone()[0]
             for t in counts}
    return {
        "rows": counts,
        "relations": [
            {"name": name, "kind": "table" if kind == "r" else "index", "table": table, "bytes": size,
             "bytes_per_row": round(size / max(counts.get(table, 1), 1), 1)}
            for name, kind, table, size in rows
        ],
        "toast_bytes": toast,
    }


# ---------------------------------------------------------------------------------------------
# Reporting


def median(values):
    return statistics.median(values) if values else float("nan")


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = "  ".join(["{:<%d}" % widths[0]] + ["{:>%d}" % w for w in widths[1:]])
    return "\n".join([line.format(*header), line.format(*("-" * w for w in widths)), *(line.format(*row) for row in rows)])


def cores(runs: list[dict], service_prefix: str) -> str:
    """Cores in use, medians: the service processes (API or workers), PostgreSQL's backends of
    this run, the whole machine (everything on it: the load average says how much else ran)."""
    def used(r, key):
        cpu = r["cpu_seconds"]
        value = cpu["postgres"]["ours"] if key == "postgres" else sum(v for k, v in cpu.items() if k.startswith(key))
        return value / r["wall_seconds"]
    return "/".join(f"{median([used(r, key) for r in runs]):.2f}" for key in (service_prefix, "postgres")) + \
        f"/{median([r['machine_busy_cores'] for r in runs]):.2f}"


def states(backends: list[dict], top: int = 3) -> str:
    """The most frequent non-idle backend states, averaged over the cells."""
    total: collections.Counter[str] = collections.Counter()
    for sample in backends:
        total.update(sample)
    busy = [(s, v / len(backends)) for s, v in total.most_common() if s != "idle"]
    return ", ".join(f"{s} {v:.1f}" for s, v in busy[:top])


def throughput_table(cells: list[dict], op: str) -> str:
    groups: dict[tuple, list[dict]] = collections.defaultdict(list)
    for c in cells:
        if c["experiment"] == op:
            groups[(c["config"], c["connections"])].append(c)
    rows = []
    for (config, connections), runs in groups.items():
        rps = [r["requests_per_second"] for r in runs]
        per = [r["cpu_ms_per_request"] for r in runs]
        rows.append([
            config, str(connections),
            f"{median(rps):,.0f}", " ".join(f"{x:,.0f}" for x in rps),
            f"{median([r['p50_ms'] for r in runs]):.1f}", f"{median([r['p99_ms'] for r in runs]):.1f}",
            str(sum(r["errors"] for r in runs)),
            f"{median([p['api'] for p in per]):.2f}",
            f"{median([p.get('haproxy', 0) for p in per]):.2f}" if runs[0]["via"] == "haproxy" else "-",
            f"{median([p['postgres'] for p in per]):.2f}",
            f"{median([p['postgres_background'] for p in per]):.2f}",
            f"{median([p['client'] for p in per]):.2f}",
            f"{min(r['wal_bytes_per_request_server'] for r in runs):,.0f}",
            cores(runs, "api"),
            f"{median([r['load_before'][0] for r in runs]):.1f}",
            states([r["backends"] for r in runs]),
        ])
    header = ["configuration", "conns", "req/s", "each run", "p50 ms", "p99 ms", "errors", "API ms/req",
              "HAProxy", "PG", "PG bg", "wrk", "WAL B/req", "cores API/PG/all", "load", "PG backends (average)"]
    return fmt_table(header, rows)


def postgres_table(cells: list[dict]) -> str:
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for c in cells:
        groups[c["statement"]].append(c)
    rows = []
    for kind, runs in groups.items():
        tps = [r["transactions_per_second"] for r in runs]
        rows.append([
            kind, f"{median(tps):,.0f}", " ".join(f"{x:,.0f}" for x in tps),
            f"{median([r['latency_average_ms'] for r in runs]):.1f}",
            f"{median([r['cpu_ms_per_transaction']['postgres'] for r in runs]):.3f}",
            f"{median([r['cpu_ms_per_transaction']['client'] for r in runs]):.3f}",
            f"{min(r['wal_bytes_server'] / r['transactions'] for r in runs):,.0f}",
            cores(runs, "client"),
            f"{median([r['load_before'][0] for r in runs]):.1f}",
            states([r["backends"] for r in runs]),
        ])
    header = ["statement", "tx/s", "each run", "latency ms", "PG ms/tx", "pgbench ms/tx", "WAL B/tx", "cores pgbench/PG/all", "load", "PG backends (average)"]
    return fmt_table(header, rows)


def drain_table(cells: list[dict]) -> str:
    groups: dict[int, list[dict]] = collections.defaultdict(list)
    for c in cells:
        groups[c["workers"]].append(c)
    rows = []
    for workers, runs in sorted(groups.items()):
        rate = [r["charges_per_second"] for r in runs]
        rows.append([
            str(workers), f"{median(rate):,.0f}", " ".join(f"{x:,.0f}" for x in rate),
            f"{median([r['seconds'] for r in runs]):.1f}",
            f"{median([r['first_entry_after_seconds'] for r in runs]):.2f}",
            f"{median([r['cpu_us_per_charge']['workers'] for r in runs]):.0f}",
            f"{median([r['cpu_us_per_charge']['postgres'] for r in runs]):.0f}",
            f"{min(r['wal_bytes_per_charge_server'] for r in runs):,.0f}",
            cores(runs, "worker"),
            f"{median([r['load_before'][0] for r in runs]):.1f}",
            states([r["backends"] for r in runs]),
        ])
    header = ["workers", "charges/s", "each run", "drain s", "1st entry s", "workers µs/charge", "PG µs/charge",
              "WAL B/charge", "cores workers/PG/all", "load", "PG backends (average)"]
    return fmt_table(header, rows)


def machine(conn) -> dict:
    settings = dict(conn.execute("SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name = ANY(%s)", [list(PG_SETTINGS)]).fetchall())
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")

    def version(argv):
        done = subprocess.run(argv, capture_output=True, text=True)
        return (done.stdout or done.stderr).strip().splitlines()[0]

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "memory_mb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": conn.execute("SELECT version()").fetchone()[0],
        "postgresql_settings": settings,
        "haproxy": version(["haproxy", "-v"]),
        "wrk": version(["wrk", "-v"]),
        "pgbench": version(["pgbench", "--version"]),
        "git_commit": commit + (" (with uncommitted changes)" if dirty else ""),
    }


def commit_flush(work_dir: Path, data_directory: str) -> dict | None:
    """pg_test_fsync's one 8 kB write + fdatasync (PostgreSQL's wal_sync_method on Linux) in the
    scratch directory (the floor of a commit when that is the file system of the server's data)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_test_fsync"))
    if not found:
        return None
    done = subprocess.run([str(found[-1]), "-s", "1", "-f", str(work_dir / "fsync.tmp")], capture_output=True, text=True, timeout=120)
    one_write = done.stdout.split("using two 8kB writes")[0]
    hit = re.search(r"^\s+fdatasync\s+([0-9.]+) ops/sec\s+([0-9]+) usecs/op", one_write, re.M)
    try:
        same = os.stat(work_dir).st_dev == os.stat(data_directory).st_dev
    except OSError:
        same = None
    return {"tool": found[-1].name, "fdatasync_ops_per_second": float(hit.group(1)), "fdatasync_us": int(hit.group(2)),
            "same_file_system_as_the_server_data": same} if hit else None


# ---------------------------------------------------------------------------------------------


def run(args, ctx: dict, report: dict) -> None:
    admin, processes, work_dir = ctx["admin_url"], ctx["processes"], ctx["work_dir"]
    name = ctx["dbname"]
    with psycopg.connect(admin, autocommit=True) as c:
        for db in (name, ctx["template"]):
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
            ctx["databases"].append(db)
    ctx["observer"].ours.add(name)
    ctx["url"] = url = psycopg.conninfo.make_conninfo(admin, dbname=name)
    apply_schema(url)
    apply_schema(psycopg.conninfo.make_conninfo(admin, dbname=ctx["template"]))
    say(f"scratch databases {name}, {ctx['template']} (template of the drains)")
    ctx["conn"] = psycopg.connect(url, autocommit=True)
    report["machine"] = machine(ctx["conn"])
    data_directory = ctx["conn"].execute("SHOW data_directory").fetchone()[0]
    report["machine"]["commit_flush"] = commit_flush(work_dir, data_directory)

    print(LEGEND)

    # 1. Throughput through HAProxy.
    ports = [free_port(), free_port()]
    ctx["api"] = []
    for k, port in enumerate(ports):
        env = service_env(DATABASE_URL=as_role(url, "clinic_api"), APPOINTMENTS_PORT=str(port))
        ctx["api"].append(processes.start(f"api{k + 1}", [sys.executable, str(ROOT / "appointments.py")], env))
    ctx["api_urls"] = [f"http://127.0.0.1:{port}" for port in ports]
    for base, process in zip(ctx["api_urls"], ctx["api"]):
        wait_http(base + "/ready", process)
    ctx["haproxy"] = HAProxy(processes, ports, work_dir)
    configs = [
        {"name": "1 API, direct", "via": "direct", "processes": 1},
        {"name": "1 API, HAProxy", "via": "haproxy", "processes": 1},
        {"name": "2 APIs, HAProxy", "via": "haproxy", "processes": 2},
    ]
    cells = report["throughput"] = []
    for repeat in range(args.repeats):
        order = configs if repeat % 2 == 0 else configs[::-1]  # drift weighs on each alike
        for op in ("start", "end"):
            for connections in args.connections:
                for config in order:
                    say(f"  {op} · {config['name']} · {connections} connections · run {repeat + 1}")
                    result = throughput(ctx, op, config, connections, repeat)
                    say(f"    {result['requests_per_second']:,.0f} req/s, p99 {result['p99_ms']:.0f} ms, "
                        f"{result['errors']} errors, busy cores {result['machine_busy_cores']}, load {result['load_before'][0]}")
                    cells.append(result)
    processes.stop(ctx["haproxy"].process)
    for process in ctx["api"]:
        processes.stop(process)
    for op, title in (("start", "POST /appointments"), ("end", "POST /appointments/{id}/end")):
        print(f"\n{title}: medians of {args.repeats} runs of {args.seconds} s each (wrk -t{WRK_THREADS} after a "
              f"{WARMUP_SECONDS} s warm-up); ms/req: CPU per request")
        print(throughput_table(cells, op))

    # 2. PostgreSQL alone.
    pg_cells = report["postgres_alone"] = []
    run_number = 0
    for repeat in range(args.repeats):
        for kind in PGBENCH_STATEMENTS:
            run_number += 1
            say(f"  pgbench: {kind} · run {repeat + 1}")
            result = postgres_alone(ctx, kind, run_number, repeat)
            say(f"    {result['transactions_per_second']:,.0f} tx/s, busy cores {result['machine_busy_cores']}, load {result['load_before'][0]}")
            pg_cells.append(result)
    print(f"\nPostgreSQL alone: the API's statements from pgbench ({PGBENCH_CLIENTS} clients, -M prepared, as clinic_api), "
          f"medians of {args.repeats} runs")
    print(postgres_table(pg_cells))
    ctx["conn"].close()

    # 3. Drain.
    drains = report["drain"] = []
    for repeat in range(args.repeats):
        order = args.workers if repeat % 2 == 0 else args.workers[::-1]
        for workers in order:
            say(f"  drain: {args.backlog:,} charges · {workers} workers · run {repeat + 1}")
            result = drain(ctx, workers, repeat)
            say(f"    {result['seconds']:.1f} s, {result['charges_per_second']:,.0f} charges/s, busy cores "
                f"{result['machine_busy_cores']}, load {result['load_before'][0]}")
            drains.append(result)
            with psycopg.connect(admin, autocommit=True) as c:  # as it goes: each holds some 80 MB
                c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(ctx["databases"][-1])))
            ctx["databases"].pop()
    flush = report["machine"]["commit_flush"]
    if flush:
        where = {True: "on the file system of the server's data", False: "on another file system than the server's data", None: ""}
        print(f"\nOne 8 kB write + fdatasync (pg_test_fsync): {flush['fdatasync_us']} µs, "
              f"{where[flush['same_file_system_as_the_server_data']]}")
    print(f"\nDrain: {args.backlog:,} pending charges, committed at once, N `billing_worker.py` started before "
          f"(batches of 500, BILLING_POLL_SECONDS=0.2); medians of {args.repeats} runs")
    print(drain_table(drains))
    sizes = next((d["relation_sizes_after"] for d in drains if "relation_sizes_after" in d), None)
    if sizes:
        print("\nOn disk after a drain (VACUUM, ANALYZE), bytes per row of its table:")
        print(fmt_table(["relation", "table", "MB", "bytes/row"],
                        [[r["name"], r["table"], f"{r['bytes'] / 2**20:.1f}", f"{r['bytes_per_row']:.0f}"] for r in sizes["relations"]]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="measured seconds of each wrk run (default 5)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration (default 2)")
    parser.add_argument("--connections", default="16,64", help="wrk connection counts (default 16,64)")
    parser.add_argument("--backlog", type=int, default=100_000, help="charges per drain (default 100,000)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts of the drains (default 1,2,4)")
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
                        help="a superuser's connection string; the scratch databases are made on that server")
    parser.add_argument("--out", help="the JSON file (default bench/results/capacity-<UTC date and time>.json)")
    args = parser.parse_args(argv)
    args.connections = [int(x) for x in args.connections.split(",")]
    args.workers = [int(x) for x in args.workers.split(",")]
    if any(c < WRK_THREADS for c in args.connections):
        parser.error(f"--connections: at least {WRK_THREADS} (wrk's threads)")
    for tool in ("wrk", "haproxy", "pgbench", "setpriv"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not on the PATH (Debian: apt-get install wrk haproxy postgresql-client util-linux)")

    def on_term(signum, frame):
        raise KeyboardInterrupt  # unwinds to the finally below: processes stopped, databases dropped

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    began = dt.datetime.now(dt.timezone.utc)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"capacity-{began:%Y%m%d-%H%M%S}.json"
    work_dir = Path(tempfile.mkdtemp(prefix="clinic-capacity-"))
    name = f"clinic_capacity_{uuid.uuid4().hex[:8]}"
    ctx = {
        "admin_url": args.database_url, "dbname": name, "template": f"{name}_template", "databases": [],
        "processes": Processes(work_dir), "work_dir": work_dir, "seconds": args.seconds,
        "backlog": args.backlog, "workers": args.workers, "observer": Observer(args.database_url),
    }
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": began.isoformat(timespec="seconds"),
        "load_at_start": loadavg(),
        "settings": {"seconds": args.seconds, "warmup_seconds": WARMUP_SECONDS, "repeats": args.repeats,
                     "connections": args.connections, "wrk_threads": WRK_THREADS, "backlog": args.backlog,
                     "workers": args.workers, "pgbench_clients": PGBENCH_CLIENTS, "log_level": "WARNING"},
    }
    clock = time.monotonic()
    try:
        run(args, ctx, report)
        report["load_at_end"] = loadavg()
        report["duration_seconds"] = round(time.monotonic() - clock, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nmachine: {report['machine']['nproc']} cores ({report['machine']['cpu']}), load average "
              f"{report['load_at_start']} at the start, {report['load_at_end']} at the end; "
              f"{report['duration_seconds']:.0f} s; raw results: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not stop the clean-up
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        ctx["processes"].stop_all()
        if ctx.get("conn") is not None and not ctx["conn"].closed:
            ctx["conn"].close()
        ctx["observer"].close()
        with psycopg.connect(args.database_url, autocommit=True) as c:
            for db in ctx["databases"]:
                c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
        say(f"dropped {', '.join(ctx['databases']) or 'nothing'}")
        shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
