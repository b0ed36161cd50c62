"""Access control (issue 7): tokens made by `carina token`, the roles they carry, and exactly
who may read and store what through every route family, anonymous and with bad tokens."""

from __future__ import annotations

import http.client
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import requests

from tests.conftest import Server, bearer, create_token, run_cli
from tests.derived import build
from tests.factory import Phi, ct_series, to_bytes

pytestmark = pytest.mark.slow

# The collections of the module, besides `default` (restricted, where /dicomweb stores).
CREATED = {"PUB": "public", "SECRET": "restricted", "OTHER": "restricted"}
COLLECTIONS = ("default", *CREATED)
# Who may read which collection: the whole matrix of reads follows from this.
READABLE = {
    "anonymous": {"PUB"},
    "reader": {"PUB", "SECRET"},
    "other_reader": {"PUB", "OTHER"},
    "submitter": {"PUB"},
    "curator": {"PUB", "SECRET"},
    "admin": set(COLLECTIONS),
}
# STOW-RS status through each root (/dicomweb stores into default): a collection the caller
# may not see is not found (404); one it sees but may not store into is forbidden (403).
# A stored instance answers 202: de-identification coerced it (a warning, PS3.18 10.5.3).
STOW = {
    "anonymous": dict.fromkeys(COLLECTIONS, 401),
    "reader": {"default": 403, "PUB": 403, "SECRET": 403, "OTHER": 404},
    "other_reader": {"default": 403, "PUB": 403, "SECRET": 404, "OTHER": 403},
    "submitter": {"default": 403, "PUB": 403, "SECRET": 202, "OTHER": 404},
    "curator": {"default": 403, "PUB": 403, "SECRET": 403, "OTHER": 404},
    "admin": dict.fromkeys(COLLECTIONS, 202),
}
BAD = ("expired", "revoked", "malformed", "tampered", "not_bearer")
MULTIPART = 'multipart/related; type="application/dicom"; boundary=XyZ'


@dataclass(frozen=True)
class Study:
    """UIDs of one stored study and of one of its instances."""

    study: str
    series: str
    sop: str


@dataclass
class World:
    """The server, a study per collection, and an Authorization header per kind of caller."""

    server: Server
    studies: dict[str, Study]
    headers: dict[str, dict[str, str]]
    # studies stored by the STOW matrix, by collection (reads expect them too)
    stowed: dict[str, set[str]] = field(default_factory=dict)

    def root(self, collection: str | None) -> str:
        """The DICOMweb root of a collection, or /dicomweb."""
        return self.server.root(collection)

    def get(self, who: str, url: str, **kwargs: object) -> requests.Response:
        """GET url as who."""
        return requests.get(url, headers=self.headers[who], timeout=60, **kwargs)  # type: ignore[arg-type]

    def expected_studies(self, collections: set[str]) -> set[str]:
        """Every study held in collections."""
        found = {self.studies[c].study for c in collections}
        for c in collections:
            found |= self.stowed.get(c, set())
        return found


@pytest.fixture(scope="module")
def world(server_factory: Callable[..., Server]) -> World:
    # Bad tokens are sent on purpose here; the rate limit has a test of its own.
    server = server_factory(CARINA_AUTH_FAILURE_LIMIT="100000/minute")
    for name, visibility in CREATED.items():
        options = ["--option", "retain_long_modified_dates"]
        if name == "SECRET":  # keeps the SR content, so its measurements are indexed
            options += ["--option", "clean_structured_content"]
        server.create_collection(name, "--visibility", visibility, *options)
    studies = {}
    for name in COLLECTIONS:
        if name == "SECRET":
            cts, seg, sr = build(Phi())
            datasets = [*cts, seg, sr]
        else:
            datasets = ct_series(Phi(), 1, rows=16, columns=16)
        studies[name] = Study(*server.store(datasets, None if name == "default" else name))

    token = server.new_token
    revoked = token("--role", "reader", "--collection", "SECRET")
    server.cli("token", "revoke", revoked.split("_")[1])
    admin = token("--role", "admin", "--name", "root")
    headers = {
        "anonymous": {},
        "reader": bearer(token("--role", "reader", "--collection", "SECRET", "--name", "r")),
        "other_reader": bearer(token("--role", "reader", "--collection", "OTHER")),
        "submitter": bearer(token("--role", "submitter", "--collection", "SECRET")),
        "curator": bearer(token("--role", "curator", "--collection", "SECRET")),
        "admin": bearer(admin),
        "expired": bearer(
            token("--role", "reader", "--collection", "SECRET", "--expires", "2000-01-01")
        ),
        "revoked": bearer(revoked),
        "malformed": bearer("not-a-carina-token"),
        "tampered": bearer(admin[:-1] + ("A" if admin[-1] != "A" else "B")),
        "not_bearer": {"Authorization": "Basic YWRtaW46YWRtaW4="},
    }
    return World(server, studies, headers)


