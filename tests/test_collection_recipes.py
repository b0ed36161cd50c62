"""A collection's own recipe lines: validated when set, applied after its PS3.15 profile."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import Jsonb
from pydicom import DataElement

from carina.curation.deid import load_profile, parse_recipe_lines
from carina.curation.errors import ProfileError
from tests.conftest import Server, run_cli
from tests.factory import Phi, ct_instance
from tests.test_deid_table import _deidentify, _minimal
from tests.test_mapping import stow

SAFE = ("retain_safe_private",)


@pytest.mark.parametrize(
    ("line", "options", "reason"),
    [
        ("RENAME StationName X", (), "unknown action 'RENAME'"),
        ("REPLACE", (), "not ACTION FIELD [VALUE]"),
        ("KEEP NoSuchAttribute", (), "neither a tag nor a DICOM keyword"),
        ("KEEP PatientBirthDate", (), "identifies the patient"),
        ("KEEP OtherPatientIDsSequence", (), "identifies the patient"),
        ("REPLACE PatientName ANON", (), "Carina's pseudonyms"),
        ("KEEP StudyInstanceUID", (), "use the retain_uids option"),
        ("REPLACE StationName " + "S" * 17, (), "not a valid SH"),
        ("REPLACE StudyDate 2024-01-17", (), "not a valid DA"),
        ("REPLACE PixelData X", (), "needs a text VR"),
        ("REPLACE StationName", (), "needs a value"),
        ("BLANK StationName X", (), "takes no value"),
        ("REPLACE StationName func:nothing", (), "unknown recipe function"),
        ('KEEP (0029,"ACME PRIVATE",20)', (), "needs the retain_safe_private option"),
        ('REMOVE (0029,"ACME PRIVATE",20)', SAFE, "can only be kept"),
        ("KEEP (0029,1020)", SAFE, "name a private attribute as"),
    ],
)
def test_bad_line_is_refused_with_its_number_and_reason(
    line: str, options: tuple[str, ...], reason: str
) -> None:
    with pytest.raises(ProfileError) as refused:
        parse_recipe_lines(["# site lines", "KEEP SeriesDescription", line], options)
    assert str(refused.value).startswith("recipe line 3: ")
    assert reason in str(refused.value)


def test_lines_apply_after_the_profile() -> None:
    ds = _minimal()
    ds.StationName = "CT-ROOM-7"  # Basic Profile X/Z/D
    ds.SeriesDescription = "AXIAL 1mm"  # Basic Profile X
    ds.ImageComments = "seen by Dr Houseman"  # Basic Profile X, no line about it
    lines = ("REPLACE StationName CARINA", "KEEP SeriesDescription")
    _deidentify(ds, load_profile("basic", (), lines))
    assert ds.StationName == "CARINA"
    assert ds.SeriesDescription == "AXIAL 1mm"
    assert "ImageComments" not in ds
    # The object says it was not de-identified by the profile alone.
    assert list(ds.DeidentificationMethod) == [
        "Carina PS3.15 basic",
        "and 2 collection recipe lines",
    ]


def test_collection_keeps_its_own_private_attribute_and_only_that() -> None:
    ds = _minimal()
    block = ds.private_block(0x0029, "ACME PRIVATE", create=True)
    block.add_new(0x10, "LO", "SMITHERSON^JOHANNA")
    block.add_new(0x20, "DS", "42.5")
    line = ('KEEP (0029,"ACME PRIVATE",20)',)
    _deidentify(ds, load_profile("basic", SAFE, line))
    assert [e.tag for e in ds if e.tag.is_private] == [0x00290010, 0x00291020]
    assert ds[0x00291020].value == "42.5"
    # Without the line the same block goes entirely: ACME is on no safe list.
    again = _minimal()
    again[0x00290010] = DataElement(0x00290010, "LO", "ACME PRIVATE")
    again[0x00291020] = DataElement(0x00291020, "DS", "42.5")
    _deidentify(again, load_profile("basic", SAFE))
    assert [e.tag for e in again if e.tag.is_private] == []


@pytest.mark.slow
def test_cli_sets_lines_that_intake_applies(server: Server) -> None:
    server.create_collection("SITELINES", "--option", "retain_safe_private")
    lines = (
        "REPLACE StationName CARINA",
        "KEEP SeriesDescription",
        'KEEP (0029,"ACME PRIVATE",20)',
    )
    server.cli(
        *("collection", "recipe", "SITELINES", *[a for line in lines for a in ("--line", line)]),
        CARINA_SECRET_KEY=server.secret_key,
    )
    phi = Phi(patient_id="MRN-LINES-1")
    ds = ct_instance(phi, 1, rows=16, columns=16)
    ds.StationName = "CT-ROOM-7"
    ds.private_block(0x0029, "ACME PRIVATE").add_new(0x20, "DS", "42.5")
    root = server.url + "/collections/SITELINES/dicomweb"
    assert stow(server, root, ds).status_code == 202  # stored, coerced
    [study] = server.http.get(root + "/studies", timeout=30).json()
    [meta] = server.http.get(
        root + f"/studies/{study['0020000D']['Value'][0]}/metadata", timeout=30
    ).json()
    assert meta["00081010"]["Value"] == ["CARINA"]
    assert meta["0008103E"]["Value"] == ["AXIAL 1mm"]
    assert meta["00291020"]["Value"] == [42.5]
    assert "00291010" not in meta  # the vendor block's patient name: not on the list


@pytest.mark.slow
def test_cli_refuses_a_bad_line_and_keeps_the_lines_it_had(
    server: Server, database_url: str, tmp_path: Path
) -> None:
    assert run_cli(database_url, tmp_path, "collection", "create", "BADLINES").returncode == 0
    good = run_cli(
        database_url, tmp_path, "collection", "recipe", "BADLINES", "--line", "KEEP StudyID"
    )
    assert good.returncode == 0, good.stderr
    (tmp_path / "lines.dicom").write_text("# ours\nKEEP SeriesDescription\nKEEP PatientBirthDate\n")
    bad = run_cli(
        database_url,
        tmp_path,
        "collection",
        "recipe",
        "BADLINES",
        "--file",
        str(tmp_path / "lines.dicom"),
    )
    assert bad.returncode == 1
    assert "recipe line 3: PatientBirthDate identifies the patient" in bad.stderr
    listed = run_cli(database_url, tmp_path, "collection", "list")
    assert "BADLINES" in listed.stdout
    from carina.archive import collections, db

    with db.open_pool(database_url, max_size=1) as pool:
        assert collections.get(pool, "BADLINES").deid_lines == ["KEEP StudyID"]


@pytest.mark.slow
def test_stow_to_a_collection_whose_stored_lines_no_longer_compile_is_503_with_why(
    server: Server, database_url: str, tmp_path: Path
) -> None:
    assert run_cli(database_url, tmp_path, "collection", "create", "BROKEN").returncode == 0
    # Written behind the CLI's back, as an old release or a hand edit could have left it.
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE collections SET deid_lines = %s WHERE name = 'BROKEN'",
            (Jsonb(["KEEP NoSuchAttribute"]),),
        )
    answer = stow(
        server, server.url + "/collections/BROKEN/dicomweb", ct_instance(Phi(), 1, rows=16)
    )
    assert answer.status_code == 503
    assert "recipe line 1" in answer.json()["error"]
