"""The curation lifecycle end to end: identified series go in by STOW-RS or C-STORE, the series
rules run on the PostgreSQL queue inside `carina serve`, and each planted problem holds its series
in quarantine for that reason with nothing of it visible over QIDO or WADO; clean series are
published. Also: re-evaluation after a late instance, per-collection rule settings, manifests and
the append-only audit trail."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from pydicom import Dataset
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE

from tests.conftest import Server, free_port, run_cli, wait_count, wait_for_series
from tests.factory import Phi, ct_instance, ct_series

pytestmark = pytest.mark.slow
DICOM = 'multipart/related; type="application/dicom"'


def stow(server: Server, datasets: list[Dataset], root: str | None = None) -> tuple[str, str]:
    """STOW datasets of one series, wait until it is decided; (study, series) as stored."""
    response = server.client(root).store_instances(datasets)
    assert "FailedSOPSequence" not in response
    url = str(response.ReferencedSOPSequence[0].RetrieveURL).split("/studies/", 1)[1]
    study, _, series = url.split("/")[:3]
    wait_for_series(server.database_url)
    return study, series


def state(server: Server, series: str) -> str:
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        row = conn.execute("SELECT state FROM series WHERE series_uid = %s", (series,)).fetchone()
    assert row is not None
    return str(row[0])


def findings(server: Server, series: str) -> list[tuple[str, str, str]]:
    """(code, severity, message) of the series' stored findings."""
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        return conn.execute(
            "SELECT code, severity, message FROM series_findings WHERE series_uid = %s ORDER BY pk",
            (series,),
        ).fetchall()


def messages(server: Server, series: str, code: str) -> list[str]:
    return [m for c, _, m in findings(server, series) if c == code]


def holds(server: Server, series: str) -> set[str]:
    return {code for code, severity, _ in findings(server, series) if severity == "hold"}


def assert_invisible(server: Server, study: str, series: str) -> None:
    """Nothing of the series answers over QIDO (any level) or WADO (retrieve, metadata)."""
    base = server.dicomweb
    for path, params in (
        ("/series", {"SeriesInstanceUID": series}),
        ("/instances", {"SeriesInstanceUID": series}),
        (f"/studies/{study}/series", {}),
        ("/studies", {"StudyInstanceUID": study}),
    ):
        r = server.http.get(base + path, params=params, timeout=30)
        assert r.status_code == 204, (path, r.text)
    for path, accept in (("", DICOM), ("/metadata", "application/dicom+json")):
        r = server.http.get(
            f"{base}/studies/{study}/series/{series}{path}", headers={"Accept": accept}, timeout=30
        )
        assert r.status_code == 404, path


def assert_visible(server: Server, study: str, series: str, count: int) -> None:
    r = server.http.get(f"{server.dicomweb}/studies/{study}/series/{series}/instances", timeout=30)
    assert r.status_code == 200
    assert len(r.json()) == count


def clean_series(count: int = 4, phi: Phi | None = None) -> list[Dataset]:
    """count CT slices 1 mm apart that no rule holds once de-identified."""
    return ct_series(phi or Phi(), count, rows=16, columns=16)


# ---------------------------------------------------------------------------------------------
# Clean and planted series


def test_clean_series_is_published_with_its_qc_figures_and_an_audit_row(server: Server) -> None:
    study, series = stow(server, clean_series(5))
    assert state(server, series) == "published"
    assert holds(server, series) == set()
    assert_visible(server, study, series, 5)
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        qc = conn.execute(
            "SELECT slice_count, slice_thickness_min, spacing_mean, spacing_uniform,"
            " orientation_consistent, has_localizer, missing_slices FROM series_qc"
            " WHERE series_uid = %s",
            (series,),
        ).fetchone()
        audit = conn.execute(
            "SELECT actor, action, before, after FROM audit_log WHERE series_uid = %s",
            (series,),
        ).fetchall()
    assert qc == (5, 1.0, pytest.approx(1.0), True, True, False, 0)
    [(actor, action, before, after)] = audit
    assert (actor, action) == ("carina-worker", "evaluate")
    assert before == {"state": "incoming"} and after["state"] == "published"


def test_burned_in_annotation_yes_is_quarantined(server: Server) -> None:
    sent = clean_series()
    sent[2].BurnedInAnnotation = "YES"
    study, series = stow(server, sent)
    assert state(server, series) == "quarantined"
    assert holds(server, series) == {"burned-in-annotation"}
    [message] = messages(server, series, "burned-in-annotation")
    assert message.startswith("BurnedInAnnotation is YES on 1 of 4")
    assert_invisible(server, study, series)


