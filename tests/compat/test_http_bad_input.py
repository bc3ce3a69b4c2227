"""Bad input on the HTTP front door: malformed JSON, wrong types, oversized bodies, unknown routes, wrong sandbox
ids, missing or wrong credentials when token auth is on → the status the E2B SDK expects (its exception class
where it has one), a JSON error body, never a 500 or a traceback; a hypothesis fuzz of the control routes."""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.parse
import uuid
from pathlib import Path

import httpx
import pytest
from e2b import Sandbox
from e2b.exceptions import AuthenticationException, RateLimitException, SandboxException, SandboxNotFoundException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import start_dsec_http

TOKENS = {"tok-alice-0123456789": "alice", "tok-bob-0123456789": "bob"}
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def authed():
    """A server with a tokens file: the door passes the caller's key to gRPC, which decides."""
    root = Path(tempfile.mkdtemp(prefix="dca-", dir="/tmp"))
    tokens = root / "tokens.yaml"
    tokens.write_text("".join(f"{token}: {tenant}\n" for token, tenant in TOKENS.items()))
    running = start_dsec_http(root, ["--tokens-file", str(tokens), "--tenant-max-sandboxes", "1"], api_key="tok-alice-0123456789")
    yield running
    running.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def http(dsec_http):
    with httpx.Client(base_url=dsec_http.http_url, headers={"X-API-Key": dsec_http.api_key}, timeout=60) as client:
        yield client


def assert_clean_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    body = response.json()
    assert body["code"] == status and body["message"]
    return body


@pytest.mark.parametrize("raw", [b"{", b"not json", b"\xff\xfe", b'{"templateID": "base",}', b"[1, 2]", b'"base"', b"null"])
def test_malformed_json_is_400(http, raw):
    response = http.post("/v2/sandboxes", content=raw, headers={"Content-Type": "application/json"})
    assert_clean_error(response, 400)


@pytest.mark.parametrize("body", [
    {}, {"templateID": ""}, {"templateID": 7}, {"templateID": "base", "timeout": "soon"},
    {"templateID": "base", "timeout": -1}, {"templateID": "base", "timeout": 10**12},
    {"templateID": "base", "metadata": {"k": 1}}, {"templateID": "base", "envVars": ["A=1"]},
    {"templateID": "base", "metadata": {"e2b.template": "x"}}, {"templateID": "base", "metadata": {"dsec.substrate": "cloud"}},
    {"templateID": "base", "network": {"denyOut": ["8.8.8.8"]}}, {"templateID": "base", "network": {"allowOut": ["not a host!"]},
                                                                  "allow_internet_access": False},
])  # fmt: skip
def test_invalid_create_bodies_are_400(http, body):
    assert_clean_error(http.post("/v2/sandboxes", json=body), 400)


def test_oversized_body_is_413(http):
    response = http.post("/v2/sandboxes", content=b'{"templateID": "' + b"a" * (2 << 20) + b'"}')
    assert_clean_error(response, 413)


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/nope", 404), ("GET", "/v3/sandboxes", 404), ("PUT", "/sandboxes", 405), ("PATCH", "/v2/sandboxes", 405),
    ("GET", "/sandboxes/sb-0000000000000000", 404), ("DELETE", "/sandboxes/sb-0000000000000000", 404),
    ("GET", "/sandboxes/..%2F..%2Fetc%2Fpasswd", 404), ("GET", "/sandboxes/" + "x" * 5000, 404),
    ("POST", "/sandboxes/%00/pause", 404), ("GET", "/v2/sandboxes?limit=0", 400), ("GET", "/v2/sandboxes?limit=abc", 400),
    ("GET", "/v2/sandboxes?nextToken=%%%", 400), ("GET", "/v2/sandboxes?state=exploded", 400),
    ("GET", "/v2/sandboxes?order=sideways", 400), ("GET", "/v2/sandboxes?startedAfter=yesterday", 400),
    ("DELETE", "/templates/base", 404), ("DELETE", "/templates/snap-0000000000000000", 404),
])  # fmt: skip
def test_unknown_routes_and_wrong_ids(http, method, path, status):
    assert_clean_error(http.request(method, path, json={"timeout": 5} if method == "POST" else None), status)


