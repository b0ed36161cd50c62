"""De-identification cost per instance: Carina's engine against pydicom alone and the `deid`
package, on the same N identified 512x512 CT instances.

    .venv/bin/python bench/deid.py              # N=200
    .venv/bin/python bench/deid.py --count 40   # smoke run

Figures (median and p95 ms per instance, nearest rank):
  (a) pydicom read + write, bytes to bytes (the floor every figure below includes);
  (b) Carina: intake._read + Deidentifier.apply + part10.encode (its writer), bytes to bytes;
  (c) Carina's intake worker, intake.process_part: (b) plus the staged file, its SHA-256 and the
      DICOM JSON of the index;
  (f) (c) keeping the identified original too, sealed with AES-256-GCM (archive/originals.py);
  (d) deid's DicomParser with its default recipe: dcmread + parse() + dcmwrite, bytes to bytes;
  (e) the same as deid documents it, from the file to a saved file (DicomParser(path), save()).
The ratio is each figure over (b), so > 1 means Carina did better. See bench/README.md."""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# This script is named deid.py: drop its own directory from the path so that `import deid`
# finds the package, not this file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

from pydicom import dcmread  # noqa: E402
from pydicom.filewriter import dcmwrite  # noqa: E402

from carina.archive.originals import Area  # noqa: E402
from carina.curation import intake, part10  # noqa: E402
from carina.curation.deid import Deidentifier, load_profile  # noqa: E402
from carina.curation.pseudonyms import Pseudonymizer  # noqa: E402
from tests.factory import Phi, ct_instance, to_bytes  # noqa: E402

KEY = b"bench-key".ljust(32, b"k")
PROFILE = "basic"
OPTIONS = ("retain_long_modified_dates",)
PATIENTS = 4  # instances are spread over this many patients (one study each)
WARMUP = 3  # untimed runs of each figure before its timed loop


def pydicom_roundtrip(data: bytes, path: Path) -> None:
    """(a) read and write with pydicom, nothing else."""
    ds = dcmread(BytesIO(data))
    dcmwrite(BytesIO(), ds)


def carina_deid(data: bytes, path: Path) -> None:
    """(b) Carina's parse, de-identification and write, bytes to bytes."""
    ds, snapshot = intake._read(data)
    Deidentifier(load_profile(PROFILE, OPTIONS), Pseudonymizer(KEY)).apply(ds)
    intake._prepare_file_meta(ds)
    b"".join(part10.encode(ds, intake._unchanged(ds, snapshot)))


def make_intake(staging: Path, kept: Path | None = None) -> Callable[[bytes, Path], None]:
    """(c) the intake worker function, staging into `staging`; (f) with kept: keeping each
    original in that originals area."""
    ctx = intake.IntakeContext(
        collection="bench",
        key=KEY,
        profile=PROFILE,
        options=OPTIONS,
        staging_dir=str(staging),
        originals=Area(kept, KEY).sealer("bench") if kept else None,
    )

    def run(data: bytes, path: Path) -> None:
        outcome = intake.process_part(data, ctx)
        if not isinstance(outcome, intake.InstanceRecord):
            raise RuntimeError(f"intake refused a bench instance: {outcome.reason}")
        Path(outcome.staging_path).unlink()
        if outcome.original and ctx.originals:
            ctx.originals.path(outcome.original).unlink()

    return run


def make_deid(out_dir: Path) -> tuple[Callable[[bytes, Path], None], Callable[[bytes, Path], None]]:
    """(d) and (e): deid's DicomParser with its default recipe (deid.dicom)."""
    from deid.config import DeidRecipe
    from deid.dicom.parser import DicomParser
    from deid.logger import bot

    bot.level = min(bot.level, 1)  # deid logs every action otherwise
    recipe = DeidRecipe()  # no argument: deid's default recipe

    def from_bytes(data: bytes, path: Path) -> None:
        parser = DicomParser(dcmread(BytesIO(data)), recipe=recipe)
        parser.parse()
        dcmwrite(BytesIO(), parser.dicom)

    def from_file(data: bytes, path: Path) -> None:
        parser = DicomParser(str(path), recipe=recipe)
        parser.parse()
        parser.save(str(out_dir / path.name), overwrite=True)

    return from_bytes, from_file


def measure(fn: Callable[[bytes, Path], None], files: list[tuple[bytes, Path]]) -> list[float]:
    """Milliseconds per instance, one run each after a few untimed warm-up runs."""
    for data, path in files[:WARMUP]:
        fn(data, path)
    times = []
    for data, path in files:
        start = time.perf_counter()
        fn(data, path)
        times.append((time.perf_counter() - start) * 1000)
    return times


def p95(values: list[float]) -> float:
    """The 95th percentile, nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def main() -> int:
    """Generate the instances, run every figure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="instances (default 200)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns (default 512)")
    args = parser.parse_args()
    if not 1 <= args.count <= 100_000:
        parser.error("--count must be between 1 and 100000")
    logging.disable(logging.WARNING)

    phis = [Phi(patient_id=f"BENCH-{p:04d}") for p in range(PATIENTS)]
    blobs = [
        to_bytes(ct_instance(phis[i % PATIENTS], i + 1, rows=args.size, columns=args.size))
        for i in range(args.count)
    ]
    with tempfile.TemporaryDirectory(prefix="carina-bench-deid-") as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        (root / "out").mkdir()
        (root / "staging").mkdir()
        (root / "originals").mkdir()
        files = []
        for i, data in enumerate(blobs):
            path = root / "in" / f"ct{i:05d}.dcm"
            path.write_bytes(data)
            files.append((data, path))
        deid_bytes, deid_file = make_deid(root / "out")
        figures = [
            ("(a) pydicom read+write (baseline)", pydicom_roundtrip),
            ("(b) Carina parse+deid+write", carina_deid),
            ("(c) Carina intake.process_part", make_intake(root / "staging")),
            ("(f) (c) keeping the original", make_intake(root / "staging", root / "originals")),
            ("(d) deid DicomParser, bytes to bytes", deid_bytes),
            ("(e) deid DicomParser, file to file", deid_file),
        ]
        results = {name: measure(fn, files) for name, fn in figures}

    mb = statistics.mean(len(b) for b in blobs) / 1e6
    print(
        f"# {args.count} CT instances {args.size}x{args.size} 16-bit (~{mb:.2f} MB), "
        f"{PATIENTS} patients; Carina profile {PROFILE}+{','.join(OPTIONS)}"
    )
    print(
        f"# python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    carina = statistics.median(results["(b) Carina parse+deid+write"])
    print(f"{'figure':<40} {'median ms':>10} {'p95 ms':>10} {'/ (b)':>8}")
    for name, times in results.items():
        median = statistics.median(times)
        print(f"{name:<40} {median:>10.3f} {p95(times):>10.3f} {median / carina:>8.2f}")
    deid_ratio = statistics.median(results["(d) deid DicomParser, bytes to bytes"]) / carina
    print(f"# ratio (d)/(b) = {deid_ratio:.1f} (deid's time over Carina's; > 1: Carina faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