def test_surname_left_in_a_comment_is_quarantined_as_residual_phi(server: Server) -> None:
    """DoseComment survives the Basic Profile (it is not in Table E.1-1); the surname in it,
    alone, matches no pattern: only the intake's check against the original name finds it."""
    phi = Phi()
    sent = clean_series(phi=phi)
    surname = phi.patient_name.split("^")[0]
    sent[1].DoseComment = f"repeat scan, {surname.lower()} moved"
    study, series = stow(server, sent)
    assert state(server, series) == "quarantined"
    assert holds(server, series) == {"residual-phi"}
    [message] = messages(server, series, "residual-phi")
    assert message.startswith("DoseComment still holds a part of the patient's name")
    assert_invisible(server, study, series)
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        stored = conn.execute(
            "SELECT f.message, f.details::text, i.intake_findings::text FROM series_findings f"
            " JOIN instances i ON i.series_uid = f.series_uid WHERE f.series_uid = %s",
            (series,),
        ).fetchall()
    for row in stored:
        for text in row:
            assert surname.lower() not in str(text).lower()  # findings never repeat the PHI


def test_missing_slice_is_quarantined_then_published_when_it_arrives(server: Server) -> None:
    sent = clean_series(5)
    late = sent.pop(2)
    study, series = stow(server, sent)
    assert state(server, series) == "quarantined"
    assert holds(server, series) == {"geometry-missing-slices"}
    assert_invisible(server, study, series)

    stow(server, [late])  # a late instance sends the series back through the rules
    assert state(server, series) == "published"
    assert holds(server, series) == set()
    assert_visible(server, study, series, 5)
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        trail = conn.execute(
            "SELECT before->>'state', after->>'state' FROM audit_log WHERE series_uid = %s"
            " ORDER BY pk",
            (series,),
        ).fetchall()
    assert trail == [("incoming", "quarantined"), ("incoming", "published")]


def test_tilted_slice_is_quarantined(server: Server) -> None:
    sent = clean_series(5)
    # Slice 3 turned about 6 degrees around the x axis.
    sent[2].ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.9945, 0.1045]
    study, series = stow(server, sent)
    assert state(server, series) == "quarantined"
    assert "geometry-orientation" in holds(server, series)
    assert_invisible(server, study, series)


def test_localizer_among_the_slices_is_quarantined(server: Server) -> None:
    phi = Phi()
    sent = clean_series(4, phi)
    scout = ct_instance(phi, 5, rows=16, columns=16)
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # coronal
    study, series = stow(server, [*sent, scout])
    assert state(server, series) == "quarantined"
    assert holds(server, series) == {"geometry-localizer"}
    assert_invisible(server, study, series)


def test_two_patients_in_one_series_is_quarantined(server: Server) -> None:
    phi = Phi()
    sent = clean_series(4, phi)
    sent[3] = ct_instance(
        Phi(
            patient_id="MRN-OTHER-1",
            patient_name="OTHERSON^ALEX",
            study_uid=phi.study_uid,
            series_uid=phi.series_uid,
            frame_uid=phi.frame_uid,
        ),
        4,
        rows=16,
        columns=16,
    )
    assert sent[3].PatientID != sent[0].PatientID
    study, series = stow(server, sent)
    assert state(server, series) == "quarantined"
    assert "mixed-patients" in holds(server, series)
    assert_invisible(server, study, series)


# ---------------------------------------------------------------------------------------------
# Per-collection settings and manifests


