"""``auth``: the key store (hashing, lookup, keys files and their problems as config problems) and
the middleware in process (401/403, credential headers removed, identity in ctx, models listing)."""

from __future__ import annotations

import hashlib
import json
import random
import textwrap
from pathlib import Path

import orjson
import pytest

from middleware.api_keys import ApiKeyConfig, KeyStore, load_keys_file
from middleware.auth import Auth, AuthConfig, credential
from proxy.clock import FakeClock
from proxy.config_loader import ConfigError, load_config_text
from proxy.errors import InvalidApiKey, ModelNotAllowed, ModelNotFound
from proxy.http import Headers, Request, RequestContext, Response
from proxy.identity import Identity, KeyLimits, identity_of
from proxy.registry import BuildContext

MINIMAL = """\
upstreams:
  mock: {url: "http://127.0.0.1:8001"}
routes:
  - model: demo-model
    targets: [{upstream: mock, model: m}]
  - model: other-model
    targets: [{upstream: mock, model: m}]
"""


def sha256(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def auth_config(middleware_yaml: str) -> AuthConfig:
    config = load_config_text(MINIMAL + textwrap.dedent(middleware_yaml), "config.yaml", {})
    cfg = config.middleware[0].config
    assert isinstance(cfg, AuthConfig)
    return cfg


def problems(middleware_yaml: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(MINIMAL + textwrap.dedent(middleware_yaml), "config.yaml", {})
    return info.value.problems


# -- the key store ----------------------------------------------------------------------------------


def test_plain_and_sha256_keys_both_match_and_nothing_else_does() -> None:
    store = KeyStore(
        [
            ApiKeyConfig(id="plain", key="sk-plain", tenant="acme"),
            ApiKeyConfig(id="hashed", key=sha256("sk-hashed"), models=("demo-model",)),
        ]
    )
    plain, hashed = store.lookup(b"sk-plain"), store.lookup(b"sk-hashed")
    assert plain is not None and (plain.key_id, plain.tenant, plain.models) == ("plain", "acme", None)
    assert hashed is not None and (hashed.key_id, hashed.tenant) == ("hashed", "hashed")  # tenant: the id
    assert hashed.models == frozenset({"demo-model"})
    for wrong in (b"sk-plai", b"sk-plainx", b"", sha256("sk-hashed").encode(), b"SK-PLAIN"):
        assert store.lookup(wrong) is None


def test_a_key_never_shows_in_a_repr() -> None:
    entry = ApiKeyConfig(id="a", key="sk-secret-value")
    assert "sk-secret-value" not in repr(entry) and "sk-secret-value" not in repr(AuthConfig(keys=(entry,)))


def test_credentials_from_bearer_or_api_key_headers() -> None:
    assert credential(Headers([(b"authorization", b"Bearer sk-1")])) == b"sk-1"
    assert credential(Headers([(b"authorization", b"bearer   sk-1 ")])) == b"sk-1"
    assert credential(Headers([(b"api-key", b" sk-2 ")])) == b"sk-2"
    assert credential(Headers([(b"api-key", b"sk-2"), (b"authorization", b"Bearer sk-1")])) == b"sk-1"
    assert credential(Headers([(b"authorization", b"Basic dXNlcg==")])) is None
    assert credential(Headers([(b"authorization", b"Bearer ")])) is None
    assert credential(Headers()) is None


def test_keys_load_from_yaml_and_json_files(tmp_path: Path) -> None:
    yaml_file = tmp_path / "keys.yaml"
    yaml_file.write_text(
        "keys:\n"
        "  - {id: a, key: sk-a, tenant: t, models: [demo-model], limits: {requests_per_minute: 5}}\n"
        "  - {id: b, key: sk-b, metadata: {team: search}}\n"
    )
    json_file = tmp_path / "keys.json"
    json_file.write_text(json.dumps({"keys": [{"id": "c", "key": sha256("sk-c")}]}))
    cfg = auth_config(f"middleware:\n  - {{type: auth, keys_file: {yaml_file}}}\n")
    assert [k.id for k in cfg.all_keys()] == ["a", "b"]
    a, b = cfg.all_keys()
    assert a.limits == KeyLimits(requests_per_minute=5) and b.metadata == {"team": "search"}
    keys, found = load_keys_file(str(json_file))
    assert found == [] and [k.id for k in keys] == ["c"]


def test_keys_file_problems_stop_the_start_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "keys.yaml"
    bad.write_text("keys:\n  - {id: a, key: sk-a}\n  - {id: b, modles: [x]}\n")
    found = problems(f"middleware:\n  - {{type: auth, keys_file: {bad}}}\n")
    assert any(f"{bad}:3: keys[1].key: required" in p for p in found), found
    assert any(f"{bad}:3: keys[1].modles: unknown key 'modles' (did you mean 'models'?)" in p for p in found)
    assert all(p.startswith("config.yaml:9: middleware[0].keys_file: ") for p in found), found


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read: No such file or directory"),
        ("keys: [unclosed\n", "not valid YAML or JSON"),
        ("- {id: a, key: b}\n", "must be a mapping with a 'keys:' list"),
        ("keys: []\n", "keys: must not be empty"),
    ],
)
def test_unreadable_keys_files_are_config_problems(
    tmp_path: Path, content: str | None, expected: str
) -> None:
    path = tmp_path / "keys.yaml"
    if content is not None:
        path.write_text(content)
    found = problems(f"middleware:\n  - {{type: auth, keys_file: {path}}}\n")
    assert len(found) == 1 and expected in found[0], found


