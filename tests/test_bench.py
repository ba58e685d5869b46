"""The benchmark harness (bench/bench.py, `make bench`) cannot silently rot: its smoke run, in CI.

The smoke runs every section at tiny sizes (about 40 s) on a cluster of its own; its figures mean
little, so nothing here judges them, only that each is there, numeric and next to its ceiling, and
that the ledger checks it ran found every charge billed exactly once. Without wrk (Debian's
package) it is skipped, unless REQUIRE_WRK=1 (CI), which makes that a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("1_framework_ceiling", "2_api", "3_drain", "4_end_to_charge", "5_interference", "6_memory")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if shutil.which("wrk") is None:
        if os.environ.get("REQUIRE_WRK") == "1":
            pytest.fail("wrk is not installed and REQUIRE_WRK=1 (apt-get install wrk)")
        pytest.skip("wrk is not installed (apt-get install wrk; make bench installs it)")
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    done = subprocess.run([sys.executable, "bench/bench.py", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"bench.py --smoke exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(out.read_text()), done.stdout


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_smoke_run_reports_every_section_next_to_its_ceiling(smoke):
    """Each of issue 11's six sections has figures; every figure of 2-6 has a numeric value and ceiling."""
    report, printed = smoke
    assert set(SECTIONS) <= set(report["sections"])
    for number in range(1, 7):
        rows = [row for row in report["table"] if row["section"] == number]
        assert rows, f"section {number} has no figure in the table"
        for row in rows:
            assert is_number(row["value"]), row
            assert row["result"] in ("PASS", "MISS", "NO EFFECT", "-"), row
            if number > 1:  # section 1 is itself the ceiling of section 2
                assert row["ceiling"] is not None and is_number(row["ceiling"]["value"]), row
    assert "target" in printed and "ceiling" in printed  # the table was printed


def test_smoke_run_found_every_charge_billed_exactly_once(smoke):
    """The drains and the interference run each ended with one entry per charge (tests/support.py ledger())."""
    report, _ = smoke
    drain, interference = report["sections"]["3_drain"], report["sections"]["5_interference"]
    checks = [drain["one_worker"]["ledger"], drain["two_workers"]["ledger"], drain["sql_ceiling"]["ledger"], interference["ledger"]]
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
