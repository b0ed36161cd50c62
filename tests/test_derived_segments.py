"""The frames each SEG segment occupies, for every kind of SEG highdicom writes (BINARY,
FRACTIONAL and the LABELMAP of Sup 243): two segments on different slices of a CT series are
STOWed, and /api/segments answers each segment's exact frame numbers with the de-identified
SOP Instance UID of the CT image each frame was derived from; `carina reindex-derived` fills
them for rows indexed before they were stored."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

import psycopg
import pytest
from pydicom import Dataset

from tests.conftest import Server, wait_for_series
from tests.derived import SEGMENT_SLICES, two_segment_seg
from tests.factory import Phi, ct_series

pytestmark = pytest.mark.slow
# (SEG type, omit_empty_frames): the second BINARY carries all-zero frames, which no segment
# occupies.
VARIANTS = [("BINARY", True), ("BINARY", False), ("FRACTIONAL", True), ("LABELMAP", True)]
IDS = ["binary", "binary-with-empty-frames", "fractional", "labelmap"]


@dataclass(frozen=True)
class StoredSeg:
    """What was sent and what the archive made of it."""

    seg: Dataset
    cts: list[Dataset]
    study: str
    seg_sop: str
    ct_series: str
    #: identified CT SOP Instance UID -> the de-identified one the archive holds
    ct_uids: dict[str, str]


def _store(server: Server, seg_type: str, omit_empty_frames: bool) -> StoredSeg:
    cts = ct_series(Phi(), 4, rows=16, columns=16)
    seg = two_segment_seg(cts, seg_type, omit_empty_frames=omit_empty_frames)
    response = server.client().store_instances([*cts, seg])
    assert "FailedSOPSequence" not in response
    server.settled()
    wait_for_series(server.database_url)
    [seg_url] = [
        str(item.RetrieveURL)
        for item in response.ReferencedSOPSequence
        if item.ReferencedSOPClassUID == seg.SOPClassUID
    ]
    study, seg_sop = seg_url.split("/")[-5], seg_url.split("/")[-1]
    found = server.client().search_for_instances(
        study, search_filters={"Modality": "CT"}, fields=["InstanceNumber"]
    )
    by_number = {int(f["00200013"]["Value"][0]): f for f in found}
    ct_uids = {
        str(ct.SOPInstanceUID): by_number[int(ct.InstanceNumber)]["00080018"]["Value"][0]
        for ct in cts
    }
    ct_series_uid = found[0]["0020000E"]["Value"][0]
    return StoredSeg(seg, cts, study, seg_sop, ct_series_uid, ct_uids)


@pytest.fixture(scope="module")
def stored(server: Server) -> dict[str, StoredSeg]:
    return {name: _store(server, *variant) for name, variant in zip(IDS, VARIANTS, strict=True)}


def _expected(s: StoredSeg, segment: int) -> tuple[list[int], list[str]]:
    """The frames of the sent SEG derived from the slices the segment was drawn on (by each
    frame's Derivation Image Sequence), and the archive's UIDs of those slices."""
    slices = {str(s.cts[i].SOPInstanceUID) for i in SEGMENT_SLICES[segment]}
    frames, sources = [], []
    for number, item in enumerate(s.seg.PerFrameFunctionalGroupsSequence, start=1):
        [derivation] = item.DerivationImageSequence
        source = str(derivation.SourceImageSequence[0].ReferencedSOPInstanceUID)
        ident = item.get("SegmentIdentificationSequence")
        if source in slices and (ident is None or ident[0].ReferencedSegmentNumber == segment):
            frames.append(number)
            sources.append(s.ct_uids[source])
    return frames, sources


def _segments(server: Server, **params: str) -> list[dict]:
    r = server.http.get(f"{server.url}/api/segments", params=params, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", IDS)
def test_each_segment_lists_exactly_the_frames_it_occupies_with_their_source_images(
    server: Server, stored: dict[str, StoredSeg], name: str
) -> None:
    s = stored[name]
    rows = _segments(server, study=s.study)
    assert [(r["sop_uid"], r["segment_number"], r["label"]) for r in rows] == [
        (s.seg_sop, 1, "Liver"),
        (s.seg_sop, 2, "Kidney"),
    ]
    for row in rows:
        frames, sources = _expected(s, row["segment_number"])
        assert len(frames) == 2  # each segment lies on two slices
        assert row["frames"] == frames
        assert row["frame_sop_uids"] == sources
        assert row["frame_count"] == 2
        assert row["referenced_series_uid"] == s.ct_series
        assert row["algorithm_name"] == "Segmenter"
    assert rows[0]["frames"] != rows[1]["frames"]
    # Identified UIDs never come back: the references were remapped with the CT's keys.
    assert not set(s.ct_uids) & {uid for r in rows for uid in r["frame_sop_uids"]}


def test_labelmap_seg_is_indexed_as_a_seg_with_segments_sharing_a_frame(
    server: Server, stored: dict[str, StoredSeg]
) -> None:
    s = stored["labelmap"]
    assert s.seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation
    assert s.seg.SegmentationType == "LABELMAP"
    liver, kidney = _segments(server, study=s.study)
    assert set(liver["frames"]) & set(kidney["frames"])  # both lie on the shared slice
    r = server.http.get(
        f"{server.url}/api/derived-objects", params={"series": liver["series_uid"]}, timeout=30
    )
    [obj] = r.json()
    assert (obj["kind"], obj["problems"], obj["source_series_uid"]) == ("SEG", [], s.ct_series)


def test_all_zero_frames_a_binary_seg_assigns_to_a_segment_are_not_occupied(
    server: Server, stored: dict[str, StoredSeg]
) -> None:
    s = stored["binary-with-empty-frames"]
    # highdicom wrote one frame per slice and segment: each segment names 4, 2 are all zero.
    named = [
        item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        for item in s.seg.PerFrameFunctionalGroupsSequence
    ]
    assert sorted(named) == [1, 1, 1, 1, 2, 2, 2, 2]
    assert [r["frame_count"] for r in _segments(server, study=s.study)] == [2, 2]


def test_segments_found_by_an_image_one_of_their_frames_was_derived_from(
    server: Server, stored: dict[str, StoredSeg]
) -> None:
    s = stored["fractional"]
    shared = s.ct_uids[str(s.cts[2].SOPInstanceUID)]
    only_liver = s.ct_uids[str(s.cts[1].SOPInstanceUID)]
    untouched = s.ct_uids[str(s.cts[0].SOPInstanceUID)]
    assert [r["label"] for r in _segments(server, referenced_instance=shared)] == [
        "Liver",
        "Kidney",
    ]
    assert [r["label"] for r in _segments(server, referenced_instance=only_liver)] == ["Liver"]
    assert _segments(server, referenced_instance=untouched) == []


def test_frames_are_exported_as_lists_in_csv(server: Server, stored: dict[str, StoredSeg]) -> None:
    s = stored["binary"]
    rows = _segments(server, study=s.study)
    r = server.http.get(
        f"{server.url}/api/segments", params={"study": s.study, "format": "csv"}, timeout=30
    )
    got = list(csv.DictReader(io.StringIO(r.text)))
    assert [json.loads(g["frames"]) for g in got] == [row["frames"] for row in rows]
    assert [json.loads(g["frame_sop_uids"]) for g in got] == [row["frame_sop_uids"] for row in rows]


def test_reindex_fills_the_frames_of_segments_indexed_without_them(
    server: Server, stored: dict[str, StoredSeg], database_url: str
) -> None:
    before = {name: _segments(server, study=s.study) for name, s in stored.items()}
    with psycopg.connect(database_url) as conn:  # as indexed before migration 020
        conn.execute("UPDATE segments SET frames = NULL, frame_sop_uids = NULL")
    s = stored["labelmap"]
    assert {r["frames"] for r in _segments(server, study=s.study)} == {None}
    server.cli("reindex-derived")
    assert {name: _segments(server, study=s.study) for name, s in stored.items()} == before


def test_seg_made_from_the_published_ct_keeps_its_references_and_joins_the_ct_study(
    server: Server, stored: dict[str, StoredSeg]
) -> None:
    s = stored["binary"]
    client = server.client()
    published = sorted(
        client.retrieve_series(s.study, s.ct_series), key=lambda ds: int(ds.InstanceNumber)
    )
    assert {str(ds.SOPInstanceUID) for ds in published} == set(s.ct_uids.values())
    seg = two_segment_seg(published, "BINARY")  # as a tool segmenting the published CT does
    response = client.store_instances([seg])
    assert "FailedSOPSequence" not in response
    server.settled()
    states = wait_for_series(server.database_url)
    [item] = response.ReferencedSOPSequence
    study, _, series, _, sop = str(item.RetrieveURL).split("/")[-5:]
    # Kept as they are: its own study (the CT's) and every reference to the published CT.
    assert (study, states[series]) == (s.study, "published")
    assert sop != str(seg.SOPInstanceUID)  # its own new UIDs are still Carina's
    rows = _segments(server, series=series)
    assert [r["label"] for r in rows] == ["Liver", "Kidney"]
    published_uids = {str(ds.SOPInstanceUID) for ds in published}
    for row in rows:
        assert row["referenced_series_uid"] == s.ct_series
        assert len(row["frames"]) == 2
        assert set(row["frame_sop_uids"]) <= published_uids
    [seg_meta] = client.retrieve_series_metadata(study, series)
    ct_meta = client.retrieve_series_metadata(study, s.ct_series)[0]
    # Filed under the CT's patient, in the CT's frame of reference.
    for tag in ("00100010", "00100020", "00100030", "00200052"):
        assert seg_meta.get(tag) == ct_meta.get(tag), tag
    [study_row] = client.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert study_row["00100020"] == ct_meta["00100020"]
