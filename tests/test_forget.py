"""The right to be forgotten: `carina subject forget` against a real `carina serve`.

Each test plants a subject (two studies, a SEG and an SR made from its CT series, a mapped
research ID, a de-identified file staged for the store and an identified part in the intake
area) and another subject that must survive, forgets the first by its original or research
PatientID, and then looks for it everywhere: QIDO-RS, WADO-RS, C-FIND (pynetdicom), the
/api derived-object searches, the pseudonym mapping, every table of the database and the bytes
of every file in the data directory (or the S3 bucket)."""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore

from carina.archive import db, erasure
from carina.curation.forget import resolve
from carina.curation.pseudonyms import Pseudonymizer, collection_key
from tests.conftest import Server, free_port
from tests.derived import build, parametric_map, rt_structure_set
from tests.factory import Phi, ct_series, to_bytes
from tests.s3server import S3Server, start_weed

pytestmark = pytest.mark.slow

SECRET = "forget-test-key"
DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def _phi(n: int) -> Phi:
    """Identifying values of subject n, none shared with another subject."""
    return Phi(
        patient_name=f"FORGETSON{n}^MARGARETHE{n}Z^Q",
        patient_id=f"MRN-88{n:05d}",
        birth_date=f"19{40 + n:02d}0611",
        study_date=f"2023{n % 12 + 1:02d}0{n % 9 + 1}",
        accession=f"ACC7734{n:05d}",
        institution=f"SAINT FORGOTTEN {n} HOSPITAL",
        physician=f"PHYSICIANO{n}^HEINRICH",
        address=f"{n} OBLIVION LANE LETHE",
        other_id=f"OTHER-41{n:05d}",
    )


@dataclass(frozen=True)
class Planted:
    """One planted subject: its original values, research IDs and de-identified UIDs."""

    phi: Phi
    research_id: str  # from the mapping file
    keyed_id: str  # the keyed pseudonym its original PatientID would get unmapped
    studies: tuple[str, ...]
    ct_series: str  # de-identified CT series the SEG and SR were made from
    derived_sops: tuple[str, ...]  # SEG, SR, parametric map, RT structure set
    uids: tuple[str, ...]  # every de-identified UID of its instances
    staged: Path
    spooled: Path

    def needles(self) -> list[str]:
        """What must not be found anywhere once the subject is forgotten."""
        return [*self.phi.strings(), self.research_id, self.keyed_id, *self.uids]


@dataclass(frozen=True)
class Archive:
    """The server, its DICOM port and database, and where its objects are."""

    server: Server
    dimse_port: int
    database_url: str
    objects: Callable[[], dict[str, bytes]]  # object key -> bytes of every stored object
    env: dict[str, str] = field(default_factory=dict)  # the store's settings, for the CLI


def _uid_map(collection: str) -> Callable[[str], str]:
    return Pseudonymizer(collection_key(SECRET.encode(), collection)).uid


def _deid_uids(collection: str, datasets: list[Dataset]) -> set[str]:
    """The de-identified UIDs Carina gives the instances' own UIDs (same secret key)."""
    uid = _uid_map(collection)
    keywords = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
    return {uid(str(ds.get(k))) for ds in datasets for k in keywords if ds.get(k)}


def _cli(archive: Archive, *args: str, stdin: str | None = None) -> tuple[int, str]:
    """Run `carina ARGS` with the server's data directory and key: (exit code, all output)."""
    done = archive.server.run_cli(*args, stdin=stdin, CARINA_SECRET_KEY=SECRET, **archive.env)
    return done.returncode, done.stdout + done.stderr


def _stow(server: Server, collection: str, datasets: list[Dataset]) -> None:
    response = server.client(server.root(collection)).store_instances(datasets)
    assert "FailedSOPSequence" not in response, response
    server.settled()


