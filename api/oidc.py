"""OpenID Connect bearer tokens: JWTs an identity provider issued, accepted besides Carina's own
tokens when CARINA_OIDC_ISSUER is set (README, "OpenID Connect").

PyJWT checks the signature with the issuer's key from its JWKS (PyJWKClient fetches and caches
it, by the JWT's `kid`), then the issuer, the audience and the expiry (RFC 7519 4.1; OpenID
Connect Core 3.1.3.7). Only asymmetric algorithms are accepted, so a JWT signed with a shared
secret (or `none`) never passes. The roles claim names the roles (admin, curator, submitter,
reader); the collection claim the collections the roles other than admin apply to. A JWT that
grants nothing is refused like a bad token."""

from __future__ import annotations

from typing import Any

import jwt

from carina.archive.access import Grant, Principal
from carina.archive.tokens import InvalidToken
from carina.settings import Settings

# RFC 7518 3.1: RSA (PKCS#1 v1.5 and PSS) and ECDSA signatures; never HMAC or none.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
# Roles a JWT may carry (a share link is always a Carina token).
ROLES = frozenset({"admin", "curator", "submitter", "reader"})
# Seconds of clock difference with the issuer tolerated on exp, nbf and iat.
LEEWAY = 30
# Seconds the issuer's keys are cached (a key that is not in the cache is fetched at once).
JWKS_LIFESPAN = 300


class OidcVerifier:
    """Turns a bearer JWT of the configured issuer into a Principal."""

    def __init__(self, settings: Settings) -> None:
        assert settings.oidc_issuer and settings.oidc_audience and settings.oidc_jwks_url
        self.issuer = settings.oidc_issuer
        self.audience = settings.oidc_audience
        self.roles_claim = settings.oidc_roles_claim
        self.collection_claim = settings.oidc_collection_claim
        self._jwks = jwt.PyJWKClient(
            settings.oidc_jwks_url, cache_keys=True, lifespan=JWKS_LIFESPAN, timeout=10
        )

    def principal(self, token: str) -> Principal:
        """The principal of a valid JWT; InvalidToken saying why it is not one."""
        try:
            key = self._jwks.get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token,
                key,
                algorithms=ALGORITHMS,
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.PyJWKClientConnectionError:
            raise InvalidToken("the issuer's keys cannot be fetched; try again later") from None
        except (jwt.PyJWKClientError, jwt.InvalidTokenError) as e:
            raise InvalidToken(f"invalid token: {_reason(e)}") from None
        grants = self._grants(claims)
        if not grants:
            raise InvalidToken("the token grants no Carina role")
        name = claims.get("preferred_username") or claims["sub"]
        return Principal(f"oidc:{name}", None, frozenset(grants))

    def _grants(self, claims: dict[str, Any]) -> set[Grant]:
        roles = {r for r in _strings(_claim(claims, self.roles_claim)) if r in ROLES}
        collections = _strings(_claim(claims, self.collection_claim))
        grants = {Grant("admin", None)} if "admin" in roles else set()
        grants |= {Grant(r, c) for r in roles - {"admin"} for c in collections}
        return grants


def _claim(claims: dict[str, Any], path: str) -> Any:
    """A claim by name, or by a dotted path into nested objects (realm_access.roles)."""
    value: Any = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _strings(value: Any) -> list[str]:
    """A claim's values: a string (space-separated, as OAuth scopes) or a list of strings."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def _reason(e: Exception) -> str:
    """PyJWT's reason in a few words (never the token or a claim's value)."""
    return {
        jwt.InvalidIssuerError: "wrong issuer",
        jwt.InvalidAudienceError: "wrong audience",
        jwt.InvalidSignatureError: "bad signature",
        jwt.ImmatureSignatureError: "not valid yet",
        jwt.MissingRequiredClaimError: "a required claim is missing",
        jwt.InvalidAlgorithmError: "algorithm not allowed",
    }.get(type(e), "not a JWT of the configured issuer")