def test_inline_key_problems() -> None:
    found = problems(
        """\
        middleware:
          - type: auth
            keys:
              - {id: x, key: "sha256:abc"}
              - {id: y, key: sk-y, limits: {requests_per_minute: 0}}
        """
    )
    assert found == [
        "config.yaml:11: middleware[0].keys[0].key: after 'sha256:' must come 64 hex digits "
        "(sha256sum of the key)",
        "config.yaml:12: middleware[0].keys[1].limits.requests_per_minute: must be an integer ≥ 1",
    ]
    assert problems("middleware:\n  - {type: auth}\n") == [
        "config.yaml:9: middleware[0].keys: give at least one key (here or in keys_file)"
    ]


def test_the_same_id_or_key_twice_is_a_problem(tmp_path: Path) -> None:
    other = tmp_path / "keys.yaml"
    other.write_text("keys:\n  - {id: a, key: sk-2}\n  - {id: c, key: sk-3}\n")
    found = problems(
        f"""\
        middleware:
          - type: auth
            keys_file: {other}
            keys: [{{id: a, key: sk-1}}, {{id: b, key: "{sha256("sk-3")}"}}]
        """
    )
    where = f"config.yaml:10: middleware[0].keys_file: {other}"
    assert found == [
        f"{where}: keys[0].id: duplicate key id 'a' (first in keys[0])",
        f"{where}: keys[1].key: the same key as keys[1]",
    ]


# -- the middleware in process ----------------------------------------------------------------------


def make_request(
    headers: list[tuple[bytes, bytes]], body: object = None, path: str = "/v1/chat/completions"
) -> Request:
    raw = b"" if body is None else orjson.dumps(body)
    method = "POST" if body is not None else "GET"
    ctx = RequestContext(b"rid-1", "127.0.0.1:1", 0.0)
    return Request(
        method, path.encode(), Headers([(b"content-type", b"application/json"), *headers]), raw, ctx
    )


class Upstream:
    """The rest of the chain: records what it was given."""

    def __init__(self, response: Response | None = None) -> None:
        self.seen: list[Request] = []
        self.response = response or Response.json(200, {"ok": True})

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        return self.response


@pytest.fixture
def auth() -> Auth:
    config = AuthConfig(
        keys=(
            ApiKeyConfig(id="all", key="sk-all", tenant="acme", metadata={"team": "x"}),
            ApiKeyConfig(
                id="one", key=sha256("sk-one"), models=("demo-model",), limits=KeyLimits(max_in_flight=2)
            ),
        )
    )
    context = BuildContext(FakeClock(), random.Random(1), ("demo-model", "other-model"))
    return Auth(config, context)