def _plant(archive: Archive, collection: str, n: int, research_id: str) -> Planted:
    """Store subject n (mapped to research_id): study 1 with CT and a SEG, an SR, a parametric
    map and an RT structure set made from it, study 2 with CT;
    read both (so the access audit names them); stage a de-identified copy of one instance and
    spool an identified part in the intake area."""
    server = archive.server
    phi = _phi(n)
    cts, seg, sr = build(phi)
    pm, rtstruct = parametric_map(cts), rt_structure_set(cts)
    second = dataclasses.replace(
        phi, study_uid=generate_uid(), series_uid=generate_uid(), frame_uid=generate_uid()
    )
    cts2 = ct_series(second, 2, rows=16, columns=16)
    _stow(server, collection, [*cts, seg, sr, pm, rtstruct, *cts2])
    uid = _uid_map(collection)
    studies = (uid(phi.study_uid), uid(second.study_uid))
    root = server.root(collection)
    for study in studies:
        assert server.http.get(f"{root}/studies/{study}/metadata", timeout=30).status_code == 200
    one = server.http.get(
        f"{root}/studies/{studies[0]}/series/{uid(phi.series_uid)}"
        f"/instances/{uid(str(cts[0].SOPInstanceUID))}",
        headers={"Accept": DICOM},
        timeout=30,
    )
    assert one.status_code == 200
    staged = server.data_dir / "staging" / f"{uuid.uuid4().hex}.dcm"
    staged.write_bytes(_only_part(one.content, one.headers["content-type"]))
    spooled = server.data_dir / "intake" / f"part-{uuid.uuid4().hex}.dcm"
    spooled.write_bytes(to_bytes(cts2[0]))
    keyed = Pseudonymizer(collection_key(SECRET.encode(), collection)).patient_id(phi.patient_id)
    return Planted(
        phi=phi,
        research_id=research_id,
        keyed_id=keyed,
        studies=studies,
        ct_series=uid(phi.series_uid),
        derived_sops=tuple(uid(str(d.SOPInstanceUID)) for d in (seg, sr, pm, rtstruct)),
        uids=tuple(sorted(_deid_uids(collection, [*cts, seg, sr, pm, rtstruct, *cts2]))),
        staged=staged,
        spooled=spooled,
    )


def _only_part(body: bytes, content_type: str) -> bytes:
    """The one body part of a multipart/related response."""
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"').encode()
    part = body.split(b"--" + boundary)[1]
    return part.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n")


def _setup_collection(archive: Archive, collection: str, mapping: dict[int, str]) -> None:
    """A collection keeping structured content (so SR measurements are indexed), with a
    pseudonym mapping of the given subjects, and an AE title that may C-FIND it."""
    cwd = archive.server.data_dir.parent
    (cwd / f"{collection}.csv").write_text(
        "original_id,research_id\n"
        + "".join(f"{_phi(n).patient_id},{rid}\n" for n, rid in mapping.items())
    )
    for args in (
        (
            "collection",
            "create",
            collection,
            "--option",
            "retain_long_modified_dates",
            "--option",
            "clean_structured_content",
        ),
        ("collection", "mapping", collection, "--file", str(cwd / f"{collection}.csv")),
        ("ae", "add", _aet(collection), "--collection", collection, "--host", "127.0.0.1"),
    ):
        code, out = _cli(archive, *args)
        assert code == 0, out


def _aet(collection: str) -> str:
    return "F" + collection.replace("-", "").upper()[:15]


def _c_find(archive: Archive, collection: str, **keys: str) -> list[Dataset]:
    """The identifiers of every pending C-FIND response at STUDY level (pynetdicom)."""
    ae = AE(ae_title=_aet(collection))
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title="CARINA")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = keys.get("PatientID", "")
    query.StudyInstanceUID = ""
    found = []
    try:
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            assert status.Status in (0x0000, 0xFF00, 0xFF01), status
            if status.Status in (0xFF00, 0xFF01):
                found.append(identifier)
    finally:
        assoc.release()
    return found


