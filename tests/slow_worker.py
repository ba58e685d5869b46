"""A billing worker whose every other batch commits late: the change feed's trap, on purpose. Never run it for real.

Its odd batches claim and bill as the real worker does (CLAIM_AND_BILL), then sleep inside the
still open transaction before committing, so that batches of other workers that started later
commit first: their entries carry a later created_at, yet become visible before these. A consumer
that pages by created_at moves past this batch and never sees it; the change feed must not.

SLOW_WORKER_SECONDS (default 1.5) is the sleep. SLOW_WORKER_LOG, when set, names a file that gets
one JSON line per slowed batch: the appointment ids and when (time.time()) it committed.
Lives in tests/ only, so production code cannot reach it.
"""

import json
import os
import sys
import time

import billing_worker

SLOW_SECONDS = float(os.environ.get("SLOW_WORKER_SECONDS", "1.5"))
LOG = os.environ.get("SLOW_WORKER_LOG")


class SlowBiller(billing_worker.Biller):
    batches = 0

    def batch(self, conn, reason="poll"):
        self.batches += 1
        if self.batches % 2 == 0:
            return super().batch(conn, reason)
        with conn.transaction():
            billed = conn.execute(billing_worker.CLAIM_AND_BILL, {"batch_size": self._batch_size}).fetchall()
            if billed:
                time.sleep(SLOW_SECONDS)  # younger batches of the other workers commit meanwhile
        if billed and LOG:
            with open(LOG, "a", encoding="utf-8") as log:
                log.write(json.dumps({"ids": [str(row[0]) for row in billed], "committed_at": time.time()}) + "\n")
        return len(billed), billing_worker.Tally(billed=len(billed)), len(billed) == self._batch_size


billing_worker.Biller = SlowBiller

if __name__ == "__main__":
    sys.exit(billing_worker.main())
