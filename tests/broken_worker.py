"""A deliberately broken billing worker: the chaos suite's negative control. Never run it for real.

It marks charges billed in one transaction and writes their billing entries in a second one, with
a pause between (as a slow network would make it). A crash in that gap loses the charges: the
rows say billed, the ledger has nothing. The chaos checker must catch that, which proves that it
can fail. Lives in tests/ only, so production code cannot reach it.
"""

import sys
import time

import billing_worker

MARK_FIRST = """
WITH due AS (
    SELECT appointment_id FROM billing_queue
    WHERE status = 'pending' AND available_at <= now()
    ORDER BY available_at, appointment_id
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
)
UPDATE billing_queue q SET status = 'billed', processed_at = now(), attempts = q.attempts + 1
FROM due WHERE q.appointment_id = due.appointment_id
RETURNING q.appointment_id, q.total_price
"""

CHARGE_LATER = """
INSERT INTO billing_entries (appointment_id, total_price) VALUES (%(appointment_id)s, %(total_price)s)
ON CONFLICT (appointment_id) DO NOTHING
"""


class BrokenBiller(billing_worker.Biller):
    def batch(self, conn, reason="poll"):
        with conn.transaction():
            cur = conn.cursor(row_factory=billing_worker.dict_row)
            rows = cur.execute(MARK_FIRST, {"batch_size": self._batch_size}).fetchall()
        if rows:
            time.sleep(0.3)
        with conn.transaction():
            conn.cursor().executemany(CHARGE_LATER, rows)
        return len(rows), billing_worker.Tally(billed=len(rows)), len(rows) == self._batch_size


billing_worker.Biller = BrokenBiller

if __name__ == "__main__":
    sys.exit(billing_worker.main())
