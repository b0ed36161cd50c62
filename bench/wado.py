"""WADO-RS figures for Carina and, when installed, Orthanc, measured in the same run on the
same data over loopback.

    .venv/bin/python bench/wado.py            # full run (N=200 CT 512x512 in one series)
    .venv/bin/python bench/wado.py --quick    # smoke run (N=20)

Figures: series retrieve (MB/s, instances/s), frame retrieve (frames/s: every instance's
frame 1 as application/octet-stream) and rendered retrieve (images/s: every instance as
image/jpeg), best and median of R repeats, servers interleaved; and for each, the server's
CPU time per instance (user + system of all its processes, Carina's embedded PostgreSQL
included: servers.Server.cpu_seconds), which a loaded machine disturbs far less than the
rates. See bench/README.md."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import requests
from ingest import (
    REQUEST_TIMEOUT,
    BenchError,
    Report,
    _excerpt,
    _interrupt,
    _session,
    ingest_bodies,
    progress,
    render,
    run_stow,
    run_wado,
    warmup_body,
)
from servers import CarinaServer, OrthancServer, Server, ServerError, find_orthanc

FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"'
JPEG_MAGIC = b"\xff\xd8"


@dataclass(frozen=True)
class Kind:
    """One per-instance request kind: its figure name, unit, path and what a good answer is."""

    name: str
    unit: str
    suffix: str
    accept: str
    check: Callable[[requests.Response, int], bool]


def _frame_ok(r: requests.Response, frame_bytes: int) -> bool:
    return r.headers.get("content-type", "").startswith("multipart/related") and (
        len(r.content) >= frame_bytes
    )


def _jpeg_ok(r: requests.Response, frame_bytes: int) -> bool:
    return r.headers.get("content-type", "").startswith("image/jpeg") and r.content.startswith(
        JPEG_MAGIC
    )


KINDS = (
    Kind("WADO-RS frame 1 of each instance", "frames/s", "/frames/1", FRAME_ACCEPT, _frame_ok),
    Kind("WADO-RS rendered JPEG of each instance", "images/s", "/rendered", "image/jpeg", _jpeg_ok),
)


def cpu_figure(
    report: Report, name: str, servers: list[Server], used: dict[str, float], n: dict[str, int]
) -> None:
    """A figure of CPU milliseconds per instance from seconds used over n instances."""
    fig = report.figure(f"{name}, server CPU per instance", "ms", False)
    for server in servers:
        count = n.get(server.name)
        fig.values[server.name] = used[server.name] * 1000 / count if count else None


def wait_published(server: Server, session: requests.Session, target: tuple[str, str, int]) -> None:
    """Wait until the stored series answers QIDO-RS with all its instances: Carina judges a
    series uploaded in several requests after a quiet period, and serves it only then."""
    study, series, expected = target
    url = f"{server.dicomweb}/studies/{study}/series/{series}/instances"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        r = session.get(url, headers={"Accept": "application/dicom+json"}, timeout=REQUEST_TIMEOUT)
        if r.status_code == 200 and len(r.json()) == expected:
            return
        time.sleep(0.5)
    raise BenchError(f"{server.name}: the stored series was not published within 120 s")


def instance_urls(server: Server, session: requests.Session, study: str, series: str) -> list[str]:
    """The instance URLs of a series, from the server's own QIDO-RS answer."""
    url = f"{server.dicomweb}/studies/{study}/series/{series}/instances"
    r = session.get(url, headers={"Accept": "application/dicom+json"}, timeout=REQUEST_TIMEOUT)
    if r.status_code != 200:
        raise BenchError(f"{server.name}: GET {url} -> {_excerpt(r)}")
    sops = [item["00080018"]["Value"][0] for item in r.json()]
    return [f"{server.dicomweb}/studies/{study}/series/{series}/instances/{s}" for s in sops]


