-- clinic-billing schema, the source of truth for both services: each table as it is (columns,
-- constraints, storage parameters), followed by its indexes and the query each one serves.
--
-- Applied as a superuser, right before roles.sql (which makes the database roles, hands these
-- objects to clinic_owner and grants each service what it uses), to a new database or to a
-- database made by any older version, live or not:
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f schema.sql -f roles.sql
--   python db.py apply-schema        (both files as one transaction, and the roles' passwords)
-- Safe to apply again: every statement is IF NOT EXISTS, OR REPLACE, or done only when the
-- catalog says it is still to do, and nothing is dropped. docs/operations.md says how to apply
-- it on a large live database; CHANGELOG.md says what each version changes.
--
-- In this file:
--   1. Upgrading a database made by an older version: what CREATE ... IF NOT EXISTS cannot do to
--      a table that exists already. Nothing to do on a new or an up-to-date database.
--   2. The tables and their indexes.
--   3. The ledger's triggers, and the view for people with psql.
--   4. The version this file brought the database to.
-- A table, index, function, trigger or view an older database lacks is made by the same
-- statement in sections 2 and 3 as on a new database, so both end up alike (tests/test_schema.py
-- compares them).
--
-- Money is NUMERIC(12,2) (reais with cents, never float); times are timestamptz kept to the whole
-- second, so what the API shows is exactly what is stored.

-- This file's version: CHANGELOG.md has a section for each. Recorded in the database by section 4.
SET clinic_billing.schema_version = '4';

-- Serialise concurrent runs of this file (two containers starting at once), so that two
-- CREATE ... IF NOT EXISTS cannot race into a unique violation on the catalog. A session lock,
-- never unlocked here: it goes with the session, after the commit whether the file runs
-- statement by statement (psql -f) or as one transaction (python db.py apply-schema).
DO $$ BEGIN PERFORM pg_advisory_lock(hashtext('clinic-billing schema')); END $$;

-- Waiting behind a long transaction for a table lock would queue every request behind this file
-- (a lock request waits in line ahead of later ones): give up after a few seconds instead (the
-- file is idempotent, so just run it again).
SET lock_timeout = '3s';


-- 1. Upgrading a database made by an older version ---------------------------------------------
--
-- Each step says which versions lack what it adds, and does it only when the catalog says it is
-- missing: ALTER TABLE takes its exclusive lock before IF NOT EXISTS would find a column there.

-- An upgrade takes strong locks on the tables it changes (a column, an index build, a trigger, the
-- owner roles.sql gives them), one table after another. Taken here all at once instead, in the
-- order the services lock them (an end: appointments, then billing_queue; a batch: billing_queue,
-- then billing_entries), so that no end or batch can deadlock with the upgrade: they wait for its
-- commit (python db.py apply-schema runs both files as one transaction). Only when something is
-- to be done: the database records another version than this file's (section 4), or roles.sql
-- has yet to hand the tables to clinic_owner. An up-to-date database takes no lock here; a new one
-- has no tables yet, and nothing to wait for.
DO $$ BEGIN
    IF to_regclass('billing_entries') IS NULL THEN
        RETURN;  -- (a separate test: the casts below would fail before OR could skip them)
    END IF;
    IF (   obj_description('public'::regnamespace, 'pg_namespace')
               IS DISTINCT FROM format('clinic-billing schema version %s', current_setting('clinic_billing.schema_version'))
        OR to_regrole('clinic_owner') IS NULL
        OR EXISTS (SELECT 1 FROM pg_class
                   WHERE oid IN ('appointments'::regclass, 'billing_queue'::regclass, 'billing_entries'::regclass)
                     AND relowner <> to_regrole('clinic_owner')))
    THEN
        LOCK TABLE appointments, billing_queue, billing_entries IN ACCESS EXCLUSIVE MODE;
    END IF;
END $$;

-- From version 1 (whose billing_queue had no request_id): the column and its CHECK. On a live
-- table: the column is nullable without a default, a catalog change with no rewrite, and its CHECK
-- is NOT VALID, which checks every new row without scanning the old ones (all NULL, which passes
-- anyway). It can be validated at any time (ALTER TABLE billing_queue VALIDATE CONSTRAINT
-- billing_queue_request_id_shape: a SHARE UPDATE EXCLUSIVE lock, reads and writes go on), and
-- nothing depends on it.
DO $$ BEGIN
    IF to_regclass('billing_queue') IS NULL THEN
        RETURN;  -- a new database: section 2 makes the table whole
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'billing_queue'::regclass AND attname = 'request_id' AND NOT attisdropped) THEN
        ALTER TABLE billing_queue ADD COLUMN request_id text;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint
                   WHERE conrelid = 'billing_queue'::regclass AND conname = 'billing_queue_request_id_shape') THEN
        ALTER TABLE billing_queue ADD CONSTRAINT billing_queue_request_id_shape
            CHECK (request_id ~ '^[A-Za-z0-9._:-]{1,128}$') NOT VALID;
    END IF;
