"""OpenID Connect bearer tokens (issue 7): JWTs of a configured issuer, checked against its
JWKS, served here by a real HTTP server on loopback with RSA and EC keys made in the test.
Valid JWTs act with the roles and collections of their claims; expired, wrong-issuer,
wrong-audience, badly signed and otherwise bad ones are 401, as bad Carina tokens are."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from dicomweb_client.api import DICOMwebClient
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.conftest import Server, bearer
from tests.factory import Phi, ct_series

pytestmark = pytest.mark.slow

ISSUER = "https://idp.example.test/realms/carina"
AUDIENCE = "carina-api"


@dataclass
class Idp:
    """The identity provider's keys (by kid) and its JWKS URL."""

    keys: dict[str, tuple[str, Any]]  # kid -> (algorithm, private key)
    jwks_url: str

    def token(self, kid: str = "rsa", key: Any = None, **claims: Any) -> str:
        """A JWT signed with kid's key (or another key, under kid's header)."""
        algorithm, own = self.keys[kid]
        now = int(time.time())
        body = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "f81d4fae-7dec-11d0-a765-00a0c91e6bf6",
            "preferred_username": "alice",
            "iat": now,
            "exp": now + 300,
            "roles": ["reader"],
            "collections": ["SECRET"],
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key or own, algorithm=algorithm, headers={"kid": kid})


@pytest.fixture(scope="module")
def idp() -> Iterator[Idp]:
    keys = {
        "rsa": ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "ec": ("ES256", ec.generate_private_key(ec.SECP256R1())),
    }
    jwks = {"keys": []}
    for kid, (algorithm, key) in keys.items():
        codec = RSAAlgorithm if algorithm.startswith("RS") else ECAlgorithm
        jwk = codec.to_jwk(key.public_key(), as_dict=True)
        jwks["keys"].append({**jwk, "kid": kid, "alg": algorithm, "use": "sig"})
    body = json.dumps(jwks).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_response(200 if self.path == "/jwks" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body if self.path == "/jwks" else b"{}")

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield Idp(keys, f"http://127.0.0.1:{httpd.server_address[1]}/jwks")
    httpd.shutdown()


@dataclass
class World:
    server: Server
    study: str


@pytest.fixture(scope="module")
def world(idp: Idp, server_factory: Callable[..., Server]) -> World:
    server = server_factory(
        CARINA_OIDC_ISSUER=ISSUER,
        CARINA_OIDC_AUDIENCE=AUDIENCE,
        CARINA_OIDC_JWKS_URL=idp.jwks_url,
        CARINA_AUTH_FAILURE_LIMIT="100000/minute",
    )
    for name in ("SECRET", "OTHER"):
        server.create_collection(name)  # restricted
    study, _, _ = server.store(ct_series(Phi(), 2, rows=8, columns=8), "SECRET")
    return World(server, study)


@pytest.mark.parametrize("kid", ["rsa", "ec"], ids=["RS256", "ES256"])
def test_jwt_of_the_issuer_reads_its_collections_with_dicomweb_client(
    world: World, idp: Idp, kid: str
) -> None:
    token = idp.token(kid)
    client = DICOMwebClient(world.server.root("SECRET"), headers=bearer(token))
    assert [s["0020000D"]["Value"][0] for s in client.search_for_studies()] == [world.study]
    assert len(client.retrieve_study(world.study)) == 2
    # Another collection's reader sees nothing of SECRET; the Carina admin token still works.
    other = idp.token(kid, collections=["OTHER"])
    r = requests.get(f"{world.server.root('SECRET')}/studies", headers=bearer(other), timeout=30)
    assert r.status_code == 404 and world.study not in r.text
    assert requests.get(
        f"{world.server.root('SECRET')}/studies", headers=world.server.auth, timeout=30
    ).ok


def test_jwt_roles_grant_what_carina_roles_grant(world: World, idp: Idp) -> None:
    url = world.server.url
    curator = bearer(idp.token("ec", roles="curator"))  # a space-separated claim works too
    assert requests.get(f"{url}/api/curation/queue", headers=curator, timeout=30).ok
    reader = bearer(idp.token("rsa"))
    assert requests.get(f"{url}/api/curation/queue", headers=reader, timeout=30).status_code == 403
    admin = bearer(idp.token("rsa", roles=["admin"], collections=None))
    r = requests.get(f"{world.server.dicomweb}/studies", headers=admin, timeout=30)
    assert world.study in r.text
    # A share made with a JWT belongs to its identity.
    r = requests.post(
        f"{url}/api/shares",
        json={"name": "j", "studies": [world.study]},
        headers=reader,
        timeout=30,
    )
    assert r.status_code == 201 and r.json()["owner"] == "oidc:alice"


def _forged_key(kid: str) -> Any:
    """A key of the same kind as kid's that the issuer never published."""
    if kid == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


BAD: dict[str, Callable[[Idp], str]] = {
    "expired": lambda idp: idp.token("rsa", exp=int(time.time()) - 600, iat=int(time.time()) - 900),
    "wrong issuer": lambda idp: idp.token("ec", iss="https://evil.example.test"),
    "wrong audience": lambda idp: idp.token("rsa", aud="another-app"),
    "bad signature RS256": lambda idp: idp.token("rsa", key=_forged_key("rsa")),
    "bad signature ES256": lambda idp: idp.token("ec", key=_forged_key("ec")),
    "unknown key id": lambda idp: jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60},
        _forged_key("rsa"),
        algorithm="RS256",
        headers={"kid": "nobody"},
    ),
    "HS256 with a shared secret": lambda idp: jwt.encode(
        {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "x",
            "exp": int(time.time()) + 60,
            "roles": "admin",
        },
        "a-secret-long-enough-for-hmac-sha256-keys",
        algorithm="HS256",
        headers={"kid": "rsa"},
    ),
    "no subject": lambda idp: idp.token("rsa", sub=None),
    "no expiry": lambda idp: idp.token("ec", exp=None),
    "no Carina role": lambda idp: idp.token("rsa", roles=["viewer"]),
    "not a JWT": lambda idp: "eyJhbGciOi.not-a-jwt.at-all",
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_jwts_are_refused_with_401_even_for_public_routes(
    world: World, idp: Idp, kind: str
) -> None:
    token = BAD[kind](idp)
    for url in (f"{world.server.dicomweb}/studies", f"{world.server.url}/api/segments"):
        r = requests.get(url, headers=bearer(token), timeout=30)
        assert r.status_code == 401, (kind, url, r.status_code, r.text)
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
        assert world.study not in r.text and token not in r.text
