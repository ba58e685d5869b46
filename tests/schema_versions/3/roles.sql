-- FROZEN: the roles.sql of clinic-billing version 3 (CHANGELOG.md, "Version 3"), byte for byte after
-- this header, as databases of that version were made with it. Never edit it: tests/test_schema.py
-- makes a database with it and upgrades that with today's schema.sql and roles.sql.

-- clinic-billing database roles: one per service, and one that owns the schema's objects.
--
-- Applied right after schema.sql, as a superuser, and as safe to apply again on a live database:
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f schema.sql -f roles.sql
-- (`python db.py apply-schema` applies both in one transaction, and sets the passwords.)
--
--   clinic_api     LOGIN    the appointments API (appointments.py)
--   clinic_worker  LOGIN    the billing worker (billing_worker.py: work, --once, requeue, reconcile)
--   clinic_owner   NOLOGIN  owns the tables, the view and the function. Nobody logs in as it: only
--                           migrations act as it (a superuser applying these files, or SET ROLE).
--
-- No password is in this file: `python db.py apply-schema` sets the two LOGIN roles' passwords
-- from CLINIC_API_PASSWORD and CLINIC_WORKER_PASSWORD when they are set (trust or peer
-- authentication needs none).
--
-- Each service gets exactly what its SQL uses, column by column where it touches only some
-- columns, and nothing else: no DELETE, no TRUNCATE, no CREATE anywhere, no view, nothing of the
-- other service's data it does not need (the API never reads the ledger; the worker never reads
-- who the patient or the physician was). tests/test_roles.py holds the same table and proves
-- every cell of it, logged in as each role, and runs the services' real queries as them.
-- Changing a query in appointments.py, billing_worker.py or telemetry.py may mean a change here.

-- The same lock as schema.sql (a session lock: taken again in the same session it is only
-- counted twice), so that two runs against one database do not interleave their GRANTs (two
-- concurrent updates of one catalog row fail with "tuple concurrently updated").
DO $$ BEGIN PERFORM pg_advisory_lock(hashtext('clinic-billing schema')); END $$;
SET lock_timeout = '3s';

-- The roles. Roles belong to the whole cluster, not to this database, and an advisory lock
-- belongs to one database: runs against two databases of one cluster (test databases, a staging
-- copy) could both find a role missing and both create it. So this block first takes a lock on
-- the shared catalog pg_authid, which is one lock for the whole cluster: SHARE UPDATE EXCLUSIVE
-- conflicts with itself (another run of this block, waiting here until this transaction ends)
-- and with VACUUM/ANALYZE of pg_authid, but not with logins, CREATE ROLE or ALTER ROLE elsewhere.
-- One statement, so one transaction also under psql -f. Then each role is created when missing,
-- and its attributes and settings are (re)stated, which puts back anything changed by hand.
--
-- The settings bound what one session can hold (a client's settings, such as the worker's own
-- session options, override them):
--   statement_timeout                    a runaway statement is cancelled instead of holding
--                                        its locks and a pool connection;
--   idle_in_transaction_session_timeout  a process frozen inside a transaction (SIGSTOP, a
--                                        stuck VM, a debugger) loses its session, which rolls
--                                        it back and frees its row locks for the others;
--   lock_timeout                         waiting behind a lock (a migration's ALTER TABLE, a
--                                        concurrent end of the same appointment) gives up
--                                        instead of queueing every later request behind it.
-- clinic_api: 5 s each. A request is a few short statements and milliseconds of work; one that
--   waits 5 s has long lost its client, and a cancelled statement, timed-out lock or ended
--   session is an OperationalError, which the API answers with 503 and Retry-After.
-- clinic_worker: statement_timeout 60 s, the same as billing_worker.WORKER_SESSION (a batch of
--   BILLING_BATCH_SIZE rows in one statement takes far less); idle_in_transaction 5 s, the same
--   as WORKER_SESSION, so a frozen worker's batch goes back to the others quickly; lock_timeout
--   10 s: the claim skips locked rows (SKIP LOCKED), so only a table lock (a migration) makes it
--   wait, and a failed pass is retried a second later without spending any row's attempt.
DO $$
BEGIN
    LOCK TABLE pg_catalog.pg_authid IN SHARE UPDATE EXCLUSIVE MODE;

    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'clinic_owner') THEN
        CREATE ROLE clinic_owner NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'clinic_api') THEN
        CREATE ROLE clinic_api LOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'clinic_worker') THEN
        CREATE ROLE clinic_worker LOGIN;
    END IF;

    ALTER ROLE clinic_owner  NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
    ALTER ROLE clinic_api    LOGIN   NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
    ALTER ROLE clinic_worker LOGIN   NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;

    ALTER ROLE clinic_api SET statement_timeout = '5s';
    ALTER ROLE clinic_api SET idle_in_transaction_session_timeout = '5s';
    ALTER ROLE clinic_api SET lock_timeout = '5s';

    ALTER ROLE clinic_worker SET statement_timeout = '60s';
    ALTER ROLE clinic_worker SET idle_in_transaction_session_timeout = '5s';
    ALTER ROLE clinic_worker SET lock_timeout = '10s';
