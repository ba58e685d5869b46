"""Bearer tokens (API_TOKENS, API_TOKENS_FILE) and the cache headers, in process and over waitress."""

import dataclasses
import hashlib
import uuid

import falcon.testing
import pytest
import requests

import appointments
import ledger
from config import Config, ConfigError
from db import make_pool
from support import free_port

TOKEN = "s3cret-token_for.the-test-suite~1/2+3="
OTHER = "another-token-of-32-characters-or-more"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"physician_id": str(uuid.uuid4()), "patient_id": str(uuid.uuid4()), "start_date": "2020-12-01 13:00:00"}


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- configuration -----------------------------------------------------------------------------


def test_tokens_are_kept_only_as_sha256_digests_plain_or_given_hashed(tmp_path):
    secret_file = tmp_path / "tokens"
    secret_file.write_text(f"\n{OTHER}\nsha256:{sha256('from-file').upper()}\n")
    config = Config.from_env({"API_TOKENS": f" {TOKEN} ,,sha256:{sha256('hashed')}", "API_TOKENS_FILE": str(secret_file)})
    assert config.api_token_hashes == (sha256(TOKEN), sha256("hashed"), sha256(OTHER), sha256("from-file"))
    assert TOKEN not in repr(config)
    assert Config.from_env({}).api_token_hashes == ()


@pytest.mark.parametrize(
    "env",
    [
        {"API_TOKENS": "has space but is long enough to be a token"},
        {"API_TOKENS": "sha256:abc"},
        {"API_TOKENS": "short-and-guessable"},
        {"API_TOKENS": " , "},
        {"API_TOKENS_FILE": "/nonexistent/tokens"},
        {"API_TOKENS_FILE": "EMPTY"},
    ],
)
def test_a_bad_or_empty_token_setting_is_refused_naming_the_variable_without_echoing_it(env, tmp_path):
    """A setting that is there but yields no token must not start an open service."""
    if env.get("API_TOKENS_FILE") == "EMPTY":
        (tmp_path / "empty").write_text("\n\n")
        env = {"API_TOKENS_FILE": str(tmp_path / "empty")}
    name = next(iter(env))
    with pytest.raises(ConfigError, match=name) as refused:
        Config.from_env(env)
    assert "space" not in str(refused.value) and "abc" not in str(refused.value) and "guessable" not in str(refused.value)


# --- in process --------------------------------------------------------------------------------


@pytest.fixture
def guarded(config, pool):
    config = dataclasses.replace(config, api_token_hashes=(sha256(TOKEN), sha256(OTHER)))
    return (
        falcon.testing.TestClient(appointments.create_app(config, pool)),
        falcon.testing.TestClient(ledger.create_app(config, pool)),
    )


def test_a_request_without_a_token_is_401_with_the_bearer_challenge(guarded, db):
    api, _ = guarded
    resp = api.simulate_post("/appointments", json=BODY)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == 'Bearer realm="clinic-billing"'
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json["detail"].startswith("Authorization:") and resp.json["request_id"] == resp.headers["x-request-id"]
    assert db.execute("SELECT count(*) AS n FROM appointments").fetchone()["n"] == 0


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {TOKEN}x", "Bearer ", f"Bearer {TOKEN} extra", "Bearer ünïcode", f"bearer {TOKEN[:-1]}"],
)
def test_a_wrong_or_malformed_bearer_token_is_401_invalid_token_and_never_echoed(guarded, authorization):
    api, worker = guarded
    for client, path in ((api, f"/appointments/{uuid.uuid4()}"), (worker, "/billing-entries")):
        resp = client.simulate_get(path, headers={"Authorization": authorization})
        assert resp.status_code == 401
        assert resp.headers["www-authenticate"] == 'Bearer realm="clinic-billing", error="invalid_token"'
        assert TOKEN not in resp.text


@pytest.mark.parametrize("authorization", [f"Basic {TOKEN}", TOKEN])
def test_another_scheme_is_401_as_if_no_token_was_sent(guarded, authorization):
    api, _ = guarded
    resp = api.simulate_get(f"/appointments/{uuid.uuid4()}", headers={"Authorization": authorization})
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == 'Bearer realm="clinic-billing"'