async def test_a_valid_key_passes_without_its_credential_and_with_its_identity(auth: Auth) -> None:
    upstream = Upstream()
    request = make_request(
        [(b"authorization", b"Bearer sk-all"), (b"api-key", b"sk-all"), (b"x-keep", b"1")],
        {"model": "other-model"},
    )
    await auth(request, upstream)
    [seen] = upstream.seen
    assert [k for k, _ in seen.headers] == [b"content-type", b"x-keep"]
    assert (seen.ctx.identity, seen.ctx.tenant) == ("all", "acme")
    identity = identity_of(seen)
    assert isinstance(identity, Identity) and identity.metadata == {"team": "x"}


@pytest.mark.parametrize("headers", [[], [(b"authorization", b"Bearer sk-nope")], [(b"api-key", b"sk-al")]])
async def test_no_key_or_a_wrong_key_is_401(auth: Auth, headers: list[tuple[bytes, bytes]]) -> None:
    upstream = Upstream()
    with pytest.raises(InvalidApiKey) as info:
        await auth(make_request(headers, {"model": "demo-model"}), upstream)
    assert (info.value.status, info.value.code, info.value.type) == (
        401,
        "invalid_api_key",
        "invalid_request_error",
    )
    assert "sk-" not in info.value.message and upstream.seen == []


async def test_a_model_the_key_may_not_use_is_403(auth: Auth) -> None:
    key = [(b"api-key", b"sk-one")]
    await auth(make_request(key, {"model": "demo-model"}), Upstream())
    for body, path in (({"model": "other-model"}, "/v1/chat/completions"), ({"purpose": "x"}, "/v1/files")):
        with pytest.raises(ModelNotAllowed) as info:
            await auth(make_request(key, body, path), Upstream())
        assert (info.value.status, info.value.code) == (403, "model_not_allowed")


async def test_the_models_listing_shows_only_the_keys_models(auth: Auth) -> None:
    listing = {"object": "list", "data": [{"id": "demo-model"}, {"id": "other-model"}]}
    upstream = Upstream(Response.json(200, listing))
    response = await auth(make_request([(b"api-key", b"sk-one")], path="/v1/models"), upstream)
    assert isinstance(response.body, bytes)
    assert orjson.loads(response.body)["data"] == [{"id": "demo-model"}]
    unfiltered = await auth(
        make_request([(b"api-key", b"sk-all")], path="/v1/models"), Upstream(Response.json(200, listing))
    )
    assert isinstance(unfiltered.body, bytes) and len(orjson.loads(unfiltered.body)["data"]) == 2
    with pytest.raises(ModelNotFound):
        await auth(make_request([(b"api-key", b"sk-one")], path="/v1/models/other-model"), Upstream())


async def test_retry_ahead_of_auth_leaves_each_401_with_its_own_headers(auth: Auth) -> None:
    """Retry appends x-retry-attempts to an error's headers: each error owns them, so the 401s
    stay alike and nothing auth hands out grows from one request to the next."""
    from middleware import auth as auth_module
    from middleware.retry import Retry, RetryConfig
    from proxy.chain import compose

    challenge_before = list(auth_module._CHALLENGE)
    retry = Retry(RetryConfig(), BuildContext(FakeClock(), random.Random(1), ("demo-model",)))
    handler = compose([retry, auth], Upstream())
    for headers in ([], [(b"api-key", b"sk-nope")], []):
        with pytest.raises(InvalidApiKey) as info:
            await handler(make_request(headers, {"model": "demo-model"}))
        assert info.value.headers == [
            (b"www-authenticate", b'Bearer realm="llm-sidecar"'),
            (b"x-retry-attempts", b"0"),
        ]
    assert list(auth_module._CHALLENGE) == challenge_before


def test_an_error_owns_its_headers() -> None:
    given = [(b"retry-after", b"1")]
    err = InvalidApiKey("no", headers=given)
    err.headers.append((b"x-more", b"1"))
    assert given == [(b"retry-after", b"1")]
    assert InvalidApiKey("no", headers=given).headers == [(b"retry-after", b"1")]