END $$;

-- Every object schema.sql makes belongs to clinic_owner (indexes go with their table; schema.sql
-- makes no sequence). Changed only when it is not so already: ALTER TABLE ... OWNER TO takes an
-- ACCESS EXCLUSIVE lock even when the owner stays the same, which on a live database would wait
-- for every reader and hold up every request behind it. A new table, view, sequence or function
-- in schema.sql gets a line here (tests/test_roles.py fails until it does).
DO $$
DECLARE
    owner CONSTANT oid := 'clinic_owner'::regrole;
    relation regclass;
    function regprocedure;
BEGIN
    FOREACH relation IN ARRAY ARRAY['appointments', 'billing_queue', 'billing_entries']::regclass[] LOOP
        IF (SELECT relowner FROM pg_class WHERE oid = relation) <> owner THEN
            EXECUTE format('ALTER TABLE %s OWNER TO clinic_owner', relation);
        END IF;
    END LOOP;
    IF (SELECT relowner FROM pg_class WHERE oid = 'billing_status'::regclass) <> owner THEN
        ALTER VIEW billing_status OWNER TO clinic_owner;
    END IF;
    FOREACH function IN ARRAY ARRAY['billing_entries_append_only()', 'billing_entries_positions_follow_the_server()',
                                     'billing_entries_ring_the_feed()']::regprocedure[] LOOP
        IF (SELECT proowner FROM pg_proc WHERE oid = function) <> owner THEN
            EXECUTE format('ALTER FUNCTION %s OWNER TO clinic_owner', function);
        END IF;
    END LOOP;
END $$;

