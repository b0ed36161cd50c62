"""What the table scripts share: reading a source file of rows as PyMedPhys generated them from
the standard (``source/README.md``), checked against the digest PyMedPhys recorded, and writing
the CSV copy. Standard library only, like the scripts."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DIGEST = re.compile(r"^# content_sha256: ([0-9a-f]{64})$")


def read_rows(path: Path, parse: Callable[[str], dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a source file, each line parsed by parse ('#' lines are its header), when
    their digest (canonical JSON, sorted keys) is the content_sha256 the header records."""
    rows: list[dict[str, Any]] = []
    recorded = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            match = DIGEST.match(line)
            recorded = match.group(1) if match else recorded
            continue
        rows.append(parse(line))
    canonical = json.dumps(rows, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    if recorded is None or digest != recorded:
        raise ValueError(f"{path.name}: rows digest {digest} is not the recorded {recorded}")
    return rows


def write_csv(rows: list[dict[str, str]], path: Path, columns: Sequence[str]) -> None:
    """Write rows to path with the fixed column order and '\\n' line endings."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
