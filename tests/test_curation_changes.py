"""Curators' pixel redactions and attribute edits over the REST routes of a real server: the
stored objects and their index rows rewritten, recorded and audited, seen after release over
QIDO and WADO-RS (dicomweb-client), and the 4xx for what cannot apply, which changes nothing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import psycopg
import pytest
import requests
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from carina.curation import edits, redaction, rewrite
from tests.conftest import Server, run_cli
from tests.factory import TEXT_REGION, Phi, burned_in_series, ct_series, text_series

pytestmark = pytest.mark.slow
SIGNED_16_MIN = -32768  # the fill of CT's signed 16-bit pixels: the minimum of the stored range


def api(server: Server, path: str) -> str:
    return f"{server.url}/api/curation{path}"


def post(server: Server, series: str, change: str, **body: object) -> requests.Response:
    return server.http.post(api(server, f"/series/{series}/{change}"), json=body, timeout=60)


def rows(server: Server, series: str) -> dict[str, tuple]:
    """SOP UID -> (object key, size, sha256, transfer syntax) as indexed."""
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        found = conn.execute(
            "SELECT sop_uid, object_key, size, sha256, transfer_syntax_uid FROM instances"
            " WHERE series_uid = %s",
            (series,),
        ).fetchall()
    return {r[0]: tuple(r[1:]) for r in found}


def stored_copies(server: Server, indexed: dict[str, tuple]) -> dict[str, Dataset]:
    """SOP UID -> the stored (de-identified) object as it is now, read from the store."""
    return {sop: dcmread(server.data_dir / "objects" / key) for sop, (key, *_) in indexed.items()}


def by_number(datasets: list[Dataset]) -> dict[int, Dataset]:
    return {int(ds.InstanceNumber): ds for ds in datasets}


def store(server: Server, datasets: list[Dataset]) -> tuple[str, str]:
    study, series, _ = server.store(datasets)
    return study, series


def release(server: Server, series: str) -> None:
    r = post(server, series, "release", reason="redacted")
    assert r.status_code == 200, r.text


def region_mask(shape: tuple[int, ...], x: int, y: int, width: int, height: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y : y + height, x : x + width] = True
    return mask


TEXT = {"x": TEXT_REGION[1], "y": TEXT_REGION[0], "width": TEXT_REGION[3], "height": TEXT_REGION[2]}


def test_redaction_blanks_the_region_and_leaves_the_rest_as_it_was(server: Server) -> None:
    sent = text_series(3)
    study, series = store(server, sent)
    before = rows(server, series)
    unredacted = stored_copies(server, before)
    r = post(server, series, "redact", reason="name burned in", rectangles=[TEXT])
    assert r.status_code == 200, r.text
    assert r.json() == {"series_uid": series, "redacted": 3}
    after = rows(server, series)
    # New objects under new keys, their index rows updated (fsck re-hashes them all).
    assert all(after[s][0] != before[s][0] and after[s][2] != before[s][2] for s in before)
    assert not (server.data_dir / "objects" / before[next(iter(before))][0]).exists()
    done = run_cli(server.database_url, server.data_dir.parent, "fsck", "--checksums")  # type: ignore[arg-type]
    assert done.returncode == 0 and "wrong" not in done.stdout, done.stdout + done.stderr

    release(server, series)
    got = by_number(server.client().retrieve_series(study, series))
    mask = region_mask((64, 64), **TEXT)
    for number, original in by_number(sent).items():
        pixels = got[number].pixel_array
        assert (pixels[mask] == SIGNED_16_MIN).all()
        assert (pixels[~mask] == original.pixel_array[~mask]).all()
        assert got[number].BurnedInAnnotation == "NO"
        codes = {c.CodeValue for c in got[number].DeidentificationMethodCodeSequence}
        assert "113101" in codes  # CID 7050 Clean Pixel Data Option
    # The metadata (from the index) says so too, and the audit and record name the redaction.
    metadata = server.client().retrieve_series_metadata(study, series)
    assert {m["00280301"]["Value"][0] for m in metadata} == {"NO"}
    audit = server.http.get(api(server, f"/series/{series}"), timeout=30).json()["audit"]
    [redact] = [a for a in audit if a["action"] == "redact"]
    assert redact["reason"] == "name burned in" and redact["after"]["rectangles"] == [TEXT]
    assert redact["after"]["frames"] == "all" and len(redact["after"]["instances"]) == 3
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        recorded = conn.execute(
            "SELECT count(*), min(actor) FROM pixel_redactions WHERE series_uid = %s", (series,)
        ).fetchone()
    assert recorded is not None and recorded[0] == 3 and recorded[1].startswith("tests (token")
    # What is recorded, applied again to the instances as de-identified, gives what is served
    # (as a reprocess from the originals would).
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        again = redaction.recorded(conn, series)
    for ds in unredacted.values():
        assert rewrite.reapply(ds, again, redaction.redact_dataset)
        assert ds.PixelData == got[int(ds.InstanceNumber)].PixelData


def test_redacting_a_compressed_instance_stores_it_explicit_vr_little_endian(
    server: Server,
) -> None:
    sent = text_series(2)
    for ds in sent:
        ds.compress(RLELossless, generate_instance_uid=False)
    study, series = store(server, sent)
    indexed = rows(server, series)
    assert {v[3] for v in indexed.values()} == {RLELossless}
    first = min(indexed, key=lambda s: s)  # any one of them
    rect = {"x": 0, "y": 0, "width": 64, "height": 2}
    r = post(server, series, "redact", reason="r", rectangles=[rect, TEXT], instances=[first])
    assert r.status_code == 200 and r.json()["redacted"] == 1, r.text
    now = rows(server, series)
    assert now[first][3] == ExplicitVRLittleEndian
    assert [v[3] for s, v in now.items() if s != first] == [RLELossless]
    release(server, series)
    got = server.client().retrieve_instance(study, series, first)
    mask = region_mask((64, 64), **TEXT) | region_mask((64, 64), **rect)
    assert (got.pixel_array[mask] == SIGNED_16_MIN).all()
    original = by_number(sent)[int(got.InstanceNumber)]
    assert (got.pixel_array[~mask] == original.pixel_array[~mask]).all()


def test_redacted_instances_no_longer_hold_the_series_when_it_is_reprocessed(
    server: Server,
) -> None:
    study, series = store(server, text_series(2, modality="US"))
    view = server.http.get(api(server, f"/series/{series}"), timeout=30).json()
    codes = {f["code"] for f in view["findings"] if f["severity"] == "hold"}
    assert codes == {"burned-in-annotation"}  # OCR read the pixels: no burned-in-risk
    sops = sorted(rows(server, series))

    def reprocess() -> dict:
        r = post(server, series, "reprocess", reason="after redaction")
        assert r.status_code == 202, r.text
        server.settled()
        return server.http.get(api(server, f"/series/{series}"), timeout=30).json()

    # One instance redacted: the other still holds the series.
    assert post(server, series, "redact", reason="r", rectangles=[TEXT], instances=sops[:1]).ok
    view = reprocess()
    assert view["state"] == "quarantined"
    [annotation] = [f for f in view["findings"] if f["code"] == "burned-in-annotation"]
    assert annotation["details"]["instances"] == sops[1:]
    # Both: nothing holds it any more.
    assert post(server, series, "redact", reason="r", rectangles=[TEXT], instances=sops[1:]).ok
    view = reprocess()
    assert view["state"] == "published", view["findings"]


def test_edits_are_seen_in_qido_and_metadata_after_release(server: Server) -> None:
    study, series = store(server, burned_in_series(2))
    unedited = stored_copies(server, rows(server, series))
    r = post(server, series, "edit", reason="series renumbered", attribute="SeriesNumber", value=42)
    assert r.status_code == 200 and r.json() == {"series_uid": series, "edited": 2}, r.text
    r = post(server, series, "edit", reason="r", attribute="(0018,0015)", value="CHEST")
    assert r.status_code == 200, r.text
    sop = sorted(rows(server, series))[0]
    r = post(server, series, "edit", reason="r", attribute="AcquisitionDate", action="remove",
             instance=sop)  # fmt: skip
    assert r.status_code == 200 and r.json()["edited"] == 1, r.text
    release(server, series)

    [found] = server.client().search_for_series(study, search_filters={"SeriesNumber": "42"})
    assert found["0020000E"]["Value"] == [series]
    assert found["00180015"]["Value"] == ["CHEST"]
    metadata = {
        m["00080018"]["Value"][0]: m
        for m in server.client().retrieve_series_metadata(study, series)
    }
    assert {m["00200011"]["Value"][0] for m in metadata.values()} == {42}
    assert {m["00180015"]["Value"][0] for m in metadata.values()} == {"CHEST"}
    assert [s for s, m in metadata.items() if "00080022" not in m] == [sop]
    ds = server.client().retrieve_instance(study, series, sop)
    assert ds.SeriesNumber == 42 and "AcquisitionDate" not in ds
    listed = server.http.get(api(server, f"/series/{series}/changes"), timeout=30).json()
    assert listed["redactions"] == [] and len(listed["edits"]) == 5
    assert listed["edits"][0]["element"] == {"vr": "IS", "Value": [42]}
    # Applied again to the instances as de-identified, the edits give what is served.
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        again = edits.recorded(conn, series)
    for uid, copy in unedited.items():
        assert rewrite.reapply(copy, again, edits.apply_edit)
        served = metadata[uid]
        assert copy.SeriesNumber == 42 and copy.BodyPartExamined == "CHEST"
        assert ("AcquisitionDate" in copy) == ("00080022" in served)
    audit = server.http.get(api(server, f"/series/{series}"), timeout=30).json()["audit"]
    audited = [
        (a["after"]["attribute"], a["after"]["action"]) for a in audit if a["action"] == "edit"
    ]
    assert audited == [
        ("SeriesNumber", "set"),
        ("BodyPartExamined", "set"),
        ("AcquisitionDate", "remove"),
    ]


@pytest.fixture(scope="module")
def held(server: Server) -> tuple[str, str]:
    """(study, series) of a held series the refusals below must leave as it is."""
    return store(server, text_series(2))


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"attribute": "SOPInstanceUID", "value": "1.2.3"}, "UID"),
        ({"attribute": "(0002,0010)", "value": "1.2.840.10008.1.2"}, "file meta"),
        ({"attribute": "Rows", "value": 8}, "pixel data"),
        ({"attribute": "PhotometricInterpretation", "value": "RGB"}, "pixel data"),
        ({"attribute": "PixelData", "action": "remove"}, "pixel data"),
        ({"attribute": "(0029,1010)", "value": "x"}, "private"),
        ({"attribute": "(0018,FFFF)", "value": "x"}, "not in the DICOM dictionary"),
        ({"attribute": "NoSuchKeyword", "value": "x"}, "neither a DICOM keyword"),
        ({"attribute": "Modality", "action": "remove"}, "Type 1"),
        ({"attribute": "ImageType", "value": ""}, "Type 1"),
        ({"attribute": "Manufacturer", "action": "remove"}, "Type 2"),
        ({"attribute": "SeriesNumber", "value": "abc"}, "IS"),
        ({"attribute": "BodyPartExamined", "value": "chest"}, "CS"),
        ({"attribute": "ImageOrientationPatient", "value": [1, 0, 0]}, "VM"),
        ({"attribute": "RequestAttributesSequence", "value": "x"}, "SQ"),
        ({"attribute": "PatientName", "value": "SMITHERSON^JOHANNA"}, "profile"),
        ({"attribute": "InstitutionName", "value": "SAINT ELSEWHERE"}, "profile"),
        ({"attribute": "StudyDate", "value": "19580314"}, "profile"),
        ({"attribute": "Manufacturer", "value": "seen 03/14/2024"}, "a date"),
        ({"attribute": "Manufacturer", "value": "Dr. Houseman"}, "a person's name"),
        ({"attribute": "PatientIdentityRemoved", "value": "NO"}, "de-identification"),
        ({"attribute": "SeriesNumber", "action": "rename"}, "action"),
    ],
)
def test_invalid_edits_are_422_and_change_nothing(
    server: Server, held: tuple[str, str], body: dict, said: str
) -> None:
    _, series = held
    before = rows(server, series)
    r = post(server, series, "edit", reason="try", **body)
    assert r.status_code == 422, r.text
    message = r.json().get("error") or str(r.json().get("detail"))
    assert said in message, message
    assert rows(server, series) == before


@pytest.mark.parametrize(
    ("body", "status", "said"),
    [
        ({"rectangles": [{"x": 60, "y": 0, "width": 8, "height": 2}]}, 422, "outside the 64x64"),
        ({"rectangles": [{"x": 0, "y": 63, "width": 1, "height": 2}]}, 422, "outside"),
        ({"rectangles": [{"x": 0, "y": 0, "width": 0, "height": 2}]}, 422, "greater than"),
        ({"rectangles": [{"x": -1, "y": 0, "width": 2, "height": 2}]}, 422, "greater than"),
        ({"rectangles": []}, 422, "at least 1"),
        ({"rectangles": [TEXT], "frames": [2]}, 422, "frame 2 is not one of the 1"),
        ({"rectangles": [TEXT], "frames": [0]}, 422, "greater than"),
        ({"rectangles": [TEXT], "instances": ["1.2.3.4"]}, 404, "no instance 1.2.3.4"),
    ],
)
def test_bad_redactions_are_4xx_and_change_nothing(
    server: Server, held: tuple[str, str], body: dict, status: int, said: str
) -> None:
    _, series = held
    before = rows(server, series)
    r = post(server, series, "redact", reason="try", **body)
    assert r.status_code == status, r.text
    assert said in str(r.json()), r.json()
    assert rows(server, series) == before


def test_changes_to_unknown_or_decided_series_are_404_and_409(server: Server) -> None:
    redaction = {"reason": "r", "rectangles": [TEXT]}
    edit = {"reason": "r", "attribute": "SeriesNumber", "value": 7}
    for change, body in (("redact", redaction), ("edit", edit)):
        r = post(server, "1.2.3.999", change, **body)
        assert r.status_code == 404 and "no series 1.2.3.999" in r.text
    _, clean = store(server, ct_series(Phi(), 2, rows=16, columns=16))  # published
    _, rejected = store(server, text_series(1))
    assert post(server, rejected, "reject", reason="face").ok
    for uid, state in ((clean, "published"), (rejected, "rejected")):
        for change, body in (("redact", redaction), ("edit", edit)):
            r = post(server, uid, change, **body)
            assert r.status_code == 409 and f"is {state}" in r.json()["error"], r.text


def test_a_curator_of_another_collection_does_not_find_the_series(
    server: Server, held: tuple[str, str]
) -> None:
    server.create_collection("ELSEWHERE")
    token = server.new_token("--role", "curator", "--collection", "ELSEWHERE")
    _, series = held
    r = requests.post(
        api(server, f"/series/{series}/redact"),
        json={"reason": "r", "rectangles": [TEXT]},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert r.status_code == 404


def test_an_edit_that_removes_a_name_left_in_lets_a_reprocess_publish(server: Server) -> None:
    phi = Phi()
    sent = ct_series(phi, 2, rows=16, columns=16)
    for ds in sent:
        ds.Manufacturer = f"ACME for {phi.patient_name.split('^')[0]}"  # kept by the profile
    study, series = store(server, sent)
    view = server.http.get(api(server, f"/series/{series}"), timeout=30).json()
    held_for = {(f["code"], f["details"]["attribute"]) for f in view["findings"]}
    assert ("residual-phi", "Manufacturer") in held_for
    # A value that looks like a name is refused; a clean one is taken, and the hold (found by
    # the intake with the original's identifiers in hand) goes with the value it was found in.
    edit = {"reason": "name in vendor", "attribute": "Manufacturer"}
    assert post(server, series, "edit", **edit, value="Dr. Smithers").status_code == 422
    r = post(server, series, "edit", **edit, value="ACME")
    assert r.status_code == 200, r.text
    assert post(server, series, "reprocess", reason="edited").status_code == 202
    assert server.settled()[series] == "published"
    [found] = server.client().search_for_series(study, search_filters={"SeriesInstanceUID": series})
    metadata = server.client().retrieve_series_metadata(study, series)
    assert {m["00080070"]["Value"][0] for m in metadata} == {"ACME"} and found


def dciodvfy_errors(path: Path) -> set[str]:
    """The errors dicom3tools' IOD validator finds in a file."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")}


