"""service/auth.py: bearer keys, two roles, 401 vs 403, auth off only without keys."""

from __future__ import annotations

import logging

import pytest
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.testclient import TestClient
from http_testkit import ADMIN_KEY, BERT_TARGETS, INFERENCE_KEY, bearer, make_adapter, make_settings, single_file

from service.app import create_app
from service.auth import KeyRing, Role
from service.errors import Forbidden, Unauthorized

ADMIN_ROUTES = [("put", "/v1/adapters/x"), ("get", "/v1/adapters"), ("get", "/v1/adapters/x"),
                ("get", "/v1/adapters/x/files/adapter_config.json"), ("delete", "/v1/adapters/x"),
                ("post", "/v1/adapters/x/merge"), ("post", "/v1/unmerge"), ("get", "/v1/state"),
                ("post", "/v1/compose")]
INFERENCE_ROUTES = [("post", "/v1/embeddings"), ("post", "/v1/completions"), ("post", "/v1/classify"),
                    ("get", "/v1/models")]


def _creds(key: str, scheme: str = "Bearer") -> HTTPAuthorizationCredentials:
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=key)


def test_keyring_roles():
    ring = KeyRing([ADMIN_KEY], [INFERENCE_KEY])
    assert ring.role_of(ADMIN_KEY) is Role.admin and ring.role_of(INFERENCE_KEY) is Role.inference
    assert ring.role_of(ADMIN_KEY[:-1]) is None and ring.role_of("") is None
    assert ring.authorize(_creds(ADMIN_KEY), Role.admin).role is Role.admin
    assert ring.authorize(_creds(INFERENCE_KEY), Role.inference).role is Role.inference
    with pytest.raises(Forbidden):
        ring.authorize(_creds(INFERENCE_KEY), Role.admin)
    for creds in (None, _creds("wrong-key-0123456789"), _creds(ADMIN_KEY, scheme="Basic")):
        with pytest.raises(Unauthorized) as info:
            ring.authorize(creds, Role.inference)
        assert info.value.headers == {"WWW-Authenticate": "Bearer"}


def test_keyring_off_without_keys():
    ring = KeyRing([], [])
    assert not ring.enabled
    principal = ring.authorize(None, Role.admin)
    assert principal.role is Role.admin and not principal.authenticated


@pytest.mark.parametrize("method,path", ADMIN_ROUTES + INFERENCE_ROUTES)
def test_missing_or_wrong_key_is_401(bert_client: TestClient, method: str, path: str):
    for headers in ({"Authorization": ""}, bearer("not-a-key-0123456789"), {"Authorization": f"Basic {ADMIN_KEY}"}):
        r = bert_client.request(method, path, headers=headers)
        assert r.status_code == 401, (path, headers)
        assert r.headers["www-authenticate"] == "Bearer" and r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("method,path", ADMIN_ROUTES)
def test_inference_key_on_admin_route_is_403(bert_client: TestClient, method: str, path: str):
    r = bert_client.request(method, path, headers=bearer(INFERENCE_KEY))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


def test_inference_key_may_infer(bert_client: TestClient):
    r = bert_client.post("/v1/embeddings", json={"model": "base", "input": "x"}, headers=bearer(INFERENCE_KEY))
    assert r.status_code == 200
    assert bert_client.get("/v1/models", headers=bearer(INFERENCE_KEY)).status_code == 200


def test_auth_is_checked_before_the_upload_is_read(bert_client: TestClient, unique: str):
    r = bert_client.put(f"/v1/adapters/{unique}", files=single_file(make_adapter(BERT_TARGETS)),
                        headers=bearer(INFERENCE_KEY))
    assert r.status_code == 403 and bert_client.get(f"/v1/adapters/{unique}").status_code == 404


def test_auth_off_warns_and_allows_everything(model_dirs, tmp_path, caplog: pytest.LogCaptureFixture):
    settings = make_settings(model_dirs["gpt2"], tmp_path, admin_keys=[], inference_keys=[], host="0.0.0.0")
    with caplog.at_level(logging.WARNING, logger="service"), TestClient(create_app(settings)) as client:
        assert client.get("/v1/state").status_code == 200
        assert client.get("/v1/adapters").status_code == 200
    assert any("AUTH IS OFF" in r.message and "0.0.0.0" in r.message for r in caplog.records)


def test_inference_keys_only_disable_admin_routes(model_dirs, tmp_path, caplog: pytest.LogCaptureFixture):
    settings = make_settings(model_dirs["gpt2"], tmp_path, admin_keys=[])
    with caplog.at_level(logging.WARNING, logger="service"), TestClient(create_app(settings)) as client:
        assert client.get("/v1/state", headers=bearer(INFERENCE_KEY)).status_code == 403
        assert client.get("/v1/state").status_code == 401
        assert client.get("/v1/models", headers=bearer(INFERENCE_KEY)).status_code == 200
    assert any("no admin key" in r.message for r in caplog.records)
