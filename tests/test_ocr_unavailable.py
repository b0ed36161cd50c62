"""When tesseract cannot run (here: CARINA_TESSERACT names a missing binary), the burned-in
rule says so on every image series instead of passing it silently: a warning by default, a
hold where the collection asks for one, and suspect modalities stay held as burned-in-risk."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import pytest

from tests.conftest import Server
from tests.factory import Phi
from tests.test_ocr import ct_with_text, ultrasound_with_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(
    server_factory: Callable[..., Server], tmp_path_factory: pytest.TempPathFactory
) -> Server:
    missing = tmp_path_factory.mktemp("no-ocr") / "tesseract"
    return server_factory(CARINA_TESSERACT=str(missing))


def _findings(server: Server, series: str) -> dict[str, tuple[str, str]]:
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        rows = conn.execute(
            "SELECT code, severity, message FROM series_findings WHERE series_uid = %s",
            (series,),
        ).fetchall()
    return {code: (severity, message) for code, severity, message in rows}


def test_ct_read_by_no_ocr_is_published_with_a_warning_saying_why(server: Server) -> None:
    _, series, _ = server.store(ct_with_text(Phi(), 1))
    assert server.settled()[series] == "published"
    severity, message = _findings(server, series)["burned-in-ocr-unavailable"]
    assert severity == "warn"
    assert "tesseract not found" in message


def test_collection_may_hold_series_that_ocr_could_not_read(server: Server) -> None:
    server.create_collection("STRICT")
    server.set_rules("STRICT", "burned_in.ocr_unavailable=hold")
    _, series, _ = server.store(ct_with_text(Phi(), 1, text=False), "STRICT")
    assert server.settled()[series] == "quarantined"
    assert _findings(server, series)["burned-in-ocr-unavailable"][0] == "hold"


def test_ultrasound_stays_held_as_burned_in_risk_naming_the_reason(server: Server) -> None:
    _, series, _ = server.store(ultrasound_with_text(Phi(), text=False))
    assert server.settled()[series] == "quarantined"
    severity, message = _findings(server, series)["burned-in-risk"]
    assert severity == "hold" and "OCR was not run (tesseract not found" in message