def test_collection_rule_settings_change_what_is_held(server: Server) -> None:
    server.create_collection("LIMITS")
    out = server.cli("collection", "rules", "LIMITS", "--set", "geometry.max_slices=3")
    assert "geometry.max_slices\t3\t(collection)" in out
    root = f"{server.url}/collections/LIMITS/dicomweb"
    study, series = stow(server, clean_series(4), root)
    assert holds(server, series) == {"geometry-slice-count"}
    assert_invisible(server, study, series)

    server.cli("collection", "rules", "LIMITS", "--unset", "geometry.max_slices")
    sent = clean_series(4)
    sent[0].BurnedInAnnotation = "YES"
    server.cli("collection", "rules", "LIMITS", "--set", "burned_in.enabled=false")
    study, series = stow(server, sent, root)
    assert state(server, series) == "published"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--set", "geometry.max_slice=3"), "no such setting"),
        (("--set", "geometry.max_slices=many"), "is a number"),
        (("--set", "geometry.max_slices"), "rule.setting=value"),
        (("--set", "burned_in.detector=ocr"), "cannot be set"),
    ],
)
def test_bad_rule_settings_are_refused_with_a_reason(
    database_url: str, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    done = run_cli(database_url, tmp_path, "collection", "rules", "default", *args)
    assert done.returncode == 1
    assert message in done.stderr


def test_manifest_expecting_three_series_holds_two_until_the_third_comes(
    server: Server, tmp_path: Path
) -> None:
    server.create_collection("MANIFESTED")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("modality,patients,studies,series,instances\nCT,1,1,3,6\n")
    assert "CT: 1 patient(s), 1 study(ies), 3 series, 6 instance(s)" in server.cli(
        "manifest", "upload", "MANIFESTED", str(manifest)
    )
    root = f"{server.url}/collections/MANIFESTED/dicomweb"
    phi = Phi()
    made = []
    for number in (1, 2, 3):
        sent = clean_series(2, Phi(study_uid=phi.study_uid, series_uid=generate_uid()))
        for ds in sent:
            ds.SeriesNumber = number
        made.append(sent)
    first = [stow(server, made[0], root), stow(server, made[1], root)]
    for study, series in first:
        assert state(server, series) == "quarantined"
        assert holds(server, series) == {"manifest-count"}
        assert any(
            m.startswith("The manifest expects 3 CT series")
            for m in messages(server, series, "manifest-count")
        )
        assert_invisible(server, study, series)

    study, third = stow(server, made[2], root)  # the two held before are evaluated again
    for _, series in [*first, (study, third)]:
        assert state(server, series) == "published"


def test_bad_manifest_is_refused_with_the_line(database_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("modality,patients,studies,series,instances\nCT,1,1,three,6\n")
    done = run_cli(database_url, tmp_path, "manifest", "upload", "default", str(bad))
    assert done.returncode == 1
    assert "line 2: series must be a whole number" in done.stderr
    good = tmp_path / "good.csv"
    good.write_text("modality,patients,studies,series,instances\nCT,1,1,1,1\n")
    done = run_cli(database_url, tmp_path, "manifest", "upload", "NO-SUCH", str(good))
    assert done.returncode == 1
    assert "no collection NO-SUCH" in done.stderr


# ---------------------------------------------------------------------------------------------
# Audit


def test_audit_log_refuses_update_and_delete(server: Server) -> None:
    stow(server, clean_series(2))
    with psycopg.connect(server.database_url, autocommit=True) as conn:  # type: ignore[arg-type]
        for statement in (
            "UPDATE audit_log SET actor = 'someone else'",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                conn.execute(statement)
        assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] > 0  # type: ignore[index]


# ---------------------------------------------------------------------------------------------
# Settling C-STORE


def test_end_of_a_c_store_association_settles_its_series_at_once(
    server_factory: Callable[..., Server],
) -> None:
    """With an hour of quiet period, only the association's end can make the series due."""
    port = free_port()
    listener = server_factory(CARINA_DIMSE_PORT=str(port), CARINA_SETTLE_SECONDS="3600")
    listener.create_collection("PUSHED")
    listener.cli("ae", "add", "SITEP", "--collection", "PUSHED")
    ae = AE(ae_title="SITEP")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="CARINA")
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds).Status for ds in clean_series(3)]
    assert statuses == [0xB000] * 3  # admitted, coerced by de-identification
    # Indexed in the background (acknowledged on admission), the association still open.
    wait_count(
        listener.database_url,
        "SELECT count(*) FROM instances i JOIN studies st ON st.study_uid = i.study_uid"
        " WHERE st.collection = %s",
        ("PUSHED",),
        3,
    )
    with psycopg.connect(listener.database_url) as conn:  # type: ignore[arg-type]
        pending = conn.execute(
            "SELECT j.due_at > now() + interval '10 minutes' FROM series_jobs j"
            " JOIN series se USING (series_uid) JOIN studies st USING (study_uid)"
            " WHERE st.collection = 'PUSHED'"
        ).fetchall()
    assert pending == [(True,)]  # incoming, due only after the quiet period
    assoc.release()
    states = wait_for_series(listener.database_url)
    with psycopg.connect(listener.database_url) as conn:  # type: ignore[arg-type]
        [(series,)] = conn.execute(
            "SELECT se.series_uid FROM series se JOIN studies st USING (study_uid)"
            " WHERE st.collection = 'PUSHED'"
        ).fetchall()
    assert states[series] == "published"


# ---------------------------------------------------------------------------------------------
# Settling STOW-RS


def test_an_upload_in_several_requests_is_judged_once_after_its_last(
    server_factory: Callable[..., Server],
) -> None:
    """Each request's end starts a short quiet period that the next request of the same series
    pushes back: the rules run once, on the whole series, not after every request."""
    server = server_factory(CARINA_REQUEST_SETTLE_SECONDS="3")
    sent = clean_series(6)
    client = server.client()
    for part in (sent[:2], sent[2:4], sent[4:]):
        response = client.store_instances(part)
        assert "FailedSOPSequence" not in response
    series = str(response.ReferencedSOPSequence[0].RetrieveURL).split("/")[-3]
    assert wait_for_series(server.database_url)[series] == "published"
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        judged = conn.execute(
            "SELECT count(*) FROM audit_log WHERE series_uid = %s AND action = 'evaluate'",
            (series,),
        ).fetchone()
    assert judged == (1,)
    assert_visible(
        server, str(response.ReferencedSOPSequence[0].RetrieveURL).split("/")[-5], series, 6
    )
