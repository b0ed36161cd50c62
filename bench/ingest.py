"""Ingest, search and retrieve figures for Carina and, when installed, Orthanc, measured in the
same run on the same data over loopback.

    .venv/bin/python bench/ingest.py            # full run (N=400, S=10000)
    .venv/bin/python bench/ingest.py --quick    # smoke run (N=40, S=300)

Figures: STOW-RS ingest of N 512x512 16-bit CT instances (instances/s, MB/s); QIDO-RS study
search latency among S studies (median and p95 ms per kind of query); WADO-RS retrieve of one
series (MB/s, instances/s, best and median of R repeats). See bench/README.md."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import re
import signal
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from urllib.parse import urlencode

import requests
from servers import CarinaServer, OrthancServer, Server, ServerError, find_orthanc

REPO = Path(__file__).resolve().parent.parent
MB = 1_000_000  # figures are in decimal megabytes
BOUNDARY = f"carina-bench-{uuid.uuid4().hex}"
STOW_HEADERS = {
    "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
    "Accept": "application/dicom+json",
}
QIDO_HEADERS = {"Accept": "application/dicom+json"}
WADO_HEADERS = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
CHUNK = 1 << 20
QUERY_LIMIT = 1000  # every matching query asks for up to this many results...
LIST_LIMIT = 100  # ...and the plain listing for this many
READBACK_PAGE = 1000
WARMUP_QUERIES = 2
# One request of this many tiny instances before the ingest figure: enough to start all of
# Carina's intake workers (it starts them on demand), so the figure measures a warm server.
WARMUP_INSTANCES = 8
NAME_GROUPS = 32  # names are queried by prefixes that split them into about this many groups
DATE_WINDOW = 50  # a date range query matches about min(this, S/20) studies
REQUEST_TIMEOUT = (10.0, 600.0)  # (connect, read) seconds
# Surnames of the synthetic patients: 32 distinct 3-letter prefixes, so "SMI*" matches S/32.
# fmt: off
SURNAMES = (
    "SMITH", "JOHNSON", "WILLIAMS", "BROWN", "GARCIA", "MILLER", "DAVIS", "RODRIGUEZ",
    "MARTINEZ", "HERNANDEZ", "LOPEZ", "GONZALEZ", "FISCHER", "ANDERSON", "THOMAS", "TAYLOR",
    "MOORE", "JACKSON", "PEREZ", "NGUYEN", "KIM", "OKAFOR", "IVANOV", "SCHMIDT",
    "ROSSI", "DUBOIS", "YAMAMOTO", "CHEN", "PATEL", "EVANS", "QUINN", "ZHANG",
)
# fmt: on
GIVEN = ("ANNA", "BEN", "CARLA", "DAVID", "EMMA", "FELIX", "GRACE", "HUGO")
# Convolution kernels of the population: an attribute no server indexes in a column, kept by
# de-identification; each value is held by S/KERNELS studies.
KERNELS = 200


class BenchError(RuntimeError):
    """A server answered a benchmark request wrongly; the message names the request."""


# ---------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Body:
    """One pre-encoded STOW-RS request body."""

    data: bytes
    instances: int
    payload: int  # bytes of the Part 10 files in it (without the multipart framing)


@dataclass(frozen=True)
class Population:
    """What was planted in the QIDO population, by the original values."""

    bodies: list[Body]
    studies: int


def encode_multipart(files: list[bytes]) -> bytes:
    """A multipart/related body with one application/dicom part per file."""
    out = bytearray()
    for f in files:
        out += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        out += f
        out += b"\r\n"
    out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


def _factory() -> tuple[type, Callable[..., object], Callable[..., bytes]]:
    """(Phi, ct_instance, to_bytes) from the test factory in the repository."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.factory import Phi, ct_instance, to_bytes

    return Phi, ct_instance, to_bytes