def test_redacted_and_edited_objects_have_no_new_dciodvfy_errors(
    server: Server, tmp_path: Path
) -> None:
    assert shutil.which("dciodvfy"), "dicom3tools is installed by scripts/test"
    sent = text_series(1)
    sent[0].compress(RLELossless, generate_instance_uid=False)
    _, series = store(server, sent)
    [(key, *_)] = rows(server, series).values()
    shutil.copy(server.data_dir / "objects" / key, tmp_path / "before.dcm")
    assert post(server, series, "redact", reason="r", rectangles=[TEXT]).ok
    assert post(server, series, "edit", reason="r", attribute="SeriesNumber", value=9).ok
    r = post(server, series, "edit", reason="r", attribute="AcquisitionDate", action="remove")
    assert r.ok, r.text
    r = post(server, series, "edit", reason="r", attribute="Manufacturer", value=None)
    assert r.ok, r.text  # Type 2: emptied
    [(key, *_)] = rows(server, series).values()
    after = server.data_dir / "objects" / key
    assert dcmread(after).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert dciodvfy_errors(after) - dciodvfy_errors(tmp_path / "before.dcm") == set()


def test_a_redaction_refused_on_one_instance_changes_none_and_leaves_no_file(
    server: Server,
) -> None:
    sent = text_series(2)
    small = sent[1]
    small.PixelData = small.pixel_array[:32, :32].copy().tobytes()
    small.Rows = small.Columns = 32
    _, series = store(server, sent)
    before = rows(server, series)
    objects = {p.name for p in (server.data_dir / "objects").rglob("*.dcm")}
    wide = {"x": 40, "y": 0, "width": 10, "height": 2}  # inside the first image only
    r = post(server, series, "redact", reason="r", rectangles=[wide])
    assert r.status_code == 422 and "outside the 32x32 image" in r.text
    assert rows(server, series) == before
    assert {p.name for p in (server.data_dir / "objects").rglob("*.dcm")} == objects
    assert not any((server.data_dir / "staging").iterdir())