def timed_gets(
    server: Server, urls: list[str], kind: Kind, clients: int, frame_bytes: int
) -> float:
    """Seconds to GET every url + kind.suffix over `clients` threads, each answer checked."""
    local = threading.local()

    def get(url: str) -> None:
        s = getattr(local, "session", None) or _session(server)
        local.session = s
        r = s.get(url + kind.suffix, headers={"Accept": kind.accept}, timeout=REQUEST_TIMEOUT)
        if r.status_code != 200 or not kind.check(r, frame_bytes):
            raise BenchError(f"{server.name}: GET {url}{kind.suffix} -> {_excerpt(r)}")

    pool = ThreadPoolExecutor(max_workers=clients, thread_name_prefix="wado")
    try:
        t0 = time.perf_counter()
        list(pool.map(get, urls))
        return time.perf_counter() - t0
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def run_per_instance(
    report: Report,
    servers: list[Server],
    urls: dict[str, list[str]],
    clients: int,
    repeats: int,
    frame_bytes: int,
) -> None:
    """The frames/s and images/s figures: every kind, servers interleaved, `repeats` times."""
    for kind in KINDS:
        best = report.figure(f"{kind.name}, best", kind.unit, True)
        median = report.figure(f"{kind.name}, median", kind.unit, True)
        rates: dict[str, list[float]] = {s.name: [] for s in servers}
        used = {s.name: 0.0 for s in servers}
        failed: set[str] = set()
        for rep in range(repeats):
            for server in servers:
                if server.name not in urls or server.name in failed:
                    continue
                n = len(urls[server.name])
                try:
                    cpu = server.cpu_seconds()
                    seconds = timed_gets(server, urls[server.name], kind, clients, frame_bytes)
                    used[server.name] += server.cpu_seconds() - cpu
                except (BenchError, requests.RequestException) as e:
                    report.fail(server, kind.name, e)
                    failed.add(server.name)
                    continue
                rates[server.name].append(n / seconds)
                progress(f"{server.name}: {kind.name} #{rep + 1}: {n / seconds:.1f} {kind.unit}")
        for server in servers:
            got = rates[server.name]
            ok = got and server.name not in failed
            best.values[server.name] = max(got) if ok else None
            median.values[server.name] = statistics.median(got) if ok else None
        done = {s.name: len(urls[s.name]) * len(rates[s.name]) for s in servers if s.name in urls}
        cpu_figure(report, kind.name, servers, used, done)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, help="N: CT instances in the series (default 200)")
    p.add_argument("--size", type=int, default=512, help="rows = columns of the CT images")
    p.add_argument("--batch", type=int, default=25, help="instances per STOW-RS request")
    p.add_argument("--clients", type=int, default=2, help="concurrent clients (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="repeats of each figure (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: N=20")
    p.add_argument("--no-orthanc", action="store_true", help="measure Carina only")
    a = p.parse_args(argv)
    if a.count is None:
        a.count = 20 if a.quick else 200
    for k in ("count", "size", "batch", "clients", "repeats"):
        if getattr(a, k) < 1:
            p.error(f"--{k} must be at least 1")
    return a


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    t_start = time.perf_counter()
    report = Report()
    report.facts.update(
        {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"nproc {os.cpu_count()}, {platform.machine()}, {platform.platform()}",
            "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "parameters": (
                f"N={args.count} CT {args.size}x{args.size} 16-bit in one series, "
                f"clients {args.clients}, repeats {args.repeats}"
            ),
        }
    )
    orthanc = None if args.no_orthanc else find_orthanc()
    if orthanc is None:
        report.notes.append("Orthanc column skipped: not installed or --no-orthanc given")
    bodies = ingest_bodies(args.count, 1, args.batch, args.size)
    servers: list[Server] = []
    try:
        with ExitStack() as stack:
            servers.append(stack.enter_context(CarinaServer()))
            report.facts["Carina"] = servers[0].version
            if orthanc is not None:
                o = stack.enter_context(OrthancServer(*orthanc))
                servers.append(o)
                report.facts["Orthanc"] = f"{o.version}, DICOMweb plugin {o.plugin_version}"
            sessions = {s.name: stack.enter_context(_session(s)) for s in servers}
            targets = run_stow(report, servers, bodies, warmup_body(), args.clients, args.size)
            # Ingest is bench/ingest.py's subject; here it only loads the data.
            report.figures.clear()
            for s in servers:
                if s.name in targets:
                    wait_published(s, sessions[s.name], targets[s.name])
            before = {s.name: s.cpu_seconds() for s in servers}
            run_wado(report, servers, sessions, targets, args.repeats)
            used = {s.name: s.cpu_seconds() - before[s.name] for s in servers}
            retrieved = {name: t[2] * args.repeats for name, t in targets.items()}
            cpu_figure(report, "WADO-RS series retrieve", servers, used, retrieved)
            urls = {
                s.name: instance_urls(s, sessions[s.name], *targets[s.name][:2])
                for s in servers
                if s.name in targets
            }
            frame_bytes = args.size * args.size * 2
            run_per_instance(report, servers, urls, args.clients, args.repeats, frame_bytes)
            for s in servers:
                s.check_running()
    except (ServerError, BenchError) as e:
        report.notes.append(f"failed: {e}")
    except KeyboardInterrupt:
        progress("interrupted; servers stopped")
        return 130
    finally:
        for s in servers:
            report.notes.extend(s.notes)
    report.facts["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    report.facts["wall time"] = f"{time.perf_counter() - t_start:.0f} s"
    print(render(report, [s.name for s in servers] if servers else ["Carina"]))
    failed = any(v is None for f in report.figures for v in f.values.values())
    return 1 if failed or any(n.startswith("failed") for n in report.notes) else 0


if __name__ == "__main__":
    sys.exit(main())
