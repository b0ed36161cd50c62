"""Tests for deid_profiles: PS3.15 Table E.1-1 copy, its CSV and the deid recipes."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "deid_profiles"
SOURCE = PROFILES / "source" / "table_e1_1.txt"
TABLE = PROFILES / "table_e1_1.csv"
RECIPES = PROFILES / "recipes"

COLUMNS = [
    "tag",
    "name",
    "keyword",
    "basic",
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_long_full_dates",
    "retain_long_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
]
ACTION_COLUMNS = COLUMNS[3:]
ALLOWED = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
EXPECTED_RECIPES = {f"{column}.dicom" for column in ACTION_COLUMNS}
DEID_ACTION = {
    "D": ("REPLACE", "func:dummy"),
    "Z": ("BLANK", None),
    "X": ("REMOVE", None),
    "K": ("KEEP", None),
    "C": ("REPLACE", "func:clean"),
    "U": ("REPLACE", "func:uid"),
    "Z/D": ("REPLACE", "func:z_d"),
    "X/Z": ("REPLACE", "func:x_z"),
    "X/D": ("REPLACE", "func:x_d"),
    "X/Z/D": ("REPLACE", "func:x_z_d"),
    "X/Z/U*": ("REPLACE", "func:x_z_u"),
}


def run_script(name: str, *args: str) -> None:
    """Run a deid_profiles script with this interpreter; fail on a non-zero exit."""
    subprocess.run([sys.executable, str(PROFILES / name), *args], check=True, capture_output=True)


def read_rows() -> list[dict[str, str]]:
    """Return the committed table rows."""
    with TABLE.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    return read_rows()


@pytest.fixture(scope="module")
def by_tag(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {row["tag"]: row for row in rows}


@pytest.fixture
def quiet_deid(monkeypatch: pytest.MonkeyPatch) -> None:
    """deid logs every parsed line at its default DEBUG level; lower it for the test."""
    from deid.logger import bot

    monkeypatch.setattr(bot, "level", 1)


def test_source_is_the_2026d_table() -> None:
    lines = [line for line in SOURCE.read_text(encoding="utf-8").splitlines() if line[:1] != "#"]
    assert len(lines) == 657  # 656 tags and masks, and the "Private Attributes" row
    assert "# DICOM PS3.15 2026d Table E.1-1" in SOURCE.read_text(encoding="utf-8")


def test_table_source_is_refused_when_altered(tmp_path: Path) -> None:
    source = tmp_path / "table_e1_1.txt"
    text = SOURCE.read_text(encoding="utf-8")
    source.write_text(text.replace("(003A,0203)|0|1|X|", "(003A,0203)|0|1|K|"), encoding="utf-8")
    with pytest.raises(subprocess.CalledProcessError):
        run_script("extract_table.py", "--source", str(source), "--output", "/dev/null")


def test_table_matches_extraction(tmp_path: Path, rows: list[dict[str, str]]) -> None:
    out = tmp_path / "table.csv"
    run_script("extract_table.py", "--output", str(out))
    assert out.read_bytes() == TABLE.read_bytes()
    assert TABLE.read_text(encoding="utf-8").splitlines()[0] == ",".join(COLUMNS)
    assert len(rows) == 656


def test_safe_private_table_matches_extraction(tmp_path: Path) -> None:
    # extract_safe_private.py also checks the source rows against PyMedPhys' recorded digest.
    out = tmp_path / "safe_private.csv"
    run_script("extract_safe_private.py", "--output", str(out))
    assert out.read_bytes() == (PROFILES / "safe_private.csv").read_bytes()


def test_safe_private_source_is_refused_when_altered(tmp_path: Path) -> None:
    source = tmp_path / "table_e3_10_1.txt"
    text = (PROFILES / "source" / "table_e3_10_1.txt").read_text(encoding="utf-8")
    source.write_text(text.replace("|B Value", "|B Valve"), encoding="utf-8")
    with pytest.raises(subprocess.CalledProcessError):
        run_script("extract_safe_private.py", "--source", str(source), "--output", "/dev/null")


def test_table_sorted_and_unique(rows: list[dict[str, str]]) -> None:
    tags = [row["tag"] for row in rows]
    assert len(tags) == len(set(tags))
    numeric = [int((tag[1:5] + tag[6:10]).replace("x", "0"), 16) for tag in tags]
    assert numeric == sorted(numeric)


def test_recipes_match_build(tmp_path: Path) -> None:
    out = tmp_path / "recipes"
    run_script("build_recipes.py", "--table", str(TABLE), "--output-dir", str(out), "--no-verify")
    assert {p.name for p in out.iterdir()} == EXPECTED_RECIPES
    assert {p.name for p in RECIPES.iterdir()} == EXPECTED_RECIPES
    for path in out.iterdir():
        assert path.read_bytes() == (RECIPES / path.name).read_bytes(), path.name


@pytest.mark.parametrize("column", ACTION_COLUMNS)
def test_recipe_parses_one_action_per_row(
    column: str, rows: list[dict[str, str]], quiet_deid: None
) -> None:
    from deid.config import DeidRecipe

    path = RECIPES / f"{column}.dicom"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# DICOM PS3.15 ")
    assert "generated by build_recipes.py from table_e1_1.csv \u2014 do not edit" in text

    actions = DeidRecipe(str(path), base=False).get_actions() or []
    expected = [row for row in rows if row[column]]
    assert len(actions) == len(expected)
    for action, row in zip(actions, expected, strict=True):
        name, value = DEID_ACTION[row[column]]
        assert action["action"] == name
        assert action["field"] == row["tag"]
        assert action.get("value") == value


@pytest.mark.parametrize(
    ("tag", "keyword", "column", "code"),
    [
        ("(0010,0010)", "PatientName", "basic", "Z"),
        ("(0010,0020)", "PatientID", "basic", "Z/D"),
        ("(0020,000D)", "StudyInstanceUID", "basic", "U"),
        ("(0020,000D)", "StudyInstanceUID", "retain_uids", "K"),
        ("(0010,0030)", "PatientBirthDate", "basic", "Z"),
        ("(0008,0020)", "StudyDate", "basic", "Z"),
        ("(0008,0020)", "StudyDate", "retain_long_full_dates", "K"),
        ("(0008,0080)", "InstitutionName", "basic", "X/Z/D"),
        ("(0008,0080)", "InstitutionName", "retain_institution_identity", "K"),
        ("(0008,1120)", "ReferencedPatientSequence", "retain_uids", "K"),
        ("(50xx,xxxx)", "", "clean_graphics", "C"),
        # Rows the 2024a copy lacked: where tools working from older tables leak.
        ("(0012,0041)", "IssuerOfClinicalTrialSubjectID", "basic", "X"),
        ("(003A,0203)", "ChannelLabel", "basic", "X"),
        ("(003A,0203)", "ChannelLabel", "clean_descriptors", "C"),
        ("(0032,1033)", "RequestingService", "clean_descriptors", "C"),
    ],
)
def test_spot_checks(
    by_tag: dict[str, dict[str, str]], tag: str, keyword: str, column: str, code: str
) -> None:
    row = by_tag[tag]
    assert row["keyword"] == keyword
    assert row[column] == code


def test_action_codes_allowed(rows: list[dict[str, str]]) -> None:
    for row in rows:
        assert row["basic"] in ALLOWED, row
        for column in ACTION_COLUMNS:
            assert row[column] in ALLOWED | {""}, (row["tag"], column, row[column])