def _database_text(database_url: str) -> str:
    """Every row of every table of the database, as text."""
    with psycopg.connect(database_url) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
            )
        ]
        return "\n".join(
            str(row[0])
            for table in tables
            for row in conn.execute(
                sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(table))
            )
        )


def _files_bytes(directory: Path) -> dict[str, bytes]:
    """Path below directory -> bytes of every file."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file()
    }


def _holding(blobs: dict[str, bytes], needles: list[str]) -> dict[str, list[str]]:
    """Which blobs hold which needles."""
    found = {}
    for name, data in blobs.items():
        hits = [n for n in needles if n.encode() in data]
        if hits:
            found[name] = hits
    return found


def _studies(archive: Archive, collection: str) -> set[str]:
    r = archive.server.http.get(f"{archive.server.root(collection)}/studies", timeout=30)
    assert r.status_code in (200, 204), r.text
    return {s["0020000D"]["Value"][0] for s in r.json()} if r.status_code == 200 else set()


def _derived_rows(archive: Archive, collection: str) -> dict[str, set[str]]:
    """SOP Instance UIDs each /api derived search returns for the collection."""
    found = {}
    for path in ("segments", "measurements", "landmarks", "derived-objects"):
        r = archive.server.http.get(
            f"{archive.server.url}/api/{path}", params={"collection": collection}, timeout=30
        )
        assert r.status_code == 200, r.text
        found[path] = {row["sop_uid"] for row in r.json()}
    return found


def _assert_present(archive: Archive, collection: str, who: Planted) -> None:
    """Everything of the subject is served and held."""
    assert set(who.studies) <= _studies(archive, collection)
    derived = _derived_rows(archive, collection)
    assert set(who.derived_sops) <= derived["derived-objects"]
    assert who.derived_sops[0] in derived["segments"]
    assert who.derived_sops[1] in derived["measurements"]
    ids = {f.PatientID for f in _c_find(archive, collection)}
    assert who.research_id in ids
    assert who.staged.exists() and who.spooled.exists()


def _assert_forgotten(archive: Archive, collection: str, gone: Planted) -> None:
    """Nothing of the subject is served, indexed, mapped or stored anywhere."""
    server, root = archive.server, archive.server.root(collection)
    assert not set(gone.studies) & _studies(archive, collection)
    for rid in (gone.research_id, gone.keyed_id):
        r = server.http.get(f"{server.dicomweb}/studies", params={"PatientID": rid}, timeout=30)
        assert r.status_code == 204, r.text
        assert _c_find(archive, collection, PatientID=rid) == []
    for study in gone.studies:
        for path in ("", "/metadata", "/series"):
            r = server.http.get(f"{root}/studies/{study}{path}", timeout=30)
            assert r.status_code in (204, 404), (path, r.status_code)
    r = server.http.get(
        f"{server.dicomweb}/series", params={"StudyInstanceUID": gone.studies[0]}, timeout=30
    )
    assert r.status_code == 204
    derived = _derived_rows(archive, collection)
    assert not [p for p, sops in derived.items() if sops & set(gone.derived_sops)]
    r = server.http.get(
        f"{server.url}/api/derived-objects", params={"source_series": gone.ct_series}, timeout=30
    )
    assert r.json() == []
    assert not gone.staged.exists() and not gone.spooled.exists()
    needles = gone.needles()
    assert [n for n in needles if n in _database_text(archive.database_url)] == []
    assert _holding(_files_bytes(server.data_dir), needles) == {}
    assert _holding(archive.objects(), needles) == {}


def _assert_intact(archive: Archive, collection: str, kept: Planted) -> None:
    """The other subject is untouched: served, derived objects found, mapped, files kept."""
    _assert_present(archive, collection, kept)
    for study in kept.studies:
        r = archive.server.http.get(
            f"{archive.server.root(collection)}/studies/{study}",
            headers={"Accept": DICOM},
            timeout=60,
        )
        assert r.status_code == 200
    with psycopg.connect(archive.database_url) as conn:
        mapped = conn.execute(
            "SELECT research_id FROM pseudonym_mappings WHERE collection = %s", (collection,)
        ).fetchall()
    assert mapped == [(kept.research_id,)]
    assert kept.research_id in _database_text(archive.database_url)
    kept_objects = [k for k in archive.objects() if k.startswith(kept.studies[0])]
    assert len(kept_objects) == 7  # CT x3, SEG, SR, parametric map, RT structure set


def _erasure(archive: Archive, collection: str) -> tuple:
    with psycopg.connect(archive.database_url) as conn:
        row = conn.execute(
            "SELECT id, actor, identifier_kind, counts, completed_at IS NOT NULL"
            " FROM subject_erasures WHERE collection = %s ORDER BY id DESC LIMIT 1",
            (collection,),
        ).fetchone()
        assert row is not None
        audit = conn.execute(
            "SELECT count(*) FROM access_audit WHERE erasure_id = %s AND study_uid IS NULL",
            (row[0],),
        ).fetchone()
    return (*row, audit[0])  # type: ignore[index]


@pytest.fixture(scope="module")
def archive(server_factory: Callable[..., Server], database_url: str) -> Iterator[Archive]:
    """A Carina with a filesystem store and its DICOM listener."""
    port = free_port()
    server = server_factory(CARINA_DIMSE_PORT=str(port), CARINA_SECRET_KEY=SECRET)
    objects = server.data_dir / "objects"
    yield Archive(server, port, database_url, lambda: _files_bytes(objects))


def _forget_and_check(archive: Archive, collection: str, by_original: bool) -> None:
    _setup_collection(archive, collection, {1: f"{collection}-0001", 2: f"{collection}-0002"})
    gone = _plant(archive, collection, 1, f"{collection}-0001")
    kept = _plant(archive, collection, 2, f"{collection}-0002")
    _assert_present(archive, collection, gone)
    _assert_present(archive, collection, kept)
    if by_original:
        args, stdin = ("--original-id",), gone.phi.patient_id + "\n"
    else:
        args, stdin = ("--research-id", gone.research_id), None

    code, dry = _cli(archive, "subject", "forget", collection, *args, "--dry-run", stdin=stdin)
    assert code == 0, dry
    assert "would remove:" in dry and "  instances: 9\n" in dry, dry  # CT x3, 4 derived; CT x2
    _assert_present(archive, collection, gone)

    code, out = _cli(archive, "subject", "forget", collection, *args, "--by", "dpo", stdin=stdin)
    assert code == 0, out
    for line in (
        "removed:",
        "  patients: 1",
        "  studies: 2",
        "  series: 6",
        "  instances: 9",
        "  derived objects among them: 4",
        "  stored objects: 9",
        "  pseudonym mapping entries: 1",
        "  staged files: 1",
        "  intake files: 1",
    ):
        assert line + "\n" in out, out
    assert not [n for n in gone.needles() if n in out + dry]
    _assert_forgotten(archive, collection, gone)
    _assert_intact(archive, collection, kept)

    erasure_id, actor, kind, counts, complete, audit_rows = _erasure(archive, collection)
    assert (actor, kind, complete) == ("dpo", "original" if by_original else "research", True)
    assert counts["instances"] == 9 and counts["intake_files"] == 1
    assert audit_rows == counts["audit_rows"] >= 2  # both studies were read
    assert counts["curation_audit_rows"] >= 2  # each series was decided (its audit kept, unlinked)

    code, again = _cli(archive, "subject", "forget", collection, *args, stdin=stdin)
    assert code == 0, again
    assert f"already forgotten (erasure {erasure_id}" in again
    server_log = archive.server.log.read_text()
    assert not [n for n in gone.phi.strings() if n in server_log]


def test_forget_by_original_id_removes_the_subject_everywhere_and_keeps_the_other(
    archive: Archive,
) -> None:
    _forget_and_check(archive, "forget-orig", by_original=True)


def test_forget_by_research_id_removes_the_subject_everywhere_and_keeps_the_other(
    archive: Archive,
) -> None:
    _forget_and_check(archive, "forget-rid", by_original=False)


def test_forget_unknown_subject_or_collection_says_so_and_fails(archive: Archive) -> None:
    _setup_collection(archive, "forget-none", {3: "forget-none-0003"})
    code, out = _cli(
        archive, "subject", "forget", "forget-none", "--original-id", stdin="MRN-NOBODY\n"
    )
    assert code == 1
    assert "holds no subject with that original PatientID" in out
    assert "MRN-NOBODY" not in out
    code, out = _cli(archive, "subject", "forget", "forget-none", "--research-id", "NOBODY")
    assert code == 1 and "holds no subject" in out
    code, out = _cli(archive, "subject", "forget", "no-such", "--research-id", "X")
    assert code == 1 and "no collection no-such" in out


def test_crash_after_withdrawal_serves_nothing_and_a_rerun_finishes(archive: Archive) -> None:
    collection = "forget-crash"
    _setup_collection(archive, collection, {4: "forget-crash-0004", 5: "forget-crash-0005"})
    gone = _plant(archive, collection, 4, "forget-crash-0004")
    kept = _plant(archive, collection, 5, "forget-crash-0005")
    objects_before = archive.objects()
    # A crash right after the withdrawal transaction: what `subject forget` commits first.
    with db.open_pool(archive.database_url, max_size=1) as pool:
        subject, _ = resolve(pool, SECRET.encode(), collection, research_id=gone.research_id)
        erasure_id, counts = erasure.withdraw(pool, subject, "crashed")
    assert erasure_id is not None and counts.instances == 9
    # Nothing of the subject is served although its objects are still stored.
    assert archive.objects() == objects_before
    assert not set(gone.studies) & _studies(archive, collection)
    for study in gone.studies:
        r = archive.server.http.get(
            f"{archive.server.dicomweb}/studies/{study}", headers={"Accept": DICOM}, timeout=30
        )
        assert r.status_code == 404
    assert _c_find(archive, collection, PatientID=gone.research_id) == []
    code, out = _cli(archive, "fsck")
    assert code == 1 and f"unfinished erasure {erasure_id}: 9 objects" in out
    # The rerun recognises the subject as forgotten and finishes the deletion.
    code, out = _cli(archive, "subject", "forget", collection, "--research-id", gone.research_id)
    assert code == 0, out
    assert f"already forgotten (erasure {erasure_id}" in out
    assert "  stored objects: 9" in out
    assert "staged files: 1" in out and "intake files: 1" in out
    _assert_forgotten(archive, collection, gone)
    _assert_intact(archive, collection, kept)


def test_crash_midway_through_deletion_is_finished_by_fsck_repair(archive: Archive) -> None:
    collection = "forget-fsck"
    _setup_collection(archive, collection, {6: "forget-fsck-0006", 7: "forget-fsck-0007"})
    gone = _plant(archive, collection, 6, "forget-fsck-0006")
    kept = _plant(archive, collection, 7, "forget-fsck-0007")
    with db.open_pool(archive.database_url, max_size=1) as pool:
        subject, _ = resolve(pool, SECRET.encode(), collection, research_id=gone.research_id)
        erasure_id, _ = erasure.withdraw(pool, subject, "crashed")
    # Some objects were deleted before the crash.
    objects = archive.server.data_dir / "objects"
    for path in sorted((objects / gone.studies[1]).rglob("*.dcm")):
        path.unlink()
    code, out = _cli(archive, "fsck", "--repair")
    assert code == 0, out
    assert "finished 1 erasures" in out
    gone.staged.unlink()  # local work areas are the subject command's (not fsck's) to sweep
    gone.spooled.unlink()
    _assert_forgotten(archive, collection, gone)
    _assert_intact(archive, collection, kept)
    code, out = _cli(archive, "fsck")
    assert code == 0, out
    assert erasure_id is not None


@pytest.fixture(scope="module")
def s3_archive(
    server_factory: Callable[..., Server],
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Archive]:
    """A Carina whose object store is a SeaweedFS bucket, with its DICOM listener."""
    weed: S3Server = start_weed(tmp_path_factory.mktemp("weed"))
    env = {
        "CARINA_STORAGE": "s3",
        "CARINA_S3_ENDPOINT": weed.endpoint,
        "CARINA_S3_ACCESS_KEY": weed.access_key,
        "CARINA_S3_SECRET_KEY": weed.secret_key,
        "CARINA_S3_BUCKET": "forget",
    }
    port = free_port()
    server = server_factory(CARINA_DIMSE_PORT=str(port), CARINA_SECRET_KEY=SECRET, **env)

    def objects() -> dict[str, bytes]:
        client, found = weed.client(), {}
        for item in client.list_objects("forget", recursive=True):
            response = client.get_object("forget", str(item.object_name))
            try:
                found[str(item.object_name)] = response.read()
            finally:
                response.close()
                response.release_conn()
        return found

    yield Archive(server, port, database_url, objects, env)
    server.stop()
    weed.stop()


def test_forget_with_the_s3_store_deletes_the_subjects_objects_from_the_bucket(
    s3_archive: Archive,
) -> None:
    assert _files_bytes(s3_archive.server.data_dir / "objects") == {}
    _forget_and_check(s3_archive, "forget-s3", by_original=True)


def test_forget_removes_a_derived_object_stored_in_another_study_that_references_the_subject(
    archive: Archive,
) -> None:
    collection = "forget-xref"
    _setup_collection(archive, collection, {8: "forget-xref-0008"})
    phi = _phi(8)
    cts, made, _ = build(phi)
    # A pipeline's result filed as its own study and patient, made from the subject's CT (a
    # copy: highdicom's SEG shares data elements with its source images).
    seg = copy.deepcopy(made)
    seg.StudyInstanceUID = generate_uid()
    seg.PatientID, seg.PatientName = "PIPELINE-OUT-8", "PIPELINE^OUTPUT"
    _stow(archive.server, collection, [*cts, seg])
    uid = _uid_map(collection)
    assert _studies(archive, collection) == {uid(phi.study_uid), uid(seg.StudyInstanceUID)}
    code, out = _cli(
        archive, "subject", "forget", collection, "--original-id", stdin=phi.patient_id
    )
    assert code == 0, out
    for line in (
        "  patients: 2",
        "  studies: 2",
        "  instances: 4",
        "  derived objects among them: 1",
    ):
        assert line + "\n" in out, out
    assert _studies(archive, collection) == set()
    assert _derived_rows(archive, collection)["derived-objects"] == set()
    held = _holding(archive.objects(), sorted(_deid_uids(collection, [*cts, seg])))
    assert held == {}


def test_forget_takes_an_instance_of_the_subjects_series_filed_under_another_study(
    archive: Archive,
) -> None:
    collection = "forget-stray"
    _setup_collection(archive, collection, {9: "forget-stray-0009"})
    phi = _phi(9)
    cts = ct_series(phi, 2, rows=16, columns=16)
    # Malformed input: one image of the series claims another study and patient.
    cts[1].StudyInstanceUID, cts[1].PatientID = generate_uid(), "STRAY-9"
    _stow(archive.server, collection, cts)
    assert _study_rows(archive, collection) == 2  # the stray study has no series of its own
    code, out = _cli(
        archive, "subject", "forget", collection, "--original-id", stdin=phi.patient_id
    )
    assert code == 0, out
    assert "  instances: 2\n" in out and "  studies: 2\n" in out, out
    assert _study_rows(archive, collection) == 0
    assert _holding(archive.objects(), sorted(_deid_uids(collection, cts))) == {}


def _study_rows(archive: Archive, collection: str) -> int:
    with psycopg.connect(archive.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM studies WHERE collection = %s", (collection,))
        return int(row.fetchone()[0])  # type: ignore[index]


NOT_AUTHORIZED = 0x0124  # PS3.7 Annex C: Refused: Not Authorized


def _new_study(n: int, count: int = 1) -> list[Dataset]:
    """A new study of subject n (same identifiers, new UIDs)."""
    phi = dataclasses.replace(
        _phi(n), study_uid=generate_uid(), series_uid=generate_uid(), frame_uid=generate_uid()
    )
    return ct_series(phi, count, rows=8, columns=8)


def _stow_answer(archive: Archive, collection: str, datasets: list[Dataset]) -> Dataset:
    """The Store Instances Response of a STOW-RS of datasets (PS3.18 10.5.3)."""
    body = b"".join(
        b"--XyZ\r\nContent-Type: application/dicom\r\n\r\n" + to_bytes(ds) + b"\r\n"
        for ds in datasets
    )
    r = archive.server.http.post(
        f"{archive.server.root(collection)}/studies",
        data=body + b"--XyZ--\r\n",
        headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=XyZ',
            "Accept": "application/dicom+json",
        },
        timeout=120,
    )
    assert r.status_code in (200, 202, 409), r.text
    return Dataset.from_json(r.json())


def _c_store(archive: Archive, collection: str, ds: Dataset) -> Dataset:
    """The C-STORE response status dataset of ds, sent from the collection's AE title."""
    ae = AE(ae_title=_aet(collection))
    ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", archive.dimse_port, ae_title="CARINA")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def _refused_as_forgotten(answer: Dataset, needles: list[str]) -> None:
    """A STOW answer that refused every part as a forgotten subject's, quoting nothing."""
    assert "ReferencedSOPSequence" not in answer
    failed = answer.FailedSOPSequence
    assert failed and {item.FailureReason for item in failed} == {NOT_AUTHORIZED}
    assert not [n for n in needles if n in str(answer)]