def _study_urls(world: World, root: str, s: Study) -> dict[str, str]:
    """Every read route of one study under root, by family."""
    study = f"{root}/studies/{s.study}"
    instance = f"{study}/series/{s.series}/instances/{s.sop}"
    return {
        "wado study": study,
        "wado series": f"{study}/series/{s.series}",
        "wado instance": instance,
        "study metadata": f"{study}/metadata",
        "series metadata": f"{study}/series/{s.series}/metadata",
        "instance metadata": f"{instance}/metadata",
        "frames": f"{instance}/frames/1",
        "bulk data": f"{instance}/bulkdata/7FE00010",
        "qido study series": f"{study}/series",
        "qido study instances": f"{study}/instances",
        "qido series instances": f"{study}/series/{s.series}/instances",
    }


def _uids(items: list[dict], tag: str = "0020000D") -> set[str]:
    return {item[tag]["Value"][0] for item in items}


@pytest.mark.parametrize("who", list(READABLE))
def test_qido_returns_and_counts_only_readable_collections(world: World, who: str) -> None:
    expected = world.expected_studies(READABLE[who])
    r = world.get(who, f"{world.server.dicomweb}/studies")
    assert _uids(r.json() if r.status_code == 200 else []) == expected
    # Not counted either: a page exactly as long as what may be read says there is no more.
    r = world.get(who, f"{world.server.dicomweb}/studies", params={"limit": len(expected)})
    assert "additional results" not in r.headers.get("Warning", "")
    for level in ("series", "instances"):
        r = world.get(who, f"{world.server.dicomweb}/{level}")
        assert _uids(r.json()) <= expected
    for c in COLLECTIONS:
        r = world.get(who, f"{world.root(c)}/studies")
        if c in READABLE[who]:
            assert r.status_code == 200
            assert _uids(r.json()) == world.expected_studies({c})
        else:
            assert r.status_code == 404, c
            assert world.studies[c].study not in r.text


@pytest.mark.parametrize("who", list(READABLE))
def test_wado_metadata_frames_and_bulk_data_only_for_those_who_may_read(
    world: World, who: str
) -> None:
    for c, s in world.studies.items():
        readable = c in READABLE[who]
        for root in (world.root(None), world.root(c)):
            for family, url in _study_urls(world, root, s).items():
                r = world.get(who, url)
                if readable:
                    assert r.status_code == 200, (c, family, r.status_code)
                    continue
                # Invisible: QIDO through /dicomweb finds nothing, every other route is 404.
                hidden = 204 if family.startswith("qido") and root == world.root(None) else 404
                assert r.status_code == hidden, (c, family, r.status_code)
                assert s.study not in r.text and s.series not in r.text


@pytest.mark.parametrize("who", list(READABLE))
@pytest.mark.parametrize("kind", ["segments", "measurements"])
def test_derived_object_search_obeys_the_same_visibility(world: World, who: str, kind: str) -> None:
    r = world.get(who, f"{world.server.url}/api/{kind}")
    assert r.status_code == 200
    rows = r.json()
    assert {row["collection"] for row in rows} <= READABLE[who]
    found = {row["study_uid"] for row in rows}
    assert (world.studies["SECRET"].study in found) == ("SECRET" in READABLE[who])


@pytest.mark.parametrize("who", [*READABLE, *BAD])
def test_stow_needs_a_submitter_or_admin_token_for_the_target_collection(
    world: World, who: str
) -> None:
    expected = STOW.get(who, dict.fromkeys(COLLECTIONS, 401))
    for c in COLLECTIONS:
        ds = ct_series(Phi(), 1, rows=8, columns=8)[0]
        body = (
            b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + to_bytes(ds) + b"\r\n--XyZ--\r\n"
        )
        r = requests.post(
            f"{world.root(None if c == 'default' else c)}/studies",
            data=body,
            headers={**world.headers[who], "Content-Type": MULTIPART},
            timeout=60,
        )
        assert r.status_code == expected[c], (c, r.status_code, r.text)
        if r.status_code == 202:
            url = r.json()["00081190"]["Value"][0]
            world.stowed.setdefault(c, set()).add(url.rsplit("/", 1)[1])
        elif r.status_code == 401:
            assert r.headers["WWW-Authenticate"].startswith('Bearer realm="carina"')
        elif r.status_code == 403:
            assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]


@pytest.mark.parametrize("who", BAD)
def test_bad_tokens_are_refused_on_every_route_even_for_public_data(world: World, who: str) -> None:
    pub = world.studies["PUB"]
    urls = [
        f"{world.server.dicomweb}/studies",
        f"{world.root('PUB')}/studies",
        f"{world.server.url}/api/segments",
        *_study_urls(world, world.root("PUB"), pub).values(),
    ]
    for url in urls:
        r = world.get(who, url)
        assert r.status_code == 401, (url, r.status_code)
        assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
        assert pub.study not in r.text


