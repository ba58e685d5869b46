-- FROZEN: the schema.sql of clinic-billing version 1 (CHANGELOG.md, "Version 1"), byte for byte after
-- this header, as databases of that version were made with it. Never edit it: tests/test_schema.py
-- makes a database with it and upgrades that with today's schema.sql and roles.sql.
-- Version 1 had no roles.sql: its tables belong to whoever applied this file.

-- clinic-billing schema: the source of truth for both services.
--
-- Safe to apply again on a live database: every statement is IF NOT EXISTS, nothing is dropped.
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f schema.sql
--
-- Money is NUMERIC(12,2) (reais with cents, never float); times are timestamptz kept to the whole
-- second, so what the API shows is exactly what is stored.

-- Serialise concurrent runs of this file (two containers starting at once), so that two
-- CREATE ... IF NOT EXISTS cannot race into a unique violation on the catalog. A session lock,
-- never unlocked here: it goes with the session, after the commit whether the file runs
-- statement by statement (psql -f) or as one transaction (python common.py apply-schema).
DO $$ BEGIN PERFORM pg_advisory_lock(hashtext('clinic-billing schema')); END $$;

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
-- Partial, so billed rows (almost all of them, in time) cost nothing here.
CREATE INDEX IF NOT EXISTS billing_queue_due
    ON billing_queue (available_at, appointment_id)
    WHERE status = 'pending';

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
