"""De-identified objects stay valid (dciodvfy finds nothing new) and their references still
resolve: a CT series with a SEG and a TID 1500 SR that reference it (PS3.15 E.1, U actions)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from carina.curation.intake import InstanceRecord, IntakeContext, process_part
from tests.derived import build
from tests.factory import Phi, to_bytes

OPTIONS = ("retain_long_modified_dates", "clean_structured_content")


@pytest.fixture(scope="module")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Identified inputs written to files, and their de-identified outputs (one key)."""
    tmp = tmp_path_factory.mktemp("validity")
    ctx = IntakeContext("default", b"k" * 32, "basic", OPTIONS, str(tmp))
    phi = Phi()
    cts, seg, sr = build(phi)
    out: dict = {"phi": phi, "inputs": {}, "outputs": {}}
    for name, ds in [*((f"ct{i}", ct) for i, ct in enumerate(cts)), ("seg", seg), ("sr", sr)]:
        path = tmp / f"{name}-in.dcm"
        ds.save_as(path, enforce_file_format=True)
        out["inputs"][name] = ds
        record = process_part(to_bytes(ds), ctx)
        assert isinstance(record, InstanceRecord), record
        out["outputs"][name] = (path, Path(record.staging_path))
    return out


def _errors(path: Path) -> set[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return {line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")}


@pytest.mark.parametrize("name", ["ct0", "seg", "sr"])
def test_deidentified_object_has_no_new_dciodvfy_errors(objects: dict, name: str) -> None:
    assert shutil.which("dciodvfy"), "dicom3tools is installed by scripts/test"
    source, deidentified = objects["outputs"][name]
    assert _errors(deidentified) - _errors(source) == set()


def _uids(ds: Dataset) -> Iterator[tuple[str, str]]:
    """(keyword, value) of every UI element, recursively."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _uids(item)
        elif elem.VR == "UI" and elem.value:
            values = elem.value if isinstance(elem.value, list) else [elem.value]
            for v in values:
                yield elem.keyword, str(v)


def test_every_reference_resolves_to_a_deidentified_object(objects: dict) -> None:
    out = {name: dcmread(paths[1]) for name, paths in objects["outputs"].items()}
    cts = [out[f"ct{i}"] for i in range(3)]
    known = {ds.SOPInstanceUID for ds in out.values()}
    known |= {ds.SeriesInstanceUID for ds in out.values()}
    known |= {cts[0].StudyInstanceUID, cts[0].FrameOfReferenceUID}
    references = [
        (name, kw, uid)
        for name in ("seg", "sr")
        for kw, uid in _uids(out[name])
        if kw.startswith("Referenced")
        and kw.endswith(("InstanceUID", "FrameOfReferenceUID"))
        or kw in ("FrameOfReferenceUID", "SeriesInstanceUID", "StudyInstanceUID")
    ]
    assert any(kw == "ReferencedSOPInstanceUID" for _, kw, _ in references)
    unresolved = [(n, kw, uid) for n, kw, uid in references if uid not in known]
    assert unresolved == []
    # All three share the remapped study and frame of reference.
    assert {ds.StudyInstanceUID for ds in out.values()} == {cts[0].StudyInstanceUID}
    assert out["seg"].FrameOfReferenceUID == cts[0].FrameOfReferenceUID


def test_no_original_uid_or_name_survives_in_derived_objects(objects: dict) -> None:
    originals = {
        uid
        for ds in objects["inputs"].values()
        for _, uid in _uids(ds)
        if not uid.startswith("1.2.840.10008.")
    }  # well-known UIDs are not PHI
    for name in ("seg", "sr"):
        text = objects["outputs"][name][1].read_bytes().decode("latin-1")
        leaked = [u for u in originals if u in text]
        assert leaked == [], name
        for s in objects["phi"].strings():
            assert s not in text, (name, s)
        assert "Reader^Rita" not in text  # the SR observer's name