-- What each service may do, derived from its SQL (appointments.py, billing_worker.py and
-- QUEUE_STATS in telemetry.py, which both services run for their /metrics; SCHEMA_PRESENT in
-- db.py only calls to_regclass, which needs no privilege). Everything is revoked first and
-- granted again in the same statement, so a run takes away what an older version (or a hand)
-- granted, and a live service never sees a moment without its grants, also under psql -f. GRANT
-- and REVOKE take no lock on the tables: nothing here waits for the services.
--
-- SELECT ... FOR UPDATE needs UPDATE on at least one column of the locked table (PostgreSQL's
-- rule): the worker's CLAIM has it through its UPDATE of the status columns of billing_queue.
-- Foreign-key checks run as the table's owner, so neither needs anything on the referenced table
-- for them. pg_notify (the API's NOTIFY) and LISTEN (the worker) are allowed to every role.
-- billing_status (the view for people with psql) is granted to neither: no service reads it.
DO $$
BEGIN
    REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC;
    -- Table-level REVOKE ALL takes each column's privileges away too.
    REVOKE ALL ON appointments, billing_queue, billing_entries, billing_status FROM clinic_api, clinic_worker;
    -- Trigger functions: a trigger runs its function whoever fired it; nobody calls them directly.
    REVOKE ALL ON FUNCTION billing_entries_append_only(), billing_entries_positions_follow_the_server(),
                           billing_entries_ring_the_feed() FROM PUBLIC, clinic_api, clinic_worker;

    -- clinic_api, the appointments API:
    --   INSERT_APPOINTMENT  inserts id, physician_id, patient_id, start_date, hourly_rate
    --                       (created_at, end_date and price keep their defaults), RETURNING;
    --   SELECT_APPOINTMENT, SELECT_FOR_END  read every column but created_at;
    --   END_AND_QUEUE_CHARGE  updates end_date and price only (where end_date IS NULL, a read
    --                       of end_date); inserts the queue row's appointment_id, total_price
    --                       and request_id, RETURNING appointment_id;
    --   SELECT_APPOINTMENT  joins billing_queue on appointment_id for its status;
    --   QUEUE_STATS         counts billing_queue by status, and its due rows' available_at.
    --   Nothing on billing_entries: the ledger is the worker's.
    GRANT SELECT (id, physician_id, patient_id, start_date, end_date, hourly_rate, price),
          INSERT (id, physician_id, patient_id, start_date, hourly_rate),
          UPDATE (end_date, price)
        ON appointments TO clinic_api;
    GRANT SELECT (appointment_id, status, available_at),
          INSERT (appointment_id, total_price, request_id)
        ON billing_queue TO clinic_api;

    -- clinic_worker, the billing worker:
    --   reconcile reads appointments' id, end_date and price, never who the patient or the
    --                       physician was (the ledger needs no personal data);
    --   CLAIM, CLAIM_AND_BILL, BILL_ONE, RECORD_FAILURE, REQUEUE_FAILED, reconcile, QUEUE_STATS
    --                       read billing_queue's appointment_id, total_price, status, attempts,
    --                       available_at, processed_at and request_id (never last_error or
    --                       created_at), and update its status columns only: status, attempts,
    --                       available_at, last_error, processed_at; never the charge itself
    --                       (total_price), nor request_id, nor which appointment it is;
    --   CLAIM_AND_BILL, BILL_ONE  insert billing_entries' appointment_id and total_price
    --                       (created_at and txid keep their defaults: the worker cannot choose
    --                       an entry's place in the change feed); SELECT_ENTRY, the listings,
    --                       the change feed (feed.py) and reconcile read its columns.
    --   The change feed's LISTEN on billing_entries, like every LISTEN, needs no grant.
    GRANT SELECT (id, end_date, price)
        ON appointments TO clinic_worker;
    GRANT SELECT (appointment_id, total_price, status, attempts, available_at, processed_at, request_id),
          UPDATE (status, attempts, available_at, last_error, processed_at)
        ON billing_queue TO clinic_worker;
    GRANT SELECT,
          INSERT (appointment_id, total_price)
        ON billing_entries TO clinic_worker;

    -- Neither creates anything: not in schema public (PostgreSQL 15 no longer grants CREATE on
    -- it to PUBLIC, older versions and upgraded clusters did), nor schemas or temporary tables in
    -- this database. Both keep USAGE on the schema and CONNECT to the database, also granted to
    -- them by name so that revoking either from PUBLIC later leaves the services working.
    REVOKE CREATE ON SCHEMA public FROM PUBLIC, clinic_api, clinic_worker;
    GRANT USAGE ON SCHEMA public TO clinic_api, clinic_worker;
    -- A database's own privileges are not copied by CREATE DATABASE ... TEMPLATE: a copy needs
    -- this file applied again.
    EXECUTE format('REVOKE CREATE, TEMPORARY ON DATABASE %I FROM PUBLIC, clinic_api, clinic_worker', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO clinic_api, clinic_worker', current_database());
END $$;