def test_timeout_body_types(http):
    sb_id = "sb-" + "0" * 16
    assert_clean_error(http.post(f"/sandboxes/{sb_id}/timeout", json={"timeout": "x"}), 400)
    assert_clean_error(http.post(f"/sandboxes/{sb_id}/timeout", json={"timeout": 5}), 404)


def test_bad_sandbox_routing_headers(http):
    for headers, status in (({"E2b-Sandbox-Id": "../../etc"}, 400), ({"E2b-Sandbox-Id": "sb-1", "E2b-Sandbox-Port": "99999"}, 400),
                            ({"E2b-Sandbox-Id": "sb-1", "E2b-Sandbox-Port": "http"}, 400)):
        assert_clean_error(http.get("/health", headers=headers), status)


def test_envd_calls_to_a_sandbox_need_its_access_token(e2b_env, dsec_http, http):
    sb = Sandbox.create(timeout=60)
    try:
        headers = {"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": "49983"}
        assert_clean_error(http.get("/health", headers=headers), 401)
        assert_clean_error(http.get("/health", headers={**headers, "X-Access-Token": "wrong"}), 401)
    finally:
        sb.kill()


def test_auth_on_wrong_or_missing_key(authed, monkeypatch):
    for key, value in authed.env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(AuthenticationException):
        Sandbox.create(timeout=30, api_key="not-a-token")
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key="not-a-token").next_items()
    response = httpx.get(authed.http_url + "/v2/sandboxes", timeout=30)
    assert_clean_error(response, 401)


def test_auth_on_tenants_do_not_see_each_other(authed, monkeypatch):
    for key, value in authed.env.items():
        monkeypatch.setenv(key, value)
    tag = uuid.uuid4().hex
    sb = Sandbox.create(timeout=60, metadata={"suite": tag})  # alice (E2B_API_KEY)
    try:
        bob = "tok-bob-0123456789"
        with pytest.raises(SandboxNotFoundException):
            Sandbox.get_info(sb.sandbox_id, api_key=bob)
        assert Sandbox.kill(sb.sandbox_id, api_key=bob) is False
        assert Sandbox.list(api_key=bob).next_items() == []
        assert [s.sandbox_id for s in Sandbox.list().next_items()] == [sb.sandbox_id]
    finally:
        sb.kill()


def test_admission_control_is_the_servers_429(authed, monkeypatch):
    """The door is a gRPC client: dsec's tenant quota (1 here) refuses the second create; the SDK raises RateLimit."""
    for key, value in authed.env.items():
        monkeypatch.setenv(key, value)
    sb = Sandbox.create(timeout=60)
    try:
        with pytest.raises(RateLimitException):
            Sandbox.create(timeout=60)
        response = httpx.post(authed.http_url + "/v2/sandboxes", json={"templateID": "base"},
                              headers={"X-API-Key": authed.api_key}, timeout=60)
        assert_clean_error(response, 429)
        assert "quota" in response.json()["message"]
    finally:
        sb.kill()
    Sandbox.create(timeout=60).kill()  # the slot is free again


def test_sdk_gets_its_exception_classes(e2b_env):
    with pytest.raises(SandboxException) as caught:
        Sandbox.create(template="base", timeout=60, metadata={"dsec.substrate": "cloud"})
    assert caught.value.status_code == 400


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
FIELDS = st.sampled_from(["templateID", "timeout", "metadata", "envVars", "allow_internet_access", "network", "autoPause",
                          "count", "name", "memory", "secure", "allowOut", "denyOut"])
