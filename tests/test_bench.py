"""The benchmark harness (bench/bench.py, `make bench`) cannot silently rot: its smoke run, in CI.

The smoke runs every section at tiny sizes (about a minute and a half) on a cluster of its own;
its figures mean little, so nothing here judges them, only that every section ran and put its
figures in the report, numeric and next to their ceilings, and that the ledger checks it ran found
every charge billed exactly once. Without wrk, haproxy or pgbackrest (Debian's packages) it is
skipped, unless REQUIRE_WRK=1 (CI), which makes that a failure. How the soak is cut into its parts
is checked without running anything.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from support import require_tools

# bench/bench.py --smoke: a cluster, the services, wrk, HAProxy and pgBackRest.
pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parent.parent


def _load_harness():
    """bench/bench.py as a module of its own name (bench/ is no package, and "bench" is its directory's name)."""
    spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "bench" / "bench.py")
    module = sys.modules["bench_harness"] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


bench = _load_harness()
SECTIONS = ("1_framework_ceiling", "2_api", "3_drain", "4_end_to_charge", "5_interference", "6_memory", "7_overload", "8_hung_database",
            "9_backups", "10_scale_out", "11_listings")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    require_tools("wrk", "haproxy", "pgbackrest", required_by="REQUIRE_WRK")
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    done = subprocess.run([sys.executable, "bench/bench.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"bench.py --smoke exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(out.read_text()), done.stdout


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_smoke_run_reports_every_section_next_to_its_ceiling(smoke):
    """Every section ran and has figures in the table; every figure of 2-6 has a numeric value and ceiling."""
    report, printed = smoke
    assert set(SECTIONS) == set(report["sections"])
    for number in range(1, len(SECTIONS) + 1):
        rows = [row for row in report["table"] if row["section"] == number]
        assert rows, f"section {number} has no figure in the table"
        for row in rows:
            assert is_number(row["value"]), row
            assert row["result"] in ("PASS", "MISS", "NO EFFECT", "-"), row
            if 1 < number < 7:  # section 1 is itself the ceiling of section 2; 7 and 8 have targets instead
                assert row["ceiling"] is not None and is_number(row["ceiling"]["value"]), row
    assert "target" in printed and "ceiling" in printed  # the table was printed


def test_smoke_run_found_every_charge_billed_exactly_once(smoke):
    """The drains (1, 2 and 4 workers, plain SQL) and the interference run each ended with one entry
    per charge (tests/support.py ledger())."""
    report, _ = smoke
    drain, interference = report["sections"]["3_drain"], report["sections"]["5_interference"]
    workers = [drain[key] for key in ("one_worker", "two_workers", "four_workers")]
    checks = [*(cell["ledger"] for cell in workers), drain["sql_ceiling"]["ledger"], interference["ledger"]]
    assert [cell["workers"] for cell in workers] == [1, 2, 4]
    for cell in workers:
        assert is_number(cell["cpu_us_per_charge"]["workers"]) and is_number(cell["cpu_us_per_charge"]["postgresql"]), cell
    assert is_number(drain["sql_ceiling"]["cpu_us_per_charge"]["postgresql"])
    for check in checks:
        assert check["ok"], check
        assert check["billed_once"] == check["charges"] == drain["backlog"] > 0, check
        assert check["not_billed_once"] == check["pending"] == check["failed"] == check["wrong_total"] == 0, check


def test_smoke_run_records_the_machine_and_the_settings(smoke):
    """The JSON says where and how it ran: machine, PostgreSQL and its settings (fsync on), commit, packages."""
    report, _ = smoke
    machine = report["machine"]
    for key in ("cpu", "cores", "kernel", "postgresql", "python", "packages", "git_commit", "git_dirty"):
        assert machine.get(key) is not None, key
    assert machine["postgresql_settings"]["fsync"]["value"] == "on"
    assert report["smoke"] is True


def test_smoke_run_sets_the_start_next_to_the_design_floor(smoke):
    """Section 2 measures the design floor (ceiling_app.py --with-insert) at each connection count;
    its rows stand next to the framework ceiling, and each start row also next to it, while the
    framework stays the start's target ceiling. An end has no floor."""
    report, printed = smoke
    floor = report["sections"]["2_api"]["design_floor"]
    assert len(floor["cells"]) == len(report["sections"]["2_api"]["start"]) > 0
    for cell in floor["cells"]:
        assert is_number(cell["requests_per_second"]) and cell["requests_per_second"] > 0, cell
        assert cell["errors"] == 0, cell
    rows = [row for row in report["table"] if row["section"] == 2]
    assert any(row["figure"].startswith("design floor") for row in rows)
    for row in rows:
        if row["figure"].startswith("POST /appointments c=") and not row["figure"].endswith("errors"):
            assert row["ceiling"]["name"] == "framework" and row["design_floor"]["name"] == "design floor", row
            assert is_number(row["design_floor_ratio"]), row
        elif row["figure"].startswith("POST /appointments/{id}/end"):
            assert row["design_floor"] is None, row
    assert "vs design floor" in printed


def test_smoke_run_reports_its_wall_time_and_each_part(smoke):
    """The JSON and the printed table carry the run's wall time and each part's."""
    report, printed = smoke
    assert is_number(report["duration_seconds"]) and report["duration_seconds"] > 0
    parts = report["section_seconds"]
    assert all(is_number(seconds) and seconds >= 0 for seconds in parts.values()), parts
    assert any("soak" in name for name in parts) and any("drain" in name for name in parts), parts
    assert sum(parts.values()) == pytest.approx(report["duration_seconds"], abs=1)
    assert "Wall time:" in printed


def test_smoke_run_soaks_every_request_asked_in_both_mixes(smoke):
    """The soak sends the count asked (the smoke is far within the time budget): the backlog's
    ends first, then the fast mix, an RSS reading after each part."""
    report, _ = smoke
    soak = report["sections"]["6_memory"]["soak"]
    assert soak["stopped_by_budget"] is False
    assert soak["total_requests"] == soak["requests_asked"] == report["settings"]["soak_requests"]
    assert [phase["mix"] for phase in soak["phases"]] == ["ends", "ends", "fast"]
    assert sum(phase["ends"] for phase in soak["phases"]) == report["sections"]["3_drain"]["backlog"]
    assert soak["baseline_requests"] == report["settings"]["soak_baseline"]
    assert all(is_number(phase["rss_kb_after"]) for phase in soak["phases"])


@pytest.mark.parametrize(("backlog", "baseline", "total"), [(100_000, 10_000, 500_000), (2_000, 1_000, 4_000), (100_000, 10_000, 110_000),
                                                            (2_000, 10_000, 40_000), (100_000, 10_000, 111_112)])
def test_soak_phases_send_every_end_once_and_the_count_asked(backlog, baseline, total):
    """soak_phases(): the requests add up to the count asked, the ends to the backlog, no part asks
    for more ends than requests, and the first reading comes after the baseline's requests."""
    phases = bench.soak_phases(backlog, baseline, total)
    assert sum(requests for _, requests, _, _ in phases) == total
    assert sum(ends for _, _, ends, _ in phases) == backlog
    assert all(0 <= ends <= requests and requests > 0 for _, requests, ends, _ in phases)
    span = min(total, math.ceil(backlog / bench.SOAK_ENDS_SHARE))  # the ends at their share, or denser when the total is short
    assert phases[0][0] == "baseline" and phases[0][1] == min(baseline, span)
    assert sum(requests for name, requests, _, _ in phases if name == "baseline") == baseline
    assert sum(requests for _, requests, _, mix in phases if mix == "ends") == span
    assert all(ends == 0 for _, _, ends, mix in phases if mix == "fast")


def test_smoke_run_overloads_both_paths_and_freezes_the_database(smoke):
    """Section 7 has every connection count straight and through the edge, with the probes; the
    edge answered every request with a 2xx or a 503 that says when to retry. Section 8 froze the
    server, and the ledger it checked afterwards lost and doubled nothing."""
    report, printed = smoke
    overload = report["sections"]["7_overload"]
    for mode in ("direct", "edge"):
        cells = overload["modes"][mode]["cells"]
        assert [c["connections"] for c in cells] == overload["connections"], cells
        assert all(c["goodput"] > 0 for c in cells), cells
        assert set(overload["modes"][mode]["probes"]) == {"/health", "/ready", "/metrics"}
    for cell in overload["modes"]["edge"]["cells"]:
        assert cell["not_2xx_or_503"] == cell["503_without_retry_after"] == cell["closed_connections"] == cell["socket_errors"] == 0, cell
    hung = report["sections"]["8_hung_database"]
    assert hung["clients_finished"] and hung["ends_acknowledged"] > 0, hung
    assert hung["lost"] == hung["wrong_total"] == hung["unexpected"] == 0, hung
    assert hung["longest_call_s"] <= hung["request_timeout_seconds"] + 0.5, hung
    assert "8. frozen" in printed


def test_smoke_run_restores_a_lost_data_directory_within_the_rpo(smoke):
    """Section 9 took a full backup under load, lost the data directory and restored the latest
    point: nothing acknowledged more than the RPO before was lost, nothing doubled or wrong, the
    feed's consumer went on from its cursor, reconcile exited 0; the RTO's parts add up."""
    report, printed = smoke
    b = report["sections"]["9_backups"]
    assert b["ends_acknowledged"] > 0 and b["full_backup_s"] > 0, b
    assert b["lost_older_than_rpo"] == b["wrong_total"] == b["unexpected"] == 0 and b["loss_window_s"] <= 5, b
    assert b["feed_repeated"] == b["feed_missed"] == 0 and b["reconcile_exit"] == 0, b
    # The made appointments, the acknowledged ends that survived (and the drill's own probe end);
    # ends sent but never answered may be there too.
    assert b["ledger"]["ended"] == b["ledger"]["entries"] >= b["appointments"] + b["ends_acknowledged"] - b["lost"] + 1, b
    assert b["restore_s"] + b["replay_and_promote_s"] <= b["rto_s"], b
    assert "9. data directory lost: RTO" in printed


def test_smoke_run_puts_one_and_two_api_processes_behind_the_edge(smoke):
    """Section 10 started and ended appointments through the edge in front of one API process and
    of two, without an error, and read what each part spent; with two, both processes served (the
    edge's second slot reached the second process)."""
    report, _ = smoke
    section = report["sections"]["10_scale_out"]
    cells = {(c["api_processes"], c["kind"], c["connections"]): c for c in section["cells"]}
    assert set(cells) == {(n, kind, c) for n in (1, 2) for kind in ("start", "end") for c in section["connections"]}
    for (processes, _, _), cell in cells.items():
        assert cell["requests_per_second"] > 0 and cell["errors"] == 0, cell
        cpu = cell["cpu_us_per_request"]
        assert cpu["edge"] > 0 and cpu["postgresql"] > 0 and len(cpu["each_api_process"]) == processes, cpu
        assert all(share > 0 for share in cpu["each_api_process"]), cpu


def test_smoke_run_pages_each_listing_to_a_deep_page(smoke):
    """Section 11 loaded the listings' data set and timed page 1 and a deep page of each listing
    and of the change feed, with the buffers each read and the same page by OFFSET."""
    report, _ = smoke
    section = report["sections"]["11_listings"]
    assert section["deep_page"] >= 2 and section["rows"] == report["settings"]["listing_rows"]
    assert [route["route"].split(" (")[0] for route in section["routes"]] == [
        "GET /appointments", "GET /appointments?physician_id=", "GET /billing-entries", "GET /billing-entries/changes"]
    for route in section["routes"]:
        assert all(is_number(route[key]) and route[key] > 0 for key in ("first_page_ms", "deep_page_ms", "offset_ms")), route
        assert all(is_number(n) and n > 0 for n in route["buffers"].values()), route
