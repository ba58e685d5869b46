-- FROZEN: the schema.sql of clinic-billing version 2 (CHANGELOG.md, "Version 2"), byte for byte after
-- this header, as databases of that version were made with it. Never edit it: tests/test_schema.py
-- makes a database with it and upgrades that with today's schema.sql and roles.sql.

-- clinic-billing schema: the source of truth for both services.
--
-- Safe to apply again on a live database: every statement is IF NOT EXISTS (or OR REPLACE),
-- nothing is dropped, and what a later version adds to an existing table is a nullable column
-- (a catalog change, no rewrite) or a small partial index. docs/operations.md says how to roll
-- a new version onto a large live database.
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f schema.sql -f roles.sql
--
-- roles.sql (applied right after this file, also by `python db.py apply-schema`) makes the
-- database roles, hands these objects to clinic_owner and grants each service what it uses.
--
-- Money is NUMERIC(12,2) (reais with cents, never float); times are timestamptz kept to the whole
-- second, so what the API shows is exactly what is stored.

-- Serialise concurrent runs of this file (two containers starting at once), so that two
-- CREATE ... IF NOT EXISTS cannot race into a unique violation on the catalog. A session lock,
-- never unlocked here: it goes with the session, after the commit whether the file runs
-- statement by statement (psql -f) or as one transaction (python db.py apply-schema).
DO $$ BEGIN PERFORM pg_advisory_lock(hashtext('clinic-billing schema')); END $$;

-- Waiting behind a long transaction for a table lock would queue every request behind this file
-- (a lock request waits in line ahead of later ones): give up after a few seconds instead (the
-- file is idempotent, so just run it again).
SET lock_timeout = '3s';

-- An upgrade that changes existing tables (a column, an index, the ledger's triggers, the owner
-- roles.sql gives them) takes strong locks on them, one table after another. Taken here all at
-- once instead, in the order the services lock them (an end: appointments, then billing_queue; a
-- batch: billing_queue, then billing_entries), so that no end or batch can deadlock with the
-- upgrade: they wait for its commit (python db.py apply-schema runs both files as one
-- transaction). Only when something is to be done: an up-to-date database takes no lock here.
-- A fresh database has no tables yet, and nothing to wait for.
DO $$ BEGIN
    IF to_regclass('billing_entries') IS NULL THEN
        RETURN;  -- (a separate test: the casts below would fail before AND could skip them)
    END IF;
    IF (   NOT EXISTS (SELECT 1 FROM pg_attribute
                       WHERE attrelid = 'billing_queue'::regclass AND attname = 'request_id' AND NOT attisdropped)
        OR to_regclass('billing_queue_failed') IS NULL
        OR NOT EXISTS (SELECT 1 FROM pg_trigger
                       WHERE tgrelid = 'billing_entries'::regclass AND tgname = 'billing_entries_no_truncate')
        OR NOT EXISTS (SELECT 1 FROM pg_trigger
                       WHERE tgrelid = 'billing_entries'::regclass AND tgname = 'billing_entries_no_update_or_delete')
        OR to_regrole('clinic_owner') IS NULL
        OR EXISTS (SELECT 1 FROM pg_class
                   WHERE oid IN ('appointments'::regclass, 'billing_queue'::regclass, 'billing_entries'::regclass)
                     AND relowner <> to_regrole('clinic_owner')))
    THEN
        LOCK TABLE appointments, billing_queue, billing_entries IN ACCESS EXCLUSIVE MODE;
    END IF;
END $$;

-- One row per appointment. Open while end_date IS NULL; ending it fills end_date and price and,
-- in the same transaction, inserts its billing_queue row.
CREATE TABLE IF NOT EXISTS appointments (
    id            uuid          PRIMARY KEY,
    physician_id  uuid          NOT NULL,
    patient_id    uuid          NOT NULL,
    start_date    timestamptz   NOT NULL CHECK (start_date = date_trunc('second', start_date)),
    end_date      timestamptz            CHECK (end_date = date_trunc('second', end_date)),
    -- The rate in force when the appointment started: a later HOURLY_RATE never reprices it.
    hourly_rate   numeric(12,2) NOT NULL CHECK (hourly_rate >= 0),
    -- NULL while open; rate x started minutes / 60, rounded half-up to cents.
    price         numeric(12,2)          CHECK (price >= 0),
    created_at    timestamptz   NOT NULL DEFAULT now(),
    CONSTRAINT appointments_ends_after_start CHECK (end_date >= start_date),
    CONSTRAINT appointments_priced_when_ended CHECK ((end_date IS NULL) = (price IS NULL))
);

-- The outbox between the two services: one row per ended appointment, written in the same
-- transaction as the end, so no charge can be lost while the billing worker is down.
-- Rows are never deleted; their status says where they are:
--   pending  waiting to be billed (available_at says from when: retries back off)
--   billed   its billing_entries row exists; processed_at says when
--   failed   BILLING_MAX_ATTEMPTS attempts failed; last_error says why;
--            `python billing_worker.py requeue` makes it pending again
CREATE TABLE IF NOT EXISTS billing_queue (
    appointment_id uuid          PRIMARY KEY REFERENCES appointments (id),
    total_price    numeric(12,2) NOT NULL CHECK (total_price >= 0),
    status         text          NOT NULL DEFAULT 'pending'
                                 CHECK (status IN ('pending', 'billed', 'failed')),
    attempts       integer       NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    available_at   timestamptz   NOT NULL DEFAULT now(),
    last_error     text,
    created_at     timestamptz   NOT NULL DEFAULT now(),
    processed_at   timestamptz,
    CONSTRAINT billing_queue_processed_iff_billed CHECK ((status = 'billed') = (processed_at IS NOT NULL))
);