def test_each_configured_token_opens_every_route_and_the_scheme_is_case_insensitive(guarded):
    api, worker = guarded
    created = api.simulate_post("/appointments", json=BODY, headers=BEARER)
    assert created.status_code == 201
    appointment_id = created.json["id"]
    for headers in (BEARER, {"Authorization": f"bearer {OTHER}"}):
        assert api.simulate_get(f"/appointments/{appointment_id}", headers=headers).status_code == 200
        assert worker.simulate_get("/billing-entries", headers=headers).status_code == 200
    ended = api.simulate_post(f"/appointments/{appointment_id}/end", json={"end_date": "2020-12-01 14:00:00"}, headers=BEARER)
    assert ended.status_code == 200


def test_probes_metrics_and_the_document_need_no_token_and_unknown_paths_stay_404(guarded):
    for client in guarded:
        for path in ("/health", "/ready", "/metrics", "/openapi.json"):
            assert client.simulate_get(path).status_code == 200, path
        assert client.simulate_get("/no/such/path").status_code == 404


def test_the_token_is_checked_before_the_body_is_read_or_the_database_touched():
    """A body that would be a 400 and a database that is down: without a token, still 401."""
    config = Config(database_url=f"postgresql://postgres@127.0.0.1:{free_port()}/none", api_token_hashes=(sha256(TOKEN),))
    pool = make_pool(config, "tests")
    try:
        api = falcon.testing.TestClient(appointments.create_app(config, pool))  # never opened
        resp = api.simulate_post("/appointments", body=b"{not json", headers={"Content-Type": "application/json"})
        assert resp.status_code == 401
        assert api.simulate_post("/appointments", body=b"{not json", headers={"Content-Type": "application/json", **BEARER}).status_code == 400
    finally:
        pool.close()


def test_personal_data_is_not_cached_and_no_response_is_sniffed(api, billing_api, make_appointment):
    appointment = make_appointment()
    for resp in (
        api.simulate_get(f"/appointments/{appointment['id']}"),
        api.simulate_get(f"/appointments/{uuid.uuid4()}"),
        api.simulate_post(f"/appointments/{appointment['id']}/end"),
        billing_api.simulate_get("/billing-entries"),
        billing_api.simulate_get(f"/billing-entries/{appointment['id']}"),
    ):
        assert resp.headers["cache-control"] == "no-store"
        assert resp.headers["x-content-type-options"] == "nosniff"
    health = api.simulate_get("/health")
    assert health.headers["x-content-type-options"] == "nosniff" and "cache-control" not in health.headers


# --- real processes ----------------------------------------------------------------------------


def test_both_services_take_their_tokens_from_a_file_and_warn_when_open(services, db_url, tmp_path):
    api_tokens, worker_tokens = tmp_path / "api-tokens", tmp_path / "worker-tokens"
    api_tokens.write_text(f"{TOKEN}\n")
    worker_tokens.write_text(f"sha256:{sha256(OTHER)}\n")
    api = services("appointments.py", db_url, API_TOKENS_FILE=str(api_tokens)).wait_healthy()
    worker = services("billing_worker.py", db_url, API_TOKENS_FILE=str(worker_tokens)).wait_healthy()
    open_api = services("appointments.py", db_url).wait_healthy()
    open_worker = services("billing_worker.py", db_url).wait_healthy()

    assert requests.post(api.base_url + "/appointments", json=BODY, timeout=5).status_code == 401
    assert requests.post(api.base_url + "/appointments", json=BODY, headers=BEARER, timeout=5).status_code == 201
    # Each service has its own tokens: the API's does not open the worker.
    assert requests.get(worker.base_url + "/billing-entries", headers=BEARER, timeout=5).status_code == 401
    assert requests.get(worker.base_url + "/billing-entries", headers={"Authorization": f"Bearer {OTHER}"}, timeout=5).status_code == 200
    assert requests.post(open_api.base_url + "/appointments", json={**BODY, "id": str(uuid.uuid4())}, timeout=5).status_code == 201

    for service in (api, worker, open_api, open_worker):
        service.stop()
    for service in (open_api, open_worker):
        warnings = [line for line in service.output().splitlines() if "no_api_tokens_service_is_open" in line]
        assert len(warnings) == 1 and "API_TOKENS" in warnings[0], service.output()
    for service in (api, worker):
        assert "no_api_tokens_service_is_open" not in service.output()
        assert TOKEN not in service.output() and OTHER not in service.output()
