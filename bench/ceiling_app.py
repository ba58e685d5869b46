"""The ceilings of section 2 of `make bench` (bench/bench.py): the most a Falcon app on our waitress
settings does for a small JSON POST on this machine, without a database and with one round trip
to it.

    .venv/bin/python bench/ceiling_app.py PORT                 # the framework ceiling (section 1)
    DATABASE_URL=... .venv/bin/python bench/ceiling_app.py PORT --with-insert   # the design floor

The framework ceiling: POST /appointments reads the JSON body, parses it and answers 201 with it
and a new id, as JSON. No middleware, no logging, no validation, no database: whatever the API
spends per request beyond this is the service's own.

The design floor (--with-insert): the same, but POST /appointments runs the API's start statement
(appointments.INSERT_APPOINTMENT, read when it starts) with a uuid4 made here and the body's
physician_id and patient_id (no start_date: the database's clock, as the API does; the default
hourly rate), through the project's pool (db.make_pool, as the API makes its own, opened before
it serves; DATABASE_URL logged in as the API's role), and answers 201 with the inserted row's id
as JSON. Still no validation, middleware, logging or access control: what a request that makes one
round trip to PostgreSQL through psycopg costs in this design, before any of the API's own work.

Both: GET /health answers {"status": "ok"} (bench.py waits for it). Served by web.make_server with
web.THREADS threads, which is what appointments.py serves the API with: the same waitress settings,
the same threads. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import json
import os
import sys
import uuid

import falcon

import web


class Echo:
    def on_post(self, req, resp):
        body = json.loads(req.bounded_stream.read())
        resp.status = 201
        resp.content_type = falcon.MEDIA_JSON
        resp.text = json.dumps({"id": str(uuid.uuid4()), **body})


class Insert:
    """One INSERT_APPOINTMENT per request through the pool: autocommit, one statement, one round trip."""

    def __init__(self, pool, statement: str, hourly_rate):
        self._pool, self._statement, self._hourly_rate = pool, statement, hourly_rate

    def on_post(self, req, resp):
        body = json.loads(req.bounded_stream.read())
        values = {"id": uuid.uuid4(), "physician_id": uuid.UUID(body["physician_id"]), "patient_id": uuid.UUID(body["patient_id"]),
                  "start_date": None, "hourly_rate": self._hourly_rate}
        with self._pool.connection() as conn:
            row = conn.execute(self._statement, values).fetchone()
        resp.status = 201
        resp.content_type = falcon.MEDIA_JSON
        resp.text = json.dumps({"id": str(row[0])})


class Health:
    def on_get(self, req, resp):
        resp.content_type = falcon.MEDIA_JSON
        resp.text = '{"status": "ok"}'


def main() -> None:
    def stop():
        raise KeyboardInterrupt  # inside server.run(), as appointments.py does

    web.on_stop_signals(stop)
    with_insert = "--with-insert" in sys.argv[2:]
    pool = None
    app = falcon.App()
    try:
        if with_insert:  # imported only here: the framework ceiling's memory stays web.py's alone
            import appointments
            import config
            import db

            statement = appointments.INSERT_APPOINTMENT
            if not isinstance(statement, str):
                sys.exit("appointments.INSERT_APPOINTMENT is not SQL text: update bench/ceiling_app.py")
            settings = config.Config(database_url=os.environ["DATABASE_URL"])
            pool = db.make_pool(settings, "floor")
            pool.open(wait=True, timeout=30)
            app.add_route("/appointments", Insert(pool, statement, settings.hourly_rate))
        else:
            app.add_route("/appointments", Echo())
        app.add_route("/health", Health())
        web.make_server(app, int(sys.argv[1]), threads=web.THREADS).run()
    except KeyboardInterrupt:
        pass
    finally:
        if pool is not None:
            pool.close()


if __name__ == "__main__":
    main()