-- Serves the worker's claim (CLAIM_AND_BILL / CLAIM in billing_worker.py):
--   WHERE status = 'pending' AND available_at <= now() ORDER BY available_at, appointment_id
-- Partial, so billed rows (almost all of them, in time) cost nothing here. Also serves the
-- metrics' pending count and oldest due age (QUEUE_STATS in telemetry.py).
CREATE INDEX IF NOT EXISTS billing_queue_due
    ON billing_queue (available_at, appointment_id)
    WHERE status = 'pending';

-- Serves the metrics' failed count (QUEUE_STATS in telemetry.py), scraped every few seconds:
-- without it, counting failed rows would read every billed row. Empty when all is well.
CREATE INDEX IF NOT EXISTS billing_queue_failed
    ON billing_queue (appointment_id)
    WHERE status = 'failed';

-- The X-Request-ID of the request that ended the appointment: the worker logs it with the charge,
-- so one id follows an appointment from the HTTP request to the ledger. NULL for rows queued
-- before this column existed. On a live table: the column is nullable without a default, a
-- catalog change with no rewrite, and its CHECK is NOT VALID, which checks every new row without
-- scanning the old ones (all NULL, which passes anyway). Guarded by a look at the catalog, because
-- ALTER TABLE takes its exclusive lock before IF NOT EXISTS would find the column there; placed
-- after the indexes, so the first run holds that lock (to its commit) only for an instant.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'billing_queue'::regclass AND attname = 'request_id' AND NOT attisdropped) THEN
        ALTER TABLE billing_queue ADD COLUMN request_id text;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'billing_queue_request_id_shape') THEN
        ALTER TABLE billing_queue ADD CONSTRAINT billing_queue_request_id_shape
            CHECK (request_id ~ '^[A-Za-z0-9._:-]{1,128}$') NOT VALID;
    END IF;
END $$;

-- The billing service's ledger: exactly one charge per appointment, enforced here as well as by
-- the worker's claim.
CREATE TABLE IF NOT EXISTS billing_entries (
    appointment_id uuid          PRIMARY KEY REFERENCES billing_queue (appointment_id),
    total_price    numeric(12,2) NOT NULL CHECK (total_price >= 0),
    created_at     timestamptz   NOT NULL DEFAULT now()
);

-- Serves GET /billing-entries?limit=N (LIST_ENTRIES): newest first.
CREATE INDEX IF NOT EXISTS billing_entries_newest
    ON billing_entries (created_at DESC, appointment_id DESC);

-- The ledger is append-only, for everyone: the services (roles.sql grants them no UPDATE, DELETE
-- or TRUNCATE on it), its owner and superusers alike, so that no bug, bad manual fix or psql
-- session can rewrite money already charged. A correction is a new kind of entry, not an edit of
-- an old one: when the business needs one (a refund, a reversal), it gets its own rows that point
-- at the charge they correct. These triggers refuse UPDATE and DELETE (row by row, BEFORE, so
-- nothing is changed) and TRUNCATE (once per statement: TRUNCATE fires no row triggers).
-- The error is SQLSTATE 42501 insufficient_privilege (psycopg.errors.InsufficientPrivilege), the
-- code of "permission denied", since that is what it is: an operation nobody is allowed. Not a
-- row's data at fault (classes 22/23, or P0001 of a bare RAISE, which the billing worker would
-- retry row by row and count against the charge), and its message says "append-only".
-- The only ways around them are deliberate and need the owner or a superuser: ALTER TABLE
-- billing_entries DISABLE TRIGGER, or SET session_replication_role = replica (ordinary triggers
-- do not fire in replica mode), e.g. a test that fakes a broken ledger.
CREATE OR REPLACE FUNCTION billing_entries_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'billing_entries is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              DETAIL = 'A billing entry is never changed nor removed, by anyone.',
              HINT = 'A correction is a new kind of entry, not an edit of an old one.';
END
$$;

-- Created only when missing (PostgreSQL 15 has no CREATE TRIGGER IF NOT EXISTS): CREATE [OR
-- REPLACE] TRIGGER takes a SHARE ROW EXCLUSIVE lock on the table, which would wait for the
-- worker's writes and hold up its next ones on every run of this file. A later version that
-- changes a trigger's definition gives it a new name (or drops the old one explicitly).
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'billing_entries'::regclass AND tgname = 'billing_entries_no_update_or_delete') THEN
        CREATE TRIGGER billing_entries_no_update_or_delete
            BEFORE UPDATE OR DELETE ON billing_entries
            FOR EACH ROW EXECUTE FUNCTION billing_entries_append_only();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'billing_entries'::regclass AND tgname = 'billing_entries_no_truncate') THEN
        CREATE TRIGGER billing_entries_no_truncate
            BEFORE TRUNCATE ON billing_entries
            FOR EACH STATEMENT EXECUTE FUNCTION billing_entries_append_only();
    END IF;
END $$;

-- Where each appointment's money is, for people with psql:
--   SELECT * FROM billing_status WHERE status <> 'billed' ORDER BY ended_at;
-- status: open (not ended), then the queue row's pending, billed or failed; 'missing' for an ended
-- appointment without a queue row, which only a broken ledger has (reconcile lists those).
-- billed_at is when the worker wrote its billing entry; request_id that of the request that ended it.
CREATE OR REPLACE VIEW billing_status AS
SELECT a.id                          AS appointment_id,
       a.price,
       CASE WHEN a.end_date IS NULL THEN 'open'
            ELSE coalesce(q.status, 'missing') END AS status,
       a.end_date                    AS ended_at,
       q.processed_at                AS billed_at,
       coalesce(q.attempts, 0)       AS attempts,
       q.last_error,
       q.request_id
FROM appointments a
LEFT JOIN billing_queue q ON q.appointment_id = a.id;