END $$;

-- From versions 1 and 2 (whose ledger had no txid, the entries' positions in the change feed):
-- the column, added with the constant default '0' (a catalog change: no rewrite, and no UPDATE,
-- which the append-only triggers would refuse), then its default becomes pg_current_xact_id(),
-- in one transaction: every entry committed before it sits at txid 0, ordered by
-- appointment_id, ahead of every later one, which is the truth.
DO $$ BEGIN
    IF to_regclass('billing_entries') IS NULL THEN
        RETURN;  -- a new database: section 2 makes the table whole
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = 'billing_entries'::regclass AND attname = 'txid' AND NOT attisdropped) THEN
        ALTER TABLE billing_entries ADD COLUMN txid xid8 NOT NULL DEFAULT '0';
        ALTER TABLE billing_entries ALTER COLUMN txid SET DEFAULT pg_current_xact_id();
    END IF;
END $$;

-- From versions 1 and 2 (whose tables had PostgreSQL's default autovacuum thresholds): the
-- storage parameters that section 2 makes appointments and billing_queue with (why: at
-- billing_queue). Also puts them back when changed by hand. Set only when they differ: a SHARE
-- UPDATE EXCLUSIVE lock, reads and writes go on.
DO $$
DECLARE
    wanted CONSTANT text[] := ARRAY['autovacuum_vacuum_scale_factor=0', 'autovacuum_vacuum_threshold=10000'];
BEGIN
    IF to_regclass('billing_queue') IS NULL THEN
        RETURN;  -- a new database: section 2 makes the tables with them
    END IF;
    IF NOT (SELECT coalesce(reloptions, '{}') @> wanted FROM pg_class WHERE oid = 'appointments'::regclass) THEN
        ALTER TABLE appointments SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000);
    END IF;
    IF NOT (SELECT coalesce(reloptions, '{}') @> wanted FROM pg_class WHERE oid = 'billing_queue'::regclass) THEN
        ALTER TABLE billing_queue SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000);
    END IF;
END $$;


-- 2. The tables and their indexes ----------------------------------------------------------------

-- One row per appointment. Open while end_date IS NULL; ending it fills end_date and price and,
-- in the same transaction, inserts its billing_queue row. Vacuumed after every 10,000 changed
-- rows, as billing_queue is (why: there): its ends leave dead entries in appointments_open.
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
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000);