@pytest.mark.parametrize("by_original", [True, False], ids=["original ID", "research ID"])
def test_forgotten_subject_is_refused_on_every_later_send_until_an_admin_allows_it(
    archive: Archive, by_original: bool
) -> None:
    collection = f"forget-again-{'o' if by_original else 'r'}"
    research_id = f"{collection}-0004"
    _setup_collection(archive, collection, {4: research_id})
    _stow(archive.server, collection, _new_study(4, 2))
    args = ("--original-id",) if by_original else ("--research-id", research_id)
    stdin = _phi(4).patient_id + "\n" if by_original else None
    code, out = _cli(archive, "subject", "forget", collection, *args, stdin=stdin)
    assert code == 0 and "  instances: 2\n" in out, out
    keyed = Pseudonymizer(collection_key(SECRET.encode(), collection)).patient_id(
        _phi(4).patient_id
    )
    needles = [*_phi(4).strings(), research_id, keyed]

    # STOW-RS and C-STORE of a new study of the subject: refused, saying why, quoting nothing.
    later = _new_study(4)
    _refused_as_forgotten(_stow_answer(archive, collection, later), needles)
    status = _c_store(archive, collection, _new_study(4)[0])
    assert status.Status == NOT_AUTHORIZED
    assert "forgotten" in status.ErrorComment
    assert not [n for n in needles if n in str(status.ErrorComment)]
    # Another subject is taken in as before.
    assert "FailedSOPSequence" not in _stow_answer(archive, collection, _new_study(5))
    archive.server.settled()
    server = archive.server
    for rid in (research_id, keyed):
        r = server.http.get(f"{server.dicomweb}/studies", params={"PatientID": rid}, timeout=30)
        assert r.status_code == 204, r.text
    assert [n for n in needles if n in _database_text(archive.database_url)] == []
    refused_uids = sorted(_deid_uids(collection, later))
    assert _holding(archive.objects(), refused_uids) == {}
    assert _holding(_files_bytes(server.data_dir / "staging"), refused_uids) == {}

    # An admin lifts the erasure (recorded); the subject's instances are taken in again.
    code, out = _cli(archive, "subject", "allow", collection, *args, "--by", "dpo", stdin=stdin)
    assert code == 0 and "lifted" in out, out
    with psycopg.connect(archive.database_url) as conn:
        lifted = conn.execute(
            "SELECT lifted_by, lifted_at IS NOT NULL FROM subject_erasures WHERE collection = %s",
            (collection,),
        ).fetchall()
    assert lifted == [("dpo", True)]
    assert "FailedSOPSequence" not in _stow_answer(archive, collection, later)
    code, out = _cli(archive, "subject", "allow", collection, *args, stdin=stdin)
    assert code == 1 and "no erasure in force" in out
    assert not [n for n in _phi(4).strings() if n in server.log.read_text()]