def test_token_is_shown_once_and_stored_only_as_a_hash(
    world: World, database_url: str, tmp_path: Path
) -> None:
    token = create_token(database_url, tmp_path, "--role", "reader", "--collection", "PUB")
    token_id, secret = token.split("_")[1], token.split("_", 2)[2]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT secret_hash, t::text FROM api_tokens t").fetchall()
    assert all(secret.encode() not in bytes(h) and secret not in text for h, text in rows)
    listed = run_cli(database_url, tmp_path, "token", "list")
    assert listed.returncode == 0
    assert token_id in listed.stdout and secret not in listed.stdout + listed.stderr


def test_revoked_token_is_refused_at_once(world: World, database_url: str, tmp_path: Path) -> None:
    token = create_token(database_url, tmp_path, "--role", "reader", "--collection", "SECRET")
    url = f"{world.root('SECRET')}/studies"
    assert requests.get(url, headers=bearer(token), timeout=30).status_code == 200
    assert run_cli(database_url, tmp_path, "token", "revoke", token.split("_")[1]).returncode == 0
    r = requests.get(url, headers=bearer(token), timeout=30)
    assert r.status_code == 401 and "revoked" in r.json()["error"]


@pytest.mark.parametrize(
    "args",
    [
        ("--role", "reader"),
        ("--role", "admin", "--collection", "PUB"),
        ("--role", "submitter", "--collection", "NO-SUCH"),
        ("--role", "owner", "--collection", "PUB"),
        ("--role", "reader", "--collection", "PUB", "--expires", "soon"),
        ("--role", "share"),
        ("--role", "share", "--share", "0123456789abcdef"),
        ("--role", "reader", "--collection", "PUB", "--share", "0123456789abcdef"),
    ],
)
def test_token_create_refuses_what_cannot_be_granted(
    world: World, database_url: str, tmp_path: Path, args: tuple[str, ...]
) -> None:
    done = run_cli(database_url, tmp_path, "token", "create", *args)
    assert done.returncode != 0
    assert "carina" in done.stderr and not done.stdout


# Values that must never reach SQL or the store: dot segments, encoded slashes and dots, a NUL
# byte, an over-long UID, and a valid UID with a traversal appended.
TRICKS = ["..", "%2e%2e", "..%2f..%2fetc%2fpasswd", "a%2Fb", "%00", "1" * 65, "1.2.3%2f..%2f4"]


def _templates(world: World) -> list[tuple[str, str]]:
    """(method, path) of every route, with {x} where the tricked parameter goes."""
    s = world.studies["PUB"]
    inst = f"studies/{s.study}/series/{s.series}/instances/{s.sop}"
    routes = [
        "studies/{x}",
        "studies/{x}/metadata",
        "studies/{x}/series",
        "studies/{x}/instances",
        f"studies/{{x}}/series/{s.series}",
        f"studies/{s.study}/series/{{x}}",
        f"studies/{s.study}/series/{{x}}/metadata",
        f"studies/{s.study}/series/{{x}}/instances",
        f"studies/{s.study}/series/{s.series}/instances/{{x}}",
        f"studies/{s.study}/series/{s.series}/instances/{{x}}/metadata",
        f"studies/{s.study}/series/{s.series}/instances/{{x}}/frames/1",
        f"{inst}/frames/{{x}}",
        f"{inst}/bulkdata/{{x}}",
    ]
    out = [("GET", f"/dicomweb/{r}") for r in routes]
    out += [("GET", f"/collections/PUB/dicomweb/{r}") for r in routes]
    out += [
        ("GET", "/collections/{x}/dicomweb/studies"),
        ("POST", "/collections/{x}/dicomweb/studies"),
    ]
    out += [("POST", "/dicomweb/studies/{x}")]
    return out


def test_path_tricks_in_every_path_parameter_get_a_clean_4xx(world: World) -> None:
    netloc = urlsplit(world.server.url).netloc
    seen = set()
    for method, template in _templates(world):
        for trick in TRICKS:
            path = template.replace("{x}", trick)
            # http.client sends the path as written (requests would resolve dot segments).
            conn = http.client.HTTPConnection(netloc, timeout=60)
            conn.request(
                method, path, headers={**world.headers["admin"], "Content-Type": MULTIPART}
            )
            r = conn.getresponse()
            text = r.read().decode(errors="replace")
            conn.close()
            assert 400 <= r.status < 500, (method, path, r.status, text)
            assert world.studies["PUB"].sop not in text
            seen.add(r.status)
    assert seen <= {400, 404, 405, 406}


def test_repeated_bad_tokens_from_one_client_are_rate_limited(
    server_factory: Callable[..., Server],
) -> None:
    server = server_factory(CARINA_AUTH_FAILURE_LIMIT="3/hour")
    url = f"{server.dicomweb}/studies"
    bad = bearer("carina_000000000000_" + "x" * 43)
    for _ in range(3):
        assert requests.get(url, headers=bad, timeout=30).status_code == 401
    r = requests.get(url, headers=bad, timeout=30)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    # Blocked for every token from that client, the right one too, until the window moves...
    assert requests.get(url, headers=server.auth, timeout=30).status_code == 429
    # ...while requests without a token (public data) are still answered.
    assert requests.get(url, timeout=30).status_code in (200, 204)
