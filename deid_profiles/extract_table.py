#!/usr/bin/env python3
"""Extract DICOM PS3.15 Table E.1-1 into ``table_e1_1.csv``.

Source: ``source/confidentiality_profile_attributes.json``, a verbatim copy of
``standard/confidentiality_profile_attributes.json`` from innolitics/dicom-standard
at commit 7008b61a5ccb2ddb9df4b83c9418779114ff4f56 (see ``source/README.md``).
Edition: DICOM PS3.15 2024a (inferred; the upstream file does not record the edition).

Re-run (needs pydicom for the keyword column), from the repository root::

    python deid_profiles/extract_table.py [--source PATH] [--output PATH]

Output columns: tag, name, keyword, then one column per profile/option holding the
action code exactly as in the table (D, Z, X, K, C, U, Z/D, X/Z, X/D, X/Z/D, X/Z/U*),
empty where the table cell is blank. Rows are sorted by tag.

Normalisation:
  * tags are written ``(GGGG,EEEE)`` in upper-case hex; masked digits are a
    lower-case ``x`` as in the standard, e.g. ``(50xx,xxxx)``, ``(60xx,4000)``;
  * whitespace and footnote marks are removed from action codes; any code that is
    then not one of the allowed codes is an error (nothing is guessed);
  * names have whitespace collapsed and "(see Note N)" references removed
    (source: "Icon Image Sequence\\n\\n(see Note 11)");
  * keyword is ``pydicom.datadict.keyword_for_tag`` for exact tags, empty for masks.

Skipped rows (not a plain tag or mask, so no recipe line can address them):
  * "Private Attributes", tag "(GGGG,EEEE) WHERE GGGG IS ODD": basic X,
    Retain Safe Private Option C. Private tags must be removed by the engine itself;
    the safe private attributes are listed in PS3.15 Table E.3.10-1, not in E.1-1.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

EDITION = "DICOM PS3.15 2024a"
SOURCE_REPO = "innolitics/dicom-standard"
SOURCE_PATH = "standard/confidentiality_profile_attributes.json"
SOURCE_COMMIT = "7008b61a5ccb2ddb9df4b83c9418779114ff4f56"

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE / "source" / "confidentiality_profile_attributes.json"
DEFAULT_OUTPUT = HERE / "table_e1_1.csv"

# CSV column -> key in the source JSON, in table order.
ACTION_COLUMNS: dict[str, str] = {
    "basic": "basicProfile",
    "retain_safe_private": "rtnSafePrivOpt",
    "retain_uids": "rtnUIDsOpt",
    "retain_device_identity": "rtnDevIdOpt",
    "retain_institution_identity": "rtnInstIdOpt",
    "retain_patient_characteristics": "rtnPatCharsOpt",
    "retain_long_full_dates": "rtnLongFullDatesOpt",
    "retain_long_modified_dates": "rtnLongModifDatesOpt",
    "clean_descriptors": "cleanDescOpt",
    "clean_structured_content": "cleanStructContOpt",
    "clean_graphics": "cleanGraphOpt",
}
COLUMNS: list[str] = ["tag", "name", "keyword", *ACTION_COLUMNS]
ALLOWED_CODES = frozenset({"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"})

TAG_RE = re.compile(r"\(([0-9A-Fa-fXx]{4}),([0-9A-Fa-fXx]{4})\)")
# Whitespace, digits, superscripts and dagger-style footnote marks.
FOOTNOTE_RE = re.compile(r"[\s\d\u00b9\u00b2\u00b3\u2070-\u2079\u2020\u2021]+")
NOTE_REF_RE = re.compile(r"\(\s*see\s+note\s+\d+\s*\)", re.IGNORECASE)


def normalise_tag(raw: str) -> str | None:
    """Return ``(GGGG,EEEE)`` with upper-case hex and lower-case ``x``, or None."""
    match = TAG_RE.fullmatch(raw.strip())
    if match is None:
        return None
    group, element = (part.upper().replace("X", "x") for part in match.groups())
    return f"({group},{element})"


def normalise_action(raw: str | None) -> str:
    """Return the action code without whitespace/footnote marks; '' if blank."""
    code = FOOTNOTE_RE.sub("", raw or "")
    if code and code not in ALLOWED_CODES:
        raise ValueError(f"unknown action code {raw!r}")
    return code


def normalise_name(raw: str) -> str:
    """Collapse whitespace and drop '(see Note N)' references."""
    return " ".join(NOTE_REF_RE.sub(" ", raw).split())


def keyword_for(tag: str) -> str:
    """Return the pydicom keyword for an exact tag, '' for masks or unknown tags."""
    if "x" in tag:
        return ""
    from pydicom.datadict import keyword_for_tag

    return keyword_for_tag(int(tag[1:5] + tag[6:10], 16)) or ""


def tag_sort_key(tag: str) -> tuple[int, str]:
    """Sort numerically, treating masked digits as 0."""
    return int((tag[1:5] + tag[6:10]).replace("x", "0"), 16), tag


def extract_rows(entries: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[str]]:
    """Convert source entries to CSV rows; also return descriptions of skipped rows."""
    rows: list[dict[str, str]] = []
    skipped: list[str] = []
    for entry in entries:
        tag = normalise_tag(entry["tag"])
        if tag is None:
            skipped.append(f"{entry['name']!r} {entry['tag']!r}")
            continue
        row = {"tag": tag, "name": normalise_name(entry["name"]), "keyword": keyword_for(tag)}
        for column, key in ACTION_COLUMNS.items():
            row[column] = normalise_action(entry.get(key))
        if not row["basic"]:
            raise ValueError(f"{tag} has no Basic Profile action")
        rows.append(row)
    tags = [row["tag"] for row in rows]
    if len(tags) != len(set(tags)):
        raise ValueError("duplicate tags in source")
    rows.sort(key=lambda row: tag_sort_key(row["tag"]))
    return rows, skipped


def write_csv(rows: list[dict[str, str]], path: Path) -> None:
    """Write rows to ``path`` with the fixed column order and '\\n' line endings."""
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)

    entries = json.loads(args.source.read_text(encoding="utf-8"))
    rows, skipped = extract_rows(entries)
    write_csv(rows, args.output)
    print(f"{args.output}: {len(rows)} rows ({EDITION})", file=sys.stderr)
    for item in skipped:
        print(f"skipped (not a tag or mask): {item}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
