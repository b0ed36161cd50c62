"""A submitter's pseudonym mapping file: original PatientID -> research PatientID (and name).

CSV with a header row naming the columns `original_id`, `research_id` and, optionally,
`research_name`, one subject per row, as TCIA sites send them. Each original ID is turned into
its keyed digest at once (curation/pseudonyms.py); errors name line numbers, never a value
from the file, so no original ID reaches a terminal or a log."""

from __future__ import annotations

import csv
import io
import re

from carina.archive.mappings import Subject

from .errors import CurationError
from .pseudonyms import Pseudonymizer

COLUMNS = ("original_id", "research_id", "research_name")
# PS3.5 6.2: LO and each PN component group hold at most 64 characters, no backslash (the value
# delimiter) and no control characters.
_BAD_CHARS = re.compile(r"[\\\x00-\x1f\x7f]")
_MAX = 64


class MappingFileError(CurationError):
    """A pseudonym mapping file that cannot be loaded; says where, never what."""


def read_mapping_file(data: bytes, pseudo: Pseudonymizer) -> dict[bytes, Subject]:
    """The subjects of a mapping file keyed by the digest of their original PatientID."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MappingFileError("the mapping file is not UTF-8 text") from e
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip().lower() for h in reader.fieldnames or []]
    if not {"original_id", "research_id"} <= set(header) or not set(header) <= set(COLUMNS):
        raise MappingFileError(
            "the first line must name the columns original_id,research_id[,research_name]"
        )
    reader.fieldnames = header
    subjects: dict[bytes, Subject] = {}
    first_line: dict[bytes, int] = {}
    research_lines: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        subject = _subject(row, line)
        original = (row.get("original_id") or "").strip()
        if not original:
            raise MappingFileError(f"line {line}: original_id is empty")
        digest = pseudo.subject_digest(original)
        if digest in subjects:
            raise MappingFileError(
                f"line {line}: the same original_id as line {first_line[digest]}"
            )
        if subject.research_id in research_lines:
            raise MappingFileError(
                f"line {line}: the same research_id as line {research_lines[subject.research_id]}"
            )
        subjects[digest] = subject
        first_line[digest] = line
        research_lines[subject.research_id] = line
    if not subjects:
        raise MappingFileError("the mapping file has no subjects")
    return subjects


def _subject(row: dict[str, str | None], line: int) -> Subject:
    """The research identity of one row, valid as PatientID (LO) and PatientName (PN)."""
    if None in row:  # csv puts the cells beyond the header under the key None
        raise MappingFileError(f"line {line}: more cells than columns")
    research_id = (row.get("research_id") or "").strip()
    research_name = (row.get("research_name") or "").strip() or None
    if not research_id:
        raise MappingFileError(f"line {line}: research_id is empty")
    if len(research_id) > _MAX or _BAD_CHARS.search(research_id):
        raise MappingFileError(
            f"line {line}: research_id is not a valid PatientID (LO: at most 64 characters, "
            "no backslash or control characters)"
        )
    if research_name is not None and (
        any(len(group) > _MAX for group in research_name.split("="))
        or _BAD_CHARS.search(research_name)
    ):
        raise MappingFileError(
            f"line {line}: research_name is not a valid PatientName (PN: at most 64 characters "
            "per component group, no backslash or control characters)"
        )
    return Subject(research_id, research_name)