BODIES = st.one_of(
    st.dictionaries(FIELDS, JSON, max_size=6).map(lambda d: json.dumps(d).encode()),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
)
PATH_IDS = st.one_of(st.just("sb-0000000000000000"), st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30))
ROUTES = st.sampled_from([
    ("POST", "/v2/sandboxes"), ("POST", "/sandboxes"), ("GET", "/v2/sandboxes"), ("GET", "/sandboxes"), ("GET", "/snapshots"),
    ("GET", "/sandboxes/{id}"), ("DELETE", "/sandboxes/{id}"), ("POST", "/sandboxes/{id}/timeout"),
    ("POST", "/sandboxes/{id}/pause"), ("POST", "/sandboxes/{id}/resume"), ("POST", "/v2/sandboxes/{id}/connect"),
    ("POST", "/sandboxes/{id}/snapshots"), ("POST", "/sandboxes/{id}/fork"), ("DELETE", "/templates/{id}"),
])  # fmt: skip
QUERIES = st.dictionaries(st.sampled_from(["limit", "nextToken", "state", "metadata", "order", "template", "startedAfter", "sandboxID"]),
                          st.text(max_size=20), max_size=4)


@FUZZ
@given(route=ROUTES, sandbox_id=PATH_IDS, body=BODIES, query=QUERIES)
def test_fuzz_control_routes_never_5xx(http, route, sandbox_id, body, query):
    method, template = route
    path = template.replace("{id}", urllib.parse.quote(sandbox_id, safe="") or "x")
    response = http.request(method, path, content=body, params=query, headers={"Content-Type": "application/json"})
    assert response.status_code < 500, f"{method} {path} {query} {body[:100]!r} → {response.status_code} {response.text[:300]}"
    assert "Traceback" not in response.text
    if response.status_code == 201 and method == "POST" and path.endswith("sandboxes"):
        http.delete(f"/sandboxes/{response.json()['sandboxID']}")  # a fuzzed body that happened to be valid


def test_server_still_answers_after_the_fuzz(http):
    assert http.get("/health").status_code == 200
    assert http.get("/v2/sandboxes").status_code == 200


def test_envd_token_is_enforced_for_sandboxes_the_door_did_not_create(dsec_http, http):
    """As after a restart of the door: the token lives in the sandbox's label, the door reads it once."""
    import dsec

    client = dsec.Client(dsec_http.grpc_address)
    sb = client.create("base", labels={"e2b.envd_token": "tok-from-label"}, timeout_s=60)
    try:
        headers = {"E2b-Sandbox-Id": sb.id, "E2b-Sandbox-Port": "49983"}
        assert_clean_error(http.get("/health", headers=headers), 401)
        assert http.get("/health", headers={**headers, "X-Access-Token": "tok-from-label"}).status_code == 204
        plain = client.create("base", timeout_s=60)  # no token label: envd is open, as for any dsec sandbox
        try:
            assert http.get("/health", headers={"E2b-Sandbox-Id": plain.id}).status_code == 204
        finally:
            plain.destroy()
    finally:
        sb.destroy()
        client.close()


def test_door_requests_are_counted_in_the_servers_metrics():
    from support.ports import free_port

    root = Path(tempfile.mkdtemp(prefix="dcm-", dir="/tmp"))
    port = free_port()
    running = start_dsec_http(root, ["--metrics-listen", f"127.0.0.1:{port}"])
    try:
        with httpx.Client(base_url=running.http_url, headers={"X-API-Key": "k"}, timeout=30) as client:
            assert client.get("/v2/sandboxes").status_code == 200
            assert client.get("/sandboxes/sb-0000000000000000").status_code == 404
            assert client.get("/health", headers={"E2b-Sandbox-Id": "../x"}).status_code == 400
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        assert 'dsec_http_requests_total{api="e2b",status="2xx"} 1.0' in text
        assert 'dsec_http_requests_total{api="e2b",status="4xx"} 1.0' in text
        assert 'dsec_http_requests_total{api="door",status="4xx"} 1.0' in text
        assert 'dsec_http_request_seconds_count{api="e2b"} 2.0' in text
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)
