"""The framework ceiling of `make bench` (bench/bench.py, section 1): the most a Falcon app on our
waitress settings does for a small JSON POST on this machine, with no database.

    .venv/bin/python bench/ceiling_app.py PORT

POST /appointments reads the JSON body, parses it and answers 201 with it and a new id, as JSON;
GET /health answers {"status": "ok"} (bench.py waits for it). Served by web.make_server with its
default thread count, which is what appointments.py serves the API with: the same waitress
settings, the same threads. No middleware, no logging, no validation, no database: whatever the
API spends per request beyond this is the service's own. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import falcon

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from web import make_server, on_stop_signals  # noqa: E402


class Echo:
    def on_post(self, req, resp):
        body = json.loads(req.bounded_stream.read())
        resp.status = 201
        resp.content_type = falcon.MEDIA_JSON
        resp.text = json.dumps({"id": str(uuid.uuid4()), **body})


class Health:
    def on_get(self, req, resp):
        resp.content_type = falcon.MEDIA_JSON
        resp.text = '{"status": "ok"}'


def main() -> None:
    def stop():
        raise KeyboardInterrupt  # inside server.run(), as appointments.py does

    on_stop_signals(stop)
    app = falcon.App()
    app.add_route("/appointments", Echo())
    app.add_route("/health", Health())
    try:
        make_server(app, int(sys.argv[1])).run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