def _split(total: int, parts: int) -> list[int]:
    """total split into `parts` nearly equal non-negative counts."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def ingest_bodies(count: int, series: int, batch: int, size: int) -> list[Body]:
    """count CT instances (size x size, 16-bit) in `series` studies of one series each,
    packed `batch` instances per request body, in order."""
    phi_cls, ct_instance, to_bytes = _factory()
    files: list[bytes] = []
    for k, n in enumerate(_split(count, series)):
        phi = phi_cls(
            patient_name=f"{SURNAMES[k % len(SURNAMES)]}^{GIVEN[k % len(GIVEN)]}",
            patient_id=f"CT-{k:04d}",
            accession=f"ACC-CT-{k:04d}",
        )
        for i in range(n):
            ds = ct_instance(phi, i + 1, rows=size, columns=size, seed=k * 100_000 + i)
            files.append(to_bytes(ds))
    return _pack(files, batch)


def warmup_body() -> Body:
    """WARMUP_INSTANCES tiny CT images of one study, sent untimed before the ingest figure."""
    phi_cls, ct_instance, to_bytes = _factory()
    phi = phi_cls(patient_name="SMITH^WARMUP", patient_id="WARMUP-0001", accession="ACC-WARM")
    files = [
        to_bytes(ct_instance(phi, i + 1, rows=16, columns=16)) for i in range(WARMUP_INSTANCES)
    ]
    return _pack(files, WARMUP_INSTANCES)[0]


def population_bodies(studies: int, batch: int) -> list[Body]:
    """One tiny (16x16) CT instance in each of `studies` studies, each its own patient, with
    study dates spread over 2000-2019 and surnames cycling through SURNAMES."""
    phi_cls, ct_instance, to_bytes = _factory()
    start = dt.date(2000, 1, 1)
    files: list[bytes] = []
    bodies: list[Body] = []
    for i in range(studies):
        day = start + dt.timedelta(days=(i * 7919) % 7305)
        phi = phi_cls(
            patient_name=f"{SURNAMES[i % len(SURNAMES)]}^{GIVEN[i % len(GIVEN)]}^{i}",
            patient_id=f"BENCH-{i:06d}",
            study_date=day.strftime("%Y%m%d"),
            accession=f"ACC{i:08d}",
        )
        ds = ct_instance(phi, 1, rows=16, columns=16, seed=i)
        ds.ConvolutionKernel = kernel(i)
        files.append(to_bytes(ds))
        if len(files) == batch:
            bodies.extend(_pack(files, batch))
            files = []
    bodies.extend(_pack(files, batch))
    return bodies


def kernel(i: int) -> str:
    """The ConvolutionKernel of the population's i-th study."""
    return f"K{i % KERNELS:03d}"


def _pack(files: list[bytes], batch: int) -> list[Body]:
    return [
        Body(encode_multipart(chunk), len(chunk), sum(len(f) for f in chunk))
        for chunk in (files[i : i + batch] for i in range(0, len(files), batch))
    ]


# ----------------------------------------------------------------------------- requests


def _session(server: Server) -> requests.Session:
    s = requests.Session()
    # Same for both servers: no gzip over loopback (Orthanc would otherwise compress JSON).
    s.headers["Accept-Encoding"] = "identity"
    s.headers.update(server.headers)
    return s


def _excerpt(r: requests.Response, limit: int = 600) -> str:
    """Status, Warning header and the start of a response body, for an error message."""
    text = r.text if len(r.content) < 100_000 else r.content[:limit].decode(errors="replace")
    text = " ".join(text.split())
    warning = r.headers.get("Warning")
    head = f"HTTP {r.status_code} {r.reason}" + (f" (Warning: {warning})" if warning else "")
    return f"{head}: {text[:limit]}" + ("..." if len(text) > limit else "")


def _failures(body: dict) -> str:
    """The failed SOP items (00081198) of a STOW-RS response, with reasons where given."""
    items = body.get("00081198", {}).get("Value", [])
    reasons = Counter(
        f"0x{_first(i, '00081197') or 0:04X} {_first(i, '00091001') or ''}".strip() for i in items
    )
    return "; ".join(f"{n}x {r}" for r, n in reasons.most_common(5))


def _first(item: dict, tag: str) -> object:
    values = item.get(tag, {}).get("Value") or [None]
    return values[0]


_INSTANCE_URL = re.compile(r"/studies/([^/]+)/series/([^/]+)/instances/([^/]+)$")