-- The listings of GET /appointments (LIST_APPOINTMENTS in appointments.py): newest first by
-- start_date, ties broken by id, one page after another by keyset ((start_date, id) < the
-- cursor's), never OFFSET, so that a deep page costs what the first one does. One index per
-- filter, each read backwards from the cursor:
--   no filter
CREATE INDEX IF NOT EXISTS appointments_newest ON appointments (start_date, id);
--   status=ended. Partial, so that a page never walks past open appointments, however many were
--   left open and forgotten (with physician_id= or patient_id=, their own indexes serve it).
CREATE INDEX IF NOT EXISTS appointments_ended ON appointments (start_date, id) WHERE end_date IS NOT NULL;
--   physician_id= (with any status or patient)
CREATE INDEX IF NOT EXISTS appointments_by_physician ON appointments (physician_id, start_date, id);
--   patient_id= (a patient's history, with any status)
CREATE INDEX IF NOT EXISTS appointments_by_patient ON appointments (patient_id, start_date, id);
--   status=open, also with physician_id= (the appointments in progress: a handful per physician).
--   Partial, so it stays as small as what is open. (It names end_date, so an end can no longer
--   be a HOT update; the end writes each index anyway once the row's page is full.)
CREATE INDEX IF NOT EXISTS appointments_open ON appointments (start_date, id) WHERE end_date IS NULL;

-- The outbox between the two services: one row per ended appointment, written in the same
-- transaction as the end, so no charge can be lost while the billing worker is down.
-- Rows are never deleted; their status says where they are:
--   pending  waiting to be billed (available_at says from when: retries back off)
--   billed   its billing_entries row exists; processed_at says when
--   failed   BILLING_MAX_ATTEMPTS attempts failed; last_error says why;
--            `python billing_worker.py requeue` makes it pending again
--
-- Vacuumed after every 10,000 changed rows, whatever the table's size. Billing a charge is not a
-- HOT update (status is in the partial indexes' predicates), so each one leaves an entry in
-- billing_queue_due that claims step over until it is gone: right after a drain of 25,000
-- charges, claims of 1 to 5 rows took 10-17 ms instead of about 1 (bench/bench.py). PostgreSQL's
-- default waits for 20 % of the table to change, and this table keeps every billed row: with 10
-- million of them, 2 million dead rows would pile up first. (On a large table PostgreSQL 14 and
-- later may skip a vacuum's index pass while the dead rows sit on under 2 % of its pages; claims
-- then mark the entries dead as they pass, which makes the next claims skip them cheaply, and the
-- index drops them when it needs the room.)
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
    -- The X-Request-ID of the request that ended the appointment: the worker logs it with the
    -- charge, so one id follows an appointment from the HTTP request to the ledger. NULL on rows
    -- queued without one (a database made by version 1 has them).
    request_id     text,
    CONSTRAINT billing_queue_processed_iff_billed CHECK ((status = 'billed') = (processed_at IS NOT NULL)),
    CONSTRAINT billing_queue_request_id_shape CHECK (request_id ~ '^[A-Za-z0-9._:-]{1,128}$')
) WITH (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000);

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

-- The billing service's ledger: exactly one charge per appointment, enforced here as well as by
-- the worker's claim. Append-only (section 3).
CREATE TABLE IF NOT EXISTS billing_entries (
    appointment_id uuid          PRIMARY KEY REFERENCES billing_queue (appointment_id),
    total_price    numeric(12,2) NOT NULL CHECK (total_price >= 0),
    created_at     timestamptz   NOT NULL DEFAULT now(),
    -- The entry's position in the change feed, with appointment_id: see "The change feed" below.
    txid           xid8          NOT NULL DEFAULT pg_current_xact_id()
);

-- Serves GET /billing-entries?limit=N&before= (LIST_ENTRIES, LIST_ENTRIES_BEFORE in ledger.py):
-- newest first, by keyset from the cursor.
CREATE INDEX IF NOT EXISTS billing_entries_newest
    ON billing_entries (created_at DESC, appointment_id DESC);

-- The change feed (GET /billing-entries/changes, ledger.py): every entry once, in an order that no
-- consumer can fall behind on.
--
-- The trap: several workers commit their batches concurrently, so ordering by created_at or by a
-- sequence hands out positions in the order transactions *started*, while entries become visible
-- in the order they *commit*. A reader that has moved past position 10 would never see an entry 9
-- whose transaction commits after it read: skipped forever, a charge missing downstream.
--
-- What is done instead: txid is the inserting transaction's id (its top-level xid8, assigned by the
-- default: clinic_worker may not set it, roles.sql), and an entry's position is (txid,
-- appointment_id). The feed hands out only entries whose txid is below the xmin of its snapshot,
-- pg_snapshot_xmin(pg_current_snapshot()): every transaction with an id below it has ended, and
-- every transaction still running or yet to start has an id at or above it, so no entry can ever
-- appear below a position the feed has handed out. An entry waits behind the oldest transaction
-- still running (any that wrote, in any database of the server: normally milliseconds).
--
-- Serves the feed's pages (FEED_FROM_START, FEED_AFTER), its cursor check (POSITION) and the
-- guard in section 3: a range of positions below the horizon, in order.
CREATE INDEX IF NOT EXISTS billing_entries_feed ON billing_entries (txid, appointment_id);

-- The base backups of this cluster, one row per backup, as pgBackRest's `info` reports them:
-- written by the backup service (deploy/postgres/clinic-backup) after each backup it takes, read
-- by both services' /metrics (telemetry.BACKUP_STATS, the newest stopped_at) for the
-- ClinicNoRecentBaseBackup alert. A row is history: it stays when retention expires its backup.
-- A restore brings the rows back as of its target; the backup service records the repository's
-- backups again when it starts. One row a day: small enough to read whole, no index beyond the key.
CREATE TABLE IF NOT EXISTS base_backups (
    label       text PRIMARY KEY,                                 -- pgBackRest's, e.g. 20261207-012305F
    kind        text NOT NULL CHECK (kind IN ('full', 'diff', 'incr')),
    started_at  timestamptz NOT NULL,
    stopped_at  timestamptz NOT NULL CHECK (stopped_at >= started_at),
    size_bytes  bigint NOT NULL CHECK (size_bytes >= 0),          -- the cluster's files it covers
    repo_bytes  bigint NOT NULL CHECK (repo_bytes >= 0),          -- what it added to the repository, compressed
    wal_start   text NOT NULL,                                    -- the WAL a restore of it needs at least
    wal_stop    text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);


-- 3. The ledger's triggers, and the view for people with psql ------------------------------------

-- Positions rest on the server's transaction counter, which only moves forward, on a physical
-- copy too (a replica, a base backup, pg_upgrade). A pg_dump restored into a new cluster keeps
-- the entries' txids but starts the counter low: new entries would sort below entries already
-- handed out, and consumers following the feed would never see them. So before every insert into
-- the ledger this refuses, with SQLSTATE 55000 (object_not_in_prerequisite_state: the system's
-- fault, the worker retries the pass and spends no attempt of any row), when a committed entry
-- carries a txid at or above its snapshot's xmax, which no transaction of this server can have.
-- docs/operations.md ("Loading a dump") says how to move the counter past them. One probe of
-- billing_entries_feed per statement.
CREATE OR REPLACE FUNCTION billing_entries_positions_follow_the_server() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- Qualified: pg_restore runs with an empty search_path.
    IF EXISTS (SELECT 1 FROM public.billing_entries
               WHERE txid >= pg_snapshot_xmax(pg_current_snapshot()) AND txid <> pg_current_xact_id()) THEN
        RAISE EXCEPTION 'billing_entries holds positions ahead of this server''s transaction ids (%)',
                        pg_snapshot_xmax(pg_current_snapshot())
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'New entries would sort before entries the change feed has handed out.',
                  HINT = 'A pg_dump restored into a new cluster: move its transaction counter past them (docs/operations.md, Loading a dump).';
    END IF;
    RETURN NULL;
END
$$;

-- Wakes the feed's waiting requests (LedgerBell in ledger.py) when entries commit: NOTIFY is sent at
-- commit, and dropped with a rollback. Once per statement that inserted something, whoever wrote
-- (the worker, an operator's repair in psql, a restore).
CREATE OR REPLACE FUNCTION billing_entries_ring_the_feed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        PERFORM pg_notify('billing_entries', '');
    END IF;
    RETURN NULL;
END
$$;

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
-- worker's writes and hold up its next ones on every run of this file. A trigger whose
-- definition changes gets a new name (or its old one is dropped explicitly).
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
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'billing_entries'::regclass AND tgname = 'billing_entries_positions_follow_the_server') THEN
        CREATE TRIGGER billing_entries_positions_follow_the_server
            BEFORE INSERT ON billing_entries
            FOR EACH STATEMENT EXECUTE FUNCTION billing_entries_positions_follow_the_server();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger
                   WHERE tgrelid = 'billing_entries'::regclass AND tgname = 'billing_entries_ring_the_feed') THEN
        CREATE TRIGGER billing_entries_ring_the_feed
            AFTER INSERT ON billing_entries REFERENCING NEW TABLE AS inserted
            FOR EACH STATEMENT EXECUTE FUNCTION billing_entries_ring_the_feed();
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


-- 4. The version this file brought the database to -----------------------------------------------

-- The comment of schema public (psql's \dn+ shows it), which the lock in section 1 reads. A
-- comment rather than a row: catalog only, it leaves the tables' data alone, travels with
-- pg_dump and CREATE DATABASE ... TEMPLATE, and COMMENT ON SCHEMA locks no table. Written only
-- when it differs, last, so that a run that fails before its end leaves the older version
-- recorded (and the next run takes the lock again).
DO $$
DECLARE
    recorded CONSTANT text := format('clinic-billing schema version %s', current_setting('clinic_billing.schema_version'));
BEGIN
    IF obj_description('public'::regnamespace, 'pg_namespace') IS DISTINCT FROM recorded THEN
        EXECUTE format('COMMENT ON SCHEMA public IS %L', recorded);
    END IF;
END $$;