def test_instances_sent_while_the_subject_is_forgotten_do_not_survive(archive: Archive) -> None:
    collection = "forget-race"
    _setup_collection(archive, collection, {6: f"{collection}-0006"})
    _stow(archive.server, collection, _new_study(6))
    sent: list[Dataset] = []
    answers: list[Dataset] = []
    forgotten = threading.Event()

    def sender() -> None:
        # Keeps sending new studies of the subject until a few after the erasure ended.
        after = 0
        while after < 3:
            after += forgotten.is_set()
            study = _new_study(6)
            sent.extend(study)
            answers.append(_stow_answer(archive, collection, study))

    thread = threading.Thread(target=sender)
    thread.start()
    try:
        time.sleep(1.0)  # some sends are indexed before the erasure starts
        code, out = _cli(
            archive,
            "subject",
            "forget",
            collection,
            "--original-id",
            stdin=_phi(6).patient_id + "\n",
        )
        forgotten.set()
    finally:
        thread.join(timeout=300)
    assert code == 0, out
    assert not thread.is_alive()
    # Those answered after the erasure was recorded were refused; none of any survives.
    assert {item.FailureReason for a in answers[-3:] for item in a.FailedSOPSequence} == {
        NOT_AUTHORIZED
    }
    archive.server.settled()
    keyed = Pseudonymizer(collection_key(SECRET.encode(), collection)).patient_id(
        _phi(6).patient_id
    )
    for rid in (f"{collection}-0006", keyed):
        r = archive.server.http.get(
            f"{archive.server.dicomweb}/studies", params={"PatientID": rid}, timeout=30
        )
        assert r.status_code == 204, r.text
    uids = sorted(_deid_uids(collection, sent))
    assert len(sent) > 3 and _holding(archive.objects(), uids) == {}
    with psycopg.connect(archive.database_url) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM instances WHERE sop_uid = ANY(%s)", (uids,)
        ).fetchone()
    assert rows == (0,)


def test_subject_forgotten_right_after_a_send_is_refused_on_the_next(archive: Archive) -> None:
    """Intake takes a collection seen without erasures in force to have none for a few seconds
    (it does not ask before every batch); a subject forgotten meanwhile is still refused on the
    very next send, and nothing of that send is kept."""
    collection = "forget-soon"
    _setup_collection(archive, collection, {9: f"{collection}-0009"})
    first = _stow_answer(archive, collection, _new_study(9))
    assert "FailedSOPSequence" not in first  # the collection was just seen without erasures
    code, out = _cli(
        archive, "subject", "forget", collection, "--original-id", stdin=_phi(9).patient_id + "\n"
    )
    assert code == 0, out
    later = _new_study(9, 2)
    _refused_as_forgotten(_stow_answer(archive, collection, later), [*_phi(9).strings()])
    archive.server.settled()
    refused_uids = sorted(_deid_uids(collection, later))
    assert _holding(archive.objects(), refused_uids) == {}
    assert _holding(_files_bytes(archive.server.data_dir / "staging"), refused_uids) == {}
