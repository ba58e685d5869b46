"""A highly available PostgreSQL of our own for failover tests: one etcd member and two PostgreSQL
members under Patroni, on ports and directories this test run owns.

    with PatroniCluster(synchronous=True) as cluster:   # up: a leader and a streaming sync standby
        url = cluster.multi_host_url("clinic")          # libpq multi-host, target_session_attrs=read-write
        killed = cluster.kill_leader()                  # SIGKILL patroni, its postmaster and every backend
        cluster.restart_member(killed); cluster.wait_ready()   # it rejoins (pg_rewind) as a replica
        cluster.switchover()                            # the controlled one
        name, pids = cluster.freeze_leader(); ...; cluster.thaw(pids)   # SIGSTOP, later SIGCONT

    with PatroniCluster(isolated=True) as cluster:      # the leader in a network namespace of its own
        cluster.partition_leader(); ...; cluster.heal()  # its link down, then up again

Needs Debian's `patroni` (3.0.x), `etcd-server` (3.4) and `postgresql-15` (the server binaries in
/usr/lib/postgresql/15/bin), run as plain processes (no systemd), and for `isolated` iproute2 and
root (`ip netns`). `missing()` names what is not there. Things that cost time to find:

- Patroni talks to etcd through its v2 API (the `etcd:` key; etcd 3.4 started with
  --enable-v2=true), not the `etcd3:` key. Patroni 3.0.2 (Debian bookworm) lacks the etcd3 fix of
  Patroni pull request 2689: a frozen leader, once resumed, overwrote the leader key that the
  promoted standby held, and the standby demoted itself, rewinding away what it had acknowledged
  meanwhile. With the v2 API the resumed leader sees the new owner and demotes itself, as it
  must (docs/deploy.md says which versions and settings are safe).
- initdb refuses root, so patroni runs as the postgres OS user, started through
  `setpriv --reuid=postgres --regid=postgres --init-groups patroni member.yml`: setpriv execs, so
  the PID we record is patroni's own.
- The postmaster is not patroni's child (Patroni starts it in a session of its own), so it is
  killed by the PID in its `postmaster.pid`, its backends by their parent PID.
- Readiness comes from the REST API's `GET /cluster` JSON (the leader, and a sync standby with lag
  0 on the leader's timeline), not from `patronictl list`.
- With two members only, a switchover needs the other member up: the killed member is brought
  back before the switchover, not after.

Every step's duration goes to `timings` (name → seconds), for the test to print.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import requests
import yaml

from db import apply_schema
from support import children as _children
from support import free_port, freeze, thaw, wait_until
from support import pid_alive as _pid_alive

PG_BINDIR = "/usr/lib/postgresql/15/bin"
TOOLS = {"patroni": "patroni", "etcd": "etcd-server", "setpriv": "util-linux"}
MEMBERS = ("pg1", "pg2")
LOOPBACK = "127.0.0.1"

# Patroni's clock. The leader renews its key every LOOP_WAIT; when it dies, the key expires TTL
# seconds after the last renewal and the standby takes over on its next loop: a failover costs
# about TTL (the defaults, 30/10/10, cost 30 s). Patroni requires
# loop_wait + 2 * retry_timeout <= ttl. 6 s is as short as stays calm on a busy 2-core CI machine:
# a leader demotes itself when it cannot renew within retry_timeout, so a shorter retry_timeout
# turns a slow etcd write into a spurious failover.
TTL = 6
LOOP_WAIT = 1
RETRY_TIMEOUT = 2
# A standby further behind than this (bytes, against the leader's last position in etcd) is not
# promoted. Both runs pause the WAL sender before the kill, so the standby is behind by what the
# leader wrote meanwhile; the default 1 MB could leave the cluster without a leader. In synchronous
# mode it does not matter for durability: only the sync standby, which has every acknowledged
# commit, may be promoted.
MAXIMUM_LAG_ON_FAILOVER = 64 * 1024 * 1024


def missing(isolated: bool = False) -> list[str]:
    """What this machine lacks to run a cluster, as Debian package names (empty when nothing)."""
    lacking = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if not os.path.exists(os.path.join(PG_BINDIR, "initdb")):
        lacking.append("postgresql-15")
    if os.geteuid() != 0:
        lacking.append("(root, to run patroni as the postgres user)")
    if isolated:
        if shutil.which("ip") is None:
            lacking.append("iproute2")
        elif os.geteuid() == 0 and not NetNamespace.possible():
            lacking.append("(network namespaces: `ip netns add` failed)")
    return lacking


class NetNamespace:
    """A network namespace joined to this host by a veth pair, on a /24 of its own in 10.213/16:
    the host's end HOST, the namespace's NS. ``cut()`` takes the namespace's end down: established
    connections go silent (what is sent is never acknowledged) and new ones fail with "No route
    to host", a network partition as a client sees it; ``heal()`` brings it back."""

    def __init__(self):
        self.name = f"clinic{os.getpid() % 100000}{random.randrange(100)}"
        subnet = random.randrange(1, 250)
        self.host, self.ns = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
        self.host_link, self.ns_link = f"{self.name}h"[:15], f"{self.name}n"[:15]
        self.made = False

    @staticmethod
    def possible() -> bool:
        probe = f"clinicprobe{os.getpid() % 10000}"
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
        if made:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return made

    def create(self) -> None:
        self.made = True
        inside = ["ip", "netns", "exec", self.name]
        for argv in (
            ["ip", "netns", "add", self.name],
            ["ip", "link", "add", self.host_link, "type", "veth", "peer", "name", self.ns_link],
            ["ip", "link", "set", self.ns_link, "netns", self.name],
            ["ip", "addr", "add", f"{self.host}/24", "dev", self.host_link],
            ["ip", "link", "set", self.host_link, "up"],
            [*inside, "ip", "addr", "add", f"{self.ns}/24", "dev", self.ns_link],
            [*inside, "ip", "link", "set", self.ns_link, "up"],
            [*inside, "ip", "link", "set", "lo", "up"],
        ):
            subprocess.run(argv, check=True, capture_output=True)

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def cut(self) -> None:
        subprocess.run([*self.prefix(), "ip", "link", "set", self.ns_link, "down"], check=True, capture_output=True)

    def heal(self) -> None:
        subprocess.run([*self.prefix(), "ip", "link", "set", self.ns_link, "up"], check=True, capture_output=True)

    def destroy(self) -> None:
        if self.made:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            subprocess.run(["ip", "link", "del", self.host_link], capture_output=True)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Member:
    """One PostgreSQL member: its patroni process, data directory, ports and log."""

    def __init__(self, name: str, root: Path, host: str = LOOPBACK, netns: NetNamespace | None = None):
        self.name = name
        self.host = host  # where the others reach it
        self.netns = netns  # the namespace it runs in, if not this host's
        self.dir = root / name
        self.data_dir = self.dir / "data"
        self.config_path = self.dir / "patroni.yml"
        self.log_path = self.dir / "patroni.log"
        self.pg_port = free_port()
        self.rest_port = free_port()
        self.popen: subprocess.Popen | None = None

    @property
    def rest(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.pg_port}/{dbname}"

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data_dir / "postmaster.pid").read_text().splitlines()[0])
            return pid if _pid_alive(pid) else None
        return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class PatroniCluster:
    """etcd plus two Patroni-run PostgreSQL members; a context manager that leaves no process behind."""

    def __init__(self, synchronous: bool = True, dbname: str = "clinic", workdir: Path | None = None, isolated: bool = False):
        """``isolated``: pg1 runs in a network namespace of its own (NetNamespace) and is the
        first leader, for partition_leader(); the other member and etcd are reached on the host's
        end of its link."""
        lacking = missing(isolated)
        if lacking:
            raise RuntimeError(f"cannot run a Patroni cluster here; missing: {', '.join(lacking)}")
        self.synchronous = synchronous
        self.netns = NetNamespace() if isolated else None
        self.dbname = dbname
        # etcd fsyncs every write; on tmpfs that costs nothing, so a busy disk cannot stall the
        # leader's lease renewals into a spurious failover. The rest on disk (PostgreSQL data).
        shm = Path("/dev/shm")
        self.dir = Path(tempfile.mkdtemp(prefix="clinic-ha-", dir=workdir))
        self.etcd_dir = Path(tempfile.mkdtemp(prefix="clinic-ha-etcd-", dir=shm if shm.is_dir() else self.dir))
        self.scope = self.dir.name
        self.etcd_client_port = free_port()
        self.etcd_peer_port = free_port()
        self.etcd: subprocess.Popen | None = None
        if self.netns is None:
            self.members = {name: Member(name, self.dir) for name in MEMBERS}
        else:
            self.members = {"pg1": Member("pg1", self.dir, self.netns.ns, self.netns), "pg2": Member("pg2", self.dir, self.netns.host)}
        # Where etcd listens for the members: the host's end of the link, reachable from the namespace.
        self.etcd_host = self.netns.host if self.netns else LOOPBACK
        self.timings: dict[str, float] = {}
        shutil.chown(self.dir, "postgres", "postgres")

    # -- life cycle ------------------------------------------------------------------------------

    def __enter__(self) -> PatroniCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        began = time.monotonic()
        if self.netns is not None:
            self.netns.create()
        self._start_etcd()
        self._timed("etcd_up", began)
        for member in self.members.values():
            member.dir.mkdir()
            shutil.chown(member.dir, "postgres", "postgres")
            member.config_path.write_text(yaml.safe_dump(self._member_config(member), sort_keys=False))
            self._start_patroni(member)
            if self.netns is not None and member.name == "pg1":
                # The isolated member bootstraps alone: it is the leader partition_leader() cuts off.
                wait_until(self._writable_leader, 60, interval=0.2, what="pg1 to lead")
        leader = wait_until(self._writable_leader, 60, interval=0.2, what="a Patroni leader taking writes")
        self._timed("leader_up", began)
        with psycopg.connect(self.members[leader].url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.dbname}"')
        apply_schema(self.multi_host_url(self.dbname))
        self._timed("schema_applied", began)
        self.wait_ready(60)
        self._timed("cluster_ready", began)

    def close(self) -> None:
        """Kills everything this cluster started, even half-started; removes its directories."""
        for member in self.members.values():  # first patroni, so that nothing restarts postgres
            if member.popen is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(member.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    member.popen.wait(timeout=10)
        for member in self.members.values():
            self._kill_postgres(member)
        if self.etcd is not None:
            self.etcd.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.etcd.wait(timeout=10)
        # Anything else still running from our directories (a pg_rewind, a pg_basebackup).
        _kill(self._strays())
        if self.netns is not None:
            self.netns.destroy()
        shutil.rmtree(self.etcd_dir, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- what the tests use ----------------------------------------------------------------------

    def multi_host_url(self, dbname: str | None = None, user: str = "postgres") -> str:
        hosts = ",".join(f"{m.host}:{m.pg_port}" for m in self.members.values())
        return f"postgresql://{user}@{hosts}/{dbname or self.dbname}?target_session_attrs=read-write"

    def cluster_state(self) -> dict | None:
        """GET /cluster from the first member whose REST API answers; None when none does."""
        for member in self.members.values():
            if member.popen is None or member.popen.poll() is not None:
                continue
            with contextlib.suppress(requests.RequestException, ValueError):
                return requests.get(member.rest + "/cluster", timeout=1).json()
        return None

    def leader(self) -> str | None:
        """The member Patroni calls leader and running, or None."""
        state = self.cluster_state() or {}
        return next((m["name"] for m in state.get("members", []) if m["role"] == "leader" and m["state"] == "running"), None)

    def replica(self) -> str | None:
        return next((name for name in self.members if name != self.leader()), None)

    def wait_ready(self, timeout: float = 60) -> dict:
        """Waits for a leader and a streaming standby with lag 0 on the leader's timeline (a
        sync_standby in synchronous mode); returns the /cluster state."""
        began = time.monotonic()
        state = wait_until(self._ready, timeout, interval=0.2, what="a leader and a caught-up standby")
        self.timings["last_wait_ready"] = round(time.monotonic() - began, 2)
        return state

    def kill_leader(self) -> str:
        """SIGKILL the leader's patroni, its postmaster and every backend at once (the machine
        dies); returns its name."""
        name = self.leader()
        assert name, f"no leader to kill: {self.cluster_state()}"
        member = self.members[name]
        postmaster = member.postmaster_pid()
        pids = [member.popen.pid, *([postmaster, *_children(postmaster)] if postmaster else [])]
        _kill(pids)
        member.popen.wait(timeout=10)
        wait_until(lambda: not any(_pid_alive(pid) for pid in pids), 10, what=f"{name}'s processes to die")
        return name

    def freeze_leader(self) -> tuple[str, list[int]]:
        """SIGSTOP the leader's patroni, its postmaster and every backend (a paused VM, a hung
        machine: sockets open, nothing answers); returns its name and the PIDs for thaw()."""
        name = self.leader()
        assert name, f"no leader to freeze: {self.cluster_state()}"
        member = self.members[name]
        os.kill(member.popen.pid, signal.SIGSTOP)
        postmaster = member.postmaster_pid()
        pids = [member.popen.pid, *(freeze(postmaster) if postmaster else [])]
        return name, pids

    @staticmethod
    def thaw(pids: list[int]) -> None:
        thaw(pids)

    def partition_leader(self) -> str:
        """Takes the isolated member's link down; it must be the leader. Returns its name."""
        assert self.netns is not None, "only an isolated cluster can be partitioned"
        assert self.leader() == "pg1", f"pg1 is not the leader: {self.cluster_state()}"
        self.netns.cut()
        return "pg1"

    def heal(self) -> None:
        self.netns.heal()

    def restart_member(self, name: str) -> None:
        """Starts a killed member's patroni again: it rejoins as a replica (pg_rewind when its
        timeline forked). Wait with wait_ready()."""
        member = self.members[name]
        assert member.popen is not None and member.popen.poll() is not None, f"{name} is still running"
        self._kill_postgres(member)  # nothing should be left, but a stale postmaster would block it
        self._start_patroni(member)

    def switchover(self) -> str:
        """The controlled switchover to the standby (REST POST /switchover, which answers once it
        is done); returns the new leader's name."""
        leader = self.leader()
        candidate = next(name for name in self.members if name != leader)
        response = requests.post(
            self.members[leader].rest + "/switchover", json={"leader": leader, "candidate": candidate}, timeout=60
        )
        assert response.status_code == 200, f"switchover refused: {response.status_code} {response.text}"
        return candidate

    def wal_sender_pid(self) -> int:
        """The leader's WAL sender process, streaming to the standby (waited for a while: a
        standby Patroni calls running may still be catching up)."""
        leader = self.members[self.leader()]

        def streaming():
            with psycopg.connect(leader.url(), autocommit=True, connect_timeout=2) as conn:
                return conn.execute("SELECT pid FROM pg_stat_replication WHERE state = 'streaming' ORDER BY pid LIMIT 1").fetchone()

        return wait_until(streaming, 20, interval=0.2, what="a streaming WAL sender on the leader")[0]

    def pause_wal_sender(self) -> int:
        """SIGSTOP the leader's WAL sender: the standby receives nothing more until resume."""
        pid = self.wal_sender_pid()
        os.kill(pid, signal.SIGSTOP)
        return pid

    @staticmethod
    def resume_wal_sender(pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    def rewound(self, name: str) -> bool:
        """True when the member's patroni log says pg_rewind ran and succeeded."""
        log = self.members[name].log()
        return "running pg_rewind from" in log and "pg_rewind exit code=0" in log

    # -- internals -------------------------------------------------------------------------------

    def _timed(self, what: str, since: float) -> None:
        self.timings[what] = round(time.monotonic() - since, 2)

    def _start_etcd(self) -> None:
        client = f"http://{self.etcd_host}:{self.etcd_client_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        listen = client if self.etcd_host == LOOPBACK else f"{client},http://127.0.0.1:{self.etcd_client_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.dir / "etcd.log", "wb") as log:
            self.etcd = subprocess.Popen(
                [
                    "etcd", "--name", "etcd1", "--data-dir", str(self.etcd_dir / "data"),
                    "--listen-client-urls", listen, "--advertise-client-urls", client,
                    # Patroni's `etcd:` key speaks the v2 API (see the module's docstring).
                    "--enable-v2=true",
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"etcd1={peer}", "--initial-cluster-state", "new",
                    "--initial-cluster-token", self.scope,
                ],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )

        def healthy():
            if self.etcd.poll() is not None:
                raise AssertionError(f"etcd exited with {self.etcd.returncode}: {(self.dir / 'etcd.log').read_text()[-2000:]}")
            with contextlib.suppress(requests.RequestException, ValueError):
                return requests.get(client + "/health", timeout=1).json().get("health") == "true"
            return False

        wait_until(healthy, 30, interval=0.1, what="etcd /health")

    def _member_config(self, member: Member) -> dict:
        hba = [
            "local all all trust",
            "local replication all trust",
            "host all all 127.0.0.1/32 trust",  # tests only: no passwords anywhere
            "host replication all 127.0.0.1/32 trust",
            "host all all 10.213.0.0/16 trust",  # an isolated cluster's link (NetNamespace)
            "host replication all 10.213.0.0/16 trust",
        ]
        return {
            "scope": self.scope,
            "namespace": "/clinic-test/",
            "name": member.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": f"{member.host}:{member.rest_port}", "connect_address": f"{member.host}:{member.rest_port}"},
            "etcd": {"hosts": [f"{self.etcd_host}:{self.etcd_client_port}"]},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL,
                    "loop_wait": LOOP_WAIT,
                    "retry_timeout": RETRY_TIMEOUT,
                    "maximum_lag_on_failover": MAXIMUM_LAG_ON_FAILOVER,
                    "synchronous_mode": self.synchronous,
                    # Not strict: with two members, strict mode blocks every commit while the
                    # standby is away (after the kill, until it has rejoined), an outage of its
                    # own. Not strict, the lone leader takes writes unreplicated meanwhile: a
                    # second failure in that window could lose them, the single one we test not.
                    "synchronous_mode_strict": False,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "max_connections": 200,
                            "wal_log_hints": "on",  # pg_rewind needs it (or data checksums)
                            "wal_keep_size": "256MB",
                            # Process kills only, never the machine: the OS page cache survives,
                            # so fsync buys the test nothing but time.
                            "fsync": "off",
                            # Dynamic shared memory as files in the data directory: a SIGKILLed
                            # postmaster's POSIX segments would stay in /dev/shm for good.
                            "dynamic_shared_memory_type": "mmap",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"auth": "trust"}, "no-sync"],
            },
            "postgresql": {
                # On the namespace's own loopback too, inside it: patroni talks to its server there.
                "listen": f"{LOOPBACK},{member.host}:{member.pg_port}" if member.host != LOOPBACK else f"{LOOPBACK}:{member.pg_port}",
                "connect_address": f"{member.host}:{member.pg_port}",
                "data_dir": str(member.data_dir),
                "bin_dir": PG_BINDIR,
                "pgpass": str(member.dir / "pgpass"),
                # A new standby's pg_basebackup asks for a fast checkpoint: a spread one (the
                # default) after the leader's bootstrap took minutes.
                "basebackup": [{"checkpoint": "fast"}],
                "authentication": {"superuser": {"username": "postgres"}, "replication": {"username": "replicator"}},
                "parameters": {"unix_socket_directories": str(member.dir)},
                "pg_hba": hba,
            },
        }

    def _start_patroni(self, member: Member) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PATRONI"))}
        env["HOME"] = str(member.dir)
        with open(member.log_path, "ab") as log:
            netns = member.netns.prefix() if member.netns is not None else []
            member.popen = subprocess.Popen(
                [*netns, "setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "patroni", str(member.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=member.dir, start_new_session=True,
            )

    def _writable_leader(self) -> str | None:
        for member in self.members.values():
            if member.popen is not None and member.popen.poll() is not None:
                raise AssertionError(f"patroni {member.name} exited with {member.popen.returncode}:\n{member.log()[-3000:]}")
        name = self.leader()
        if name is None:
            return None
        with contextlib.suppress(psycopg.Error):
            with psycopg.connect(self.members[name].url(), autocommit=True, connect_timeout=2) as conn:
                if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    return name
        return None

    def _ready(self) -> dict | None:
        state = self.cluster_state()
        if not state:
            return None
        members = state.get("members", [])
        leader = next((m for m in members if m["role"] == "leader" and m["state"] == "running"), None)
        wanted = ("sync_standby",) if self.synchronous else ("replica", "sync_standby")
        standby = next((m for m in members if m["role"] in wanted and m["state"] in ("running", "streaming")), None)
        if not leader or not standby:
            return None
        if standby.get("lag") != 0 or standby.get("timeline") != leader.get("timeline"):
            return None
        return state

    def _kill_postgres(self, member: Member) -> None:
        postmaster = member.postmaster_pid()
        if postmaster:
            pids = [postmaster, *_children(postmaster)]
            _kill(pids)
            with contextlib.suppress(AssertionError):
                wait_until(lambda: not any(_pid_alive(pid) for pid in pids), 10, what="postgres to die")

    def _strays(self) -> list[int]:
        """Processes whose command line names one of our directories (ours, by construction)."""
        marks = (str(self.dir).encode(), str(self.etcd_dir).encode())
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    cmdline = (entry / "cmdline").read_bytes()
                    if any(mark in cmdline for mark in marks) and _pid_alive(int(entry.name)):
                        found.append(int(entry.name))
        return found

    def describe(self) -> str:
        """The cluster state and the tail of each log, for an assertion message."""
        logs = "\n".join(f"--- {m.name} ---\n{m.log()[-2000:]}" for m in self.members.values())
        return f"{json.dumps(self.cluster_state())}\n{logs}"