@dataclass
class StowResult:
    """Elapsed time of a STOW-RS run and the (study, series) of each stored instance."""

    seconds: float
    stored: list[tuple[str, str]] = field(default_factory=list)


def stow(server: Server, bodies: list[Body], clients: int, what: str) -> StowResult:
    """POST every body to {root}/studies over `clients` threads; fail on anything not stored."""
    url = f"{server.dicomweb}/studies"
    local = threading.local()
    sessions: list[requests.Session] = []
    lock = threading.Lock()

    def send(i: int) -> list[tuple[str, str]]:
        s = getattr(local, "session", None)
        if s is None:
            s = local.session = _session(server)
            with lock:
                sessions.append(s)
        body = bodies[i]
        where = f"{server.name}: {what}: POST {url} request {i + 1}/{len(bodies)}"
        try:
            r = s.post(url, data=body.data, headers=STOW_HEADERS, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as e:
            raise BenchError(f"{where} ({body.instances} instances) failed: {e!r}") from e
        # 202: all stored with warnings (Carina's coercion warning); failures fail below.
        if r.status_code not in (200, 202):
            detail = ""
            if r.headers.get("content-type", "").startswith("application/dicom+json"):
                with suppress(ValueError):
                    detail = f"; failures: {_failures(r.json())}"
            raise BenchError(f"{where} ({body.instances} instances) -> {_excerpt(r)}{detail}")
        items = r.json().get("00081199", {}).get("Value", [])
        if len(items) != body.instances:
            raise BenchError(
                f"{where}: {len(items)} of {body.instances} instances acknowledged -> {_excerpt(r)}"
            )
        out = []
        for item in items:
            m = _INSTANCE_URL.search(str(_first(item, "00081190")))
            if not m:
                raise BenchError(f"{where}: a stored item has no usable RetrieveURL: {item}")
            out.append((m.group(1), m.group(2)))
        return out

    pool = ThreadPoolExecutor(max_workers=clients, thread_name_prefix="stow")
    try:
        t0 = time.perf_counter()
        results = list(pool.map(send, range(len(bodies))))
        seconds = time.perf_counter() - t0
    finally:
        # On an error or Ctrl-C do not wait for requests in flight: the servers are stopped
        # next, which ends them.
        pool.shutdown(wait=False, cancel_futures=True)
        for s in sessions:
            s.close()
    return StowResult(seconds, [pair for batch in results for pair in batch])


# -------------------------------------------------------------------------------- QIDO-RS


@dataclass(frozen=True)
class StudyRow:
    """The study attributes a QIDO query is built from, as one server holds them."""

    patient_id: str
    patient_name: str
    study_date: str


def _text(item: dict, tag: str) -> str:
    v = _first(item, tag)
    if isinstance(v, dict):  # PN
        return str(v.get("Alphabetic", ""))
    return "" if v is None else str(v)


def wait_searchable(
    server: Server, session: requests.Session, expected: int, timeout: float = 900.0
) -> float:
    """Seconds until QIDO shows expected studies. Carina answers a STOW once the instances are
    stored, and publishes each series after its curation rules ran, asynchronously."""
    url = f"{server.dicomweb}/studies"
    params = {"limit": "1", "offset": str(expected - 1)}
    t0 = time.perf_counter()
    while True:
        r = session.get(url, params=params, headers=QIDO_HEADERS, timeout=REQUEST_TIMEOUT)
        if r.status_code == 200 and r.json():
            return time.perf_counter() - t0
        if r.status_code not in (200, 204):
            raise BenchError(f"{server.name}: GET {r.url} -> {_excerpt(r)}")
        if time.perf_counter() - t0 > timeout:
            raise BenchError(f"{server.name}: {expected} studies not searchable after {timeout} s")
        time.sleep(0.1)


def read_studies(server: Server, session: requests.Session, expected: int) -> list[StudyRow]:
    """Every study the server holds (paged QIDO), as PatientID, PatientName and StudyDate."""
    url = f"{server.dicomweb}/studies"
    rows: list[StudyRow] = []
    for page in range(expected // READBACK_PAGE + 2):
        params = {"limit": str(READBACK_PAGE), "offset": str(page * READBACK_PAGE)}
        r = session.get(url, params=params, headers=QIDO_HEADERS, timeout=REQUEST_TIMEOUT)
        if r.status_code == 204:
            break
        if r.status_code != 200:
            raise BenchError(f"{server.name}: GET {r.url} -> {_excerpt(r)}")
        items = r.json()
        rows.extend(
            StudyRow(_text(i, "00100020"), _text(i, "00100010"), _text(i, "00080020"))
            for i in items
        )
        if len(items) < READBACK_PAGE:
            break
    if len(rows) != expected:
        raise BenchError(
            f"{server.name}: paged GET {url}?limit={READBACK_PAGE}&offset=... returned "
            f"{len(rows)} studies, {expected} expected"
        )
    return rows


def _prefix_length(names: list[str]) -> int:
    """The shortest prefix length that splits names into at least NAME_GROUPS groups."""
    for n in range(1, 9):
        if len({x[:n] for x in names}) >= NAME_GROUPS:
            return n
    return 8


QueryKind = tuple[str, str]  # (key, description)
KINDS: tuple[QueryKind, ...] = (
    ("patient_id", "PatientID exact"),
    ("patient_name", "PatientName prefix*"),
    ("study_date", "StudyDate range"),
    ("list", f"all studies, limit={LIST_LIMIT}"),
    ("metadata", "ConvolutionKernel exact (no column)"),
)


def build_queries(
    rows: list[StudyRow], per_kind: int, seed: int
) -> dict[str, list[dict[str, str]]]:
    """Query parameters of each kind, chosen the same way from what one server holds."""
    rng = random.Random(seed)
    ids = sorted({r.patient_id for r in rows if r.patient_id})
    names = [r.patient_name.upper() for r in rows if r.patient_name]
    n = _prefix_length(names)
    prefixes = sorted({x[:n] for x in names if len(x) >= n})
    rng.shuffle(prefixes)
    dates = sorted(r.study_date for r in rows if r.study_date)
    window = max(1, min(DATE_WINDOW, len(dates) // 20))
    out: dict[str, list[dict[str, str]]] = {k: [] for k, _ in KINDS}
    for j in range(per_kind):
        out["patient_id"].append({"PatientID": rng.choice(ids), "limit": str(QUERY_LIMIT)})
        out["patient_name"].append(
            {"PatientName": prefixes[j % len(prefixes)] + "*", "limit": str(QUERY_LIMIT)}
        )
        k = rng.randrange(0, len(dates) - window + 1)
        out["study_date"].append(
            {"StudyDate": f"{dates[k]}-{dates[k + window - 1]}", "limit": str(QUERY_LIMIT)}
        )
        out["list"].append({"limit": str(LIST_LIMIT)})
        out["metadata"].append(
            {"ConvolutionKernel": kernel(rng.randrange(KERNELS)), "limit": str(QUERY_LIMIT)}
        )
    return out


def query_string(params: dict[str, str]) -> str:
    """params URL-encoded, but with `*` left as it is: Orthanc's DICOMweb plugin 1.7 matches
    the raw value, so an encoded wildcard (%2A, as requests would send it) matches nothing."""
    return urlencode(params, safe="*")


def timed_query(
    server: Server, session: requests.Session, params: dict[str, str]
) -> tuple[float, int]:
    """(seconds until the whole response is read, number of studies returned)."""
    url = f"{server.dicomweb}/studies?{query_string(params)}"
    t0 = time.perf_counter()
    r = session.get(url, headers=QIDO_HEADERS, timeout=REQUEST_TIMEOUT)
    seconds = time.perf_counter() - t0
    if r.status_code == 204:
        return seconds, 0
    if r.status_code != 200:
        raise BenchError(f"{server.name}: GET {r.url} -> {_excerpt(r)}")
    return seconds, len(r.json())


# -------------------------------------------------------------------------------- WADO-RS


def retrieve(
    server: Server, session: requests.Session, study: str, series: str
) -> tuple[float, int, int]:
    """(seconds, bytes, parts) streaming one series as multipart/related application/dicom."""
    url = f"{server.dicomweb}/studies/{study}/series/{series}"
    t0 = time.perf_counter()
    with session.get(url, headers=WADO_HEADERS, stream=True, timeout=REQUEST_TIMEOUT) as r:
        if r.status_code != 200:
            raise BenchError(f"{server.name}: GET {url} -> {_excerpt(r)}")
        ctype = r.headers.get("content-type", "")
        m = re.search(r'boundary="?([^";]+)"?', ctype)
        if not m:
            raise BenchError(f"{server.name}: GET {url}: no boundary in Content-Type {ctype!r}")
        delim = b"--" + m.group(1).encode()
        total = delimiters = 0
        tail = b""
        for chunk in r.iter_content(CHUNK):
            total += len(chunk)
            buf = tail + chunk
            delimiters += buf.count(delim)
            tail = buf[-(len(delim) - 1) :]
    seconds = time.perf_counter() - t0
    return seconds, total, max(0, delimiters - 1)  # the closing delimiter is not a part


# -------------------------------------------------------------------------------- figures


@dataclass
class Figure:
    """One row of the table: a value per server and which direction is better."""

    name: str
    unit: str
    higher_is_better: bool
    values: dict[str, float | None] = field(default_factory=dict)

    def ratio(self) -> float | None:
        """Carina relative to Orthanc, > 1 meaning Carina is better."""
        c, o = self.values.get("Carina"), self.values.get("Orthanc")
        if not c or not o:
            return None
        return c / o if self.higher_is_better else o / c


@dataclass
class Report:
    """Everything one run found."""

    facts: dict[str, object] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    matches: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dead: set[str] = field(default_factory=set)  # servers whose exit is already reported

    def figure(self, name: str, unit: str, higher_is_better: bool) -> Figure:
        """The figure called name in unit, created (empty) on first use."""
        for f in self.figures:
            if f.name == name and f.unit == unit:
                return f
        f = Figure(name, unit, higher_is_better)
        self.figures.append(f)
        return f

    def fail(self, server: Server, what: str, error: BaseException) -> None:
        """Record that `what` failed on server, with the server's log tail if it died."""
        msg = f"{server.name} failed in {what}: {error}"
        died = server.proc is not None and server.proc.poll() is not None
        if died and server.name not in self.dead:
            self.dead.add(server.name)
            msg += f"\n  {server.name} {server.exit_description()}; log:\n{server.log_tail()}"
        self.notes.append(msg)
        progress(msg)


def progress(msg: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def p95(values: list[float]) -> float:
    """The 95th percentile, nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def run_stow(
    report: Report,
    servers: list[Server],
    bodies: list[Body],
    warmup: Body,
    clients: int,
    size: int,
) -> dict[str, tuple[str, str, int]]:
    """Figure 1, after one warm-up request per server (its time is a row of its own); returns
    each server's (study, series, instances) of the series to retrieve."""
    n = sum(b.instances for b in bodies)
    payload = sum(b.payload for b in bodies)
    first = report.figure(
        f"STOW-RS first request after start ({warmup.instances} x 16x16)", "ms", False
    )
    per_s = report.figure(f"STOW-RS ingest, {n} x {size}x{size} CT", "instances/s", True)
    mb_s = report.figure("STOW-RS ingest, Part 10 bytes", "MB/s", True)
    cpu = report.figure("STOW-RS ingest, server CPU per instance", "ms", False)
    targets: dict[str, tuple[str, str, int]] = {}
    for server in servers:
        first.values[server.name] = per_s.values[server.name] = mb_s.values[server.name] = None
        cpu.values[server.name] = None
        progress(f"{server.name}: STOW-RS {n} instances in {len(bodies)} requests")
        try:
            warm = stow(server, [warmup], 1, "STOW-RS warm-up")
            first.values[server.name] = warm.seconds * 1000
            cpu_before = server.cpu_seconds()
            result = stow(server, bodies, clients, "STOW-RS ingest")
            cpu.values[server.name] = (server.cpu_seconds() - cpu_before) * 1000 / n
        except (BenchError, requests.RequestException) as e:
            report.fail(server, "STOW-RS ingest", e)
            continue
        per_s.values[server.name] = n / result.seconds
        mb_s.values[server.name] = payload / MB / result.seconds
        progress(f"{server.name}: {result.seconds:.2f} s, {n / result.seconds:.1f} inst/s")
        counts = Counter(result.stored)
        study, series = result.stored[0]
        targets[server.name] = (study, series, counts[(study, series)])
    return targets


def run_wado(
    report: Report,
    servers: list[Server],
    sessions: dict[str, requests.Session],
    targets: dict[str, tuple[str, str, int]],
    repeats: int,
) -> None:
    """Figure 3: WADO-RS series retrieve, servers interleaved, `repeats` times each."""
    counts = {t[2] for t in targets.values()}
    size = "/".join(str(c) for c in sorted(counts)) or "?"
    figs = {
        "mb_best": report.figure(f"WADO-RS series ({size} inst), best", "MB/s", True),
        "mb_median": report.figure(f"WADO-RS series ({size} inst), median", "MB/s", True),
        "inst_best": report.figure(f"WADO-RS series ({size} inst), best", "instances/s", True),
        "inst_median": report.figure(f"WADO-RS series ({size} inst), median", "instances/s", True),
    }
    samples: dict[str, list[tuple[float, int, int]]] = {s.name: [] for s in servers}
    failed: set[str] = set()
    for rep in range(repeats):
        for server in servers:
            if server.name not in targets or server.name in failed:
                continue
            study, series, expected = targets[server.name]
            try:
                seconds, nbytes, parts = retrieve(server, sessions[server.name], study, series)
                if parts != expected:
                    raise BenchError(
                        f"GET {server.dicomweb}/studies/{study}/series/{series} returned "
                        f"{parts} parts, {expected} instances were stored in that series"
                    )
            except (BenchError, requests.RequestException) as e:
                report.fail(server, "WADO-RS retrieve", e)
                failed.add(server.name)
                continue
            samples[server.name].append((seconds, nbytes, parts))
            progress(f"{server.name}: WADO-RS #{rep + 1}: {nbytes / MB / seconds:.1f} MB/s")
    for server in servers:
        got = samples[server.name]
        if not got or server.name in failed:
            for f in figs.values():
                f.values[server.name] = None
            continue
        mb = [b / MB / s for s, b, _ in got]
        inst = [p / s for s, _, p in got]
        figs["mb_best"].values[server.name] = max(mb)
        figs["mb_median"].values[server.name] = statistics.median(mb)
        figs["inst_best"].values[server.name] = max(inst)
        figs["inst_median"].values[server.name] = statistics.median(inst)


def run_qido(
    report: Report,
    servers: list[Server],
    sessions: dict[str, requests.Session],
    population: Population,
    clients: int,
    existing: int,
    queries: int,
) -> None:
    """Figure 2: populate S studies and read them all back (both timed, as their own rows),
    then time the queries."""
    s = population.studies
    fill = report.figure(f"QIDO population, {s} studies (STOW)", "s", False)
    visible = report.figure("QIDO population, STOW end to all searchable", "s", False)
    pages = report.figure(f"QIDO read all {s + existing} studies, {READBACK_PAGE}/page", "s", False)
    live: list[Server] = []
    plans: dict[str, dict[str, list[dict]]] = {}
    for server in servers:
        fill.values[server.name] = pages.values[server.name] = visible.values[server.name] = None
        progress(f"{server.name}: populating {s} studies in {len(population.bodies)} requests")
        try:
            result = stow(server, population.bodies, clients, "QIDO population")
            fill.values[server.name] = result.seconds
            progress(f"{server.name}: populated in {result.seconds:.1f} s")
            visible.values[server.name] = wait_searchable(
                server, sessions[server.name], s + existing
            )
            t0 = time.perf_counter()
            rows = read_studies(server, sessions[server.name], s + existing)
            pages.values[server.name] = time.perf_counter() - t0
        except (BenchError, requests.RequestException) as e:
            report.fail(server, "QIDO population", e)
            continue
        plans[server.name] = build_queries(rows, max(1, queries // len(KINDS)), seed=7)
        live.append(server)
    times: dict[str, dict[str, list[float]]] = {x.name: {k: [] for k, _ in KINDS} for x in live}
    hits: dict[str, dict[str, list[int]]] = {x.name: {k: [] for k, _ in KINDS} for x in live}
    failed: set[str] = set()
    for key, label in KINDS:
        progress(f"QIDO-RS: {label}")
        count = len(next(iter(plans.values()))[key]) if plans else 0
        for j in range(-WARMUP_QUERIES, count):
            for server in live:  # interleaved, so both see the same background load
                if server.name in failed:
                    continue
                params = plans[server.name][key][max(j, 0)]
                try:
                    seconds, n = timed_query(server, sessions[server.name], params)
                except (BenchError, requests.RequestException) as e:
                    report.fail(server, f"QIDO-RS {label}", e)
                    failed.add(server.name)
                    continue
                if j >= 0:
                    times[server.name][key].append(seconds * 1000)
                    hits[server.name][key].append(n)
    for key, label in KINDS:
        med = report.figure(f"QIDO {label}, median", "ms", False)
        top = report.figure(f"QIDO {label}, p95", "ms", False)
        for server in servers:
            got = times.get(server.name, {}).get(key)
            ok = bool(got) and server.name not in failed
            med.values[server.name] = statistics.median(got) if ok else None  # type: ignore[arg-type]
            top.values[server.name] = p95(got) if ok else None  # type: ignore[arg-type]
            if ok:
                h = hits[server.name][key]
                report.matches.setdefault(label, {})[server.name] = {
                    "median": statistics.median(h),
                    "min": min(h),
                    "max": max(h),
                }


# --------------------------------------------------------------------------------- output


def _cell(v: float | None) -> str:
    if v is None:
        return "FAILED"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def render(report: Report, servers: list[str]) -> str:
    """The plain-text report: header, table, QIDO match counts, notes."""
    lines = [f"{k}: {v}" for k, v in report.facts.items()]
    has_orthanc = "Orthanc" in servers
    head = ["figure", "unit", "Carina", "Orthanc" if has_orthanc else "Orthanc (absent)", "ratio"]
    rows = [head]
    for f in report.figures:
        r = f.ratio()
        rows.append(
            [
                f.name,
                f.unit + ("" if f.higher_is_better else " (lower better)"),
                _cell(f.values.get("Carina")),
                _cell(f.values.get("Orthanc")) if has_orthanc else "-",
                f"{r:.2f}" if r is not None else "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines.append("")
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("ratio = Carina/Orthanc for rates, Orthanc/Carina for times: > 1 = Carina better")
    if report.matches:
        lines.append("")
        lines.append("QIDO studies returned per query (median [min-max]):")
        for label, per in report.matches.items():
            cells = [
                f"{name} {int(m['median'])} [{int(m['min'])}-{int(m['max'])}]"
                for name, m in per.items()
            ]
            lines.append(f"  {label}: " + ", ".join(cells))
    if report.notes:
        lines.append("")
        lines.append("Notes:")
        lines.extend(f"- {n}" for n in report.notes)
    return "\n".join(lines)


def to_json(report: Report) -> str:
    """The report as JSON (figures with both values and the ratio)."""
    return json.dumps(
        {
            "facts": report.facts,
            "figures": [{**asdict(f), "ratio": f.ratio()} for f in report.figures],
            "qido_matches": report.matches,
            "notes": report.notes,
        },
        indent=2,
    )


# ----------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; --quick changes the defaults of the ones not given."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, help="N: CT instances to ingest (default 400)")
    p.add_argument("--batch", type=int, help="instances per STOW-RS request (default 50)")
    p.add_argument("--clients", type=int, help="concurrent STOW-RS clients (default 2)")
    p.add_argument("--series", type=int, default=4, help="studies N is split over (default 4)")
    p.add_argument("--size", type=int, default=512, help="rows = columns of the CT images")
    p.add_argument("--studies", type=int, help="S: studies in the QIDO population (10000)")
    p.add_argument(
        "--populate-batch",
        type=int,
        default=500,
        help="instances per request while populating (default 500)",
    )
    p.add_argument("--queries", type=int, help="timed QIDO queries, split over 4 kinds (200)")
    p.add_argument("--repeats", type=int, default=3, help="WADO-RS repeats (default 3)")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: N=40, batch 10, S=300, 40 queries"
    )
    p.add_argument("--no-orthanc", action="store_true", help="measure Carina only")
    p.add_argument(
        "--carina-log-level",
        default="warning",
        help="CARINA_LOG_LEVEL (default warning: no access log, as Orthanc logs no requests)",
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="also write the figures as JSON to PATH (default: stdout)",
    )
    a = p.parse_args(argv)
    quick = {"count": 40, "batch": 10, "clients": 2, "studies": 300, "queries": 40}
    full = {"count": 400, "batch": 50, "clients": 2, "studies": 10000, "queries": 200}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    for k in (
        "count",
        "batch",
        "clients",
        "series",
        "size",
        "studies",
        "populate_batch",
        "queries",
        "repeats",
    ):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1")
    if a.count < a.series:
        p.error("--count must be at least --series")
    return a


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table (and JSON if asked)."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # clean up servers on kill, as on Ctrl-C
    t_start = time.perf_counter()
    report = Report()
    report.facts.update(
        {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"nproc {os.cpu_count()}, {platform.machine()}, {platform.platform()}",
            "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "python": platform.python_version(),
            "parameters": (
                f"N={args.count} CT {args.size}x{args.size} 16-bit in {args.series} studies, "
                f"batch {args.batch}, clients {args.clients}; S={args.studies} studies "
                f"(populated {args.populate_batch}/request); {args.queries} queries; "
                f"WADO repeats {args.repeats}"
            ),
        }
    )
    orthanc = None if args.no_orthanc else find_orthanc()
    if orthanc is None:
        report.notes.append(
            "Orthanc column skipped: "
            + (
                "--no-orthanc given"
                if args.no_orthanc
                else "Orthanc or its DICOMweb plugin is not installed "
                "(Debian: apt-get install orthanc orthanc-dicomweb)"
            )
        )

    progress(f"generating {args.count} CT instances and {args.studies} tiny studies")
    t0 = time.perf_counter()
    ingest = ingest_bodies(args.count, args.series, args.batch, args.size)
    warmup = warmup_body()
    population = Population(population_bodies(args.studies, args.populate_batch), args.studies)
    progress(f"generated in {time.perf_counter() - t0:.1f} s")

    servers: list[Server] = []
    failed = False
    try:
        with ExitStack() as stack:
            progress("starting Carina")
            carina = stack.enter_context(CarinaServer(log_level=args.carina_log_level))
            servers.append(carina)
            report.facts["Carina"] = (
                f"{carina.version} (log level {args.carina_log_level}, default workers)"
            )
            if orthanc is not None:
                progress("starting Orthanc")
                o = stack.enter_context(OrthancServer(*orthanc))
                servers.append(o)
                report.facts["Orthanc"] = (
                    f"{o.version}, DICOMweb plugin {o.plugin_version} "
                    "(SQLite index, StorageCompression false, otherwise defaults)"
                )
            sessions = {s.name: stack.enter_context(_session(s)) for s in servers}
            targets = run_stow(report, servers, ingest, warmup, args.clients, args.size)
            del ingest
            run_qido(
                report, servers, sessions, population, args.clients, args.series + 1, args.queries
            )
            run_wado(report, servers, sessions, targets, args.repeats)
            for s in servers:
                try:
                    s.check_running()
                except ServerError as e:
                    if s.name not in report.dead:
                        report.notes.append(str(e))
    except ServerError as e:
        report.notes.append(f"server failed: {e}")
        failed = True
    except KeyboardInterrupt:
        progress("interrupted; servers stopped")
        return 130
    finally:
        for s in servers:
            report.notes.extend(s.notes)
    report.facts["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report.facts["wall time"] = f"{time.perf_counter() - t_start:.0f} s"
    print(render(report, [s.name for s in servers] if servers else ["Carina"]))
    if args.json == "-":
        print(to_json(report))
    elif args.json:
        Path(args.json).write_text(to_json(report) + "\n")
    failed = failed or any(v is None for f in report.figures for v in f.values.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