def test_reprocess_with_another_profile_applies_the_recorded_changes_again(
    server: Server,
) -> None:
    """De-identified anew from the kept originals, the instances get the curator's redaction
    and edit back, and the objects the changes had written are replaced, not left behind."""
    sent = text_series(2, modality="US")
    study, series = store(server, sent)
    assert post(server, series, "redact", reason="r", rectangles=[TEXT]).ok
    assert post(server, series, "edit", reason="r", attribute="SeriesNumber", value=42).ok
    changed = rows(server, series)
    r = post(
        server,
        series,
        "reprocess",
        reason="keep characteristics",
        profile="basic",
        options=["retain_patient_characteristics"],
    )
    assert r.status_code == 202, r.text
    server.settled()
    now = rows(server, series)
    assert all(not (server.data_dir / "objects" / changed[s][0]).exists() for s in changed)
    mask = region_mask((64, 64), **TEXT)
    for ds in stored_copies(server, now).values():
        assert (ds.pixel_array[mask] == SIGNED_16_MIN).all()
        assert ds.BurnedInAnnotation == "NO" and ds.SeriesNumber == 42
        assert "PatientSex" in ds  # what the other profile keeps
    view = server.http.get(api(server, f"/series/{series}"), timeout=30).json()
    assert view["state"] == "published", view["findings"]  # redacted: nothing holds it
    [got] = server.client().search_for_series(study, search_filters={"SeriesNumber": "42"})
    assert got["0020000E"]["Value"] == [series]
