"""The reconcile auditor: the ledger checked against the appointments, from one snapshot.

    python billing_worker.py reconcile    # prints the report as JSON; exit 1 on any mismatch

Every ended appointment must have exactly one billing entry at its price, sooner or later: each
check below lists the rows that break that, so an empty report is a ledger that balances. Its own
connection and no statement_timeout (billing_worker.py makes that pool): a large ledger is read
to the end.
"""

from __future__ import annotations

import psycopg_pool
from psycopg.rows import dict_row

# The report's counts, then its checks, each listing the rows that mean lost, doubled or wrong
# money. They read whole tables (an operator's check, not a hot path), all from one REPEATABLE READ
# snapshot.
RECONCILE_COUNTS = """
SELECT (SELECT count(*) FROM appointments WHERE end_date IS NOT NULL) AS ended,
       (SELECT count(*) FROM billing_entries) AS entries,
       (SELECT count(*) FROM billing_queue WHERE status = 'pending') AS pending,
       (SELECT count(*) FROM billing_queue WHERE status = 'failed') AS failed
"""

# Every query of the report sees the same committed state, and none can write.
ONE_SNAPSHOT = "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"

RECONCILE_CHECKS = {
    # Ended, yet neither queued nor billed: a charge lost before it reached the queue.
    "ended_without_charge": """
        SELECT a.id AS appointment_id, a.price, a.end_date
        FROM appointments a
        WHERE a.end_date IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM billing_queue q WHERE q.appointment_id = a.id)
          AND NOT EXISTS (SELECT 1 FROM billing_entries e WHERE e.appointment_id = a.id)
        ORDER BY a.end_date, a.id""",
    # Marked billed without its entry: a charge lost by the worker.
    "billed_without_entry": """
        SELECT q.appointment_id, q.total_price, q.processed_at
        FROM billing_queue q
        WHERE q.status = 'billed'
          AND NOT EXISTS (SELECT 1 FROM billing_entries e WHERE e.appointment_id = q.appointment_id)
        ORDER BY q.processed_at, q.appointment_id""",
    # Charged another amount than the appointment's price.
    "wrong_total": """
        SELECT e.appointment_id, a.price, e.total_price
        FROM billing_entries e JOIN appointments a ON a.id = e.appointment_id
        WHERE a.price IS NOT NULL AND e.total_price <> a.price
        ORDER BY e.appointment_id""",
    # A charge for an appointment that is not ended (or not there).
    "entry_without_ended_appointment": """
        SELECT e.appointment_id, e.total_price, e.created_at
        FROM billing_entries e LEFT JOIN appointments a ON a.id = e.appointment_id
        WHERE a.end_date IS NULL
        ORDER BY e.appointment_id""",
    # Queued for an appointment that is not ended: it would be billed without an end.
    "queued_without_ended_appointment": """
        SELECT q.appointment_id, q.status, q.total_price
        FROM billing_queue q JOIN appointments a ON a.id = q.appointment_id
        WHERE a.end_date IS NULL
        ORDER BY q.appointment_id""",
    # A position in the change feed that no transaction of this server can have written: a dump
    # restored into a new cluster, whose transaction counter is behind. New entries would sort
    # before these, unseen by consumers; the ledger refuses them (schema.sql) until the counter
    # is moved past (docs/operations.md, Loading a dump).
    "entry_position_ahead_of_server": """
        SELECT e.appointment_id, e.txid::text AS txid, e.created_at
        FROM billing_entries e
        WHERE e.txid >= pg_snapshot_xmax(pg_current_snapshot())
        ORDER BY e.txid, e.appointment_id""",
    # Billed, yet still pending or failed: counted twice, and billed again would be refused.
    "entry_not_marked_billed": """
        SELECT q.appointment_id, q.status, e.total_price
        FROM billing_queue q JOIN billing_entries e ON e.appointment_id = q.appointment_id
        WHERE q.status <> 'billed'
        ORDER BY q.appointment_id""",
}


def reconcile(pool: psycopg_pool.ConnectionPool) -> dict:
    """The counts, and under each check's name the rows it found (values as text, for JSON)."""
    with pool.connection() as conn, conn.transaction():
        conn.execute(ONE_SNAPSHOT)
        cur = conn.cursor(row_factory=dict_row)
        report = {"counts": cur.execute(RECONCILE_COUNTS).fetchone()}
        for name, query in RECONCILE_CHECKS.items():
            rows = cur.execute(query).fetchall()
            report[name] = [{k: None if v is None else str(v) for k, v in r.items()} for r in rows]
    return report


def mismatched(report: dict) -> bool:
    """Whether any check found a row: money lost, doubled or wrong."""
    return any(report[name] for name in RECONCILE_CHECKS)
