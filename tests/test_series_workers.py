"""Settled series are evaluated by several worker threads (CARINA_SERIES_WORKERS): a series
whose pixels OCR reads for a long time does not hold up the series behind it."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.conftest import Server
from tests.factory import Phi, ct_series
from tests.test_ocr import ct_with_text

pytestmark = pytest.mark.slow
SLOW_OCR_SECONDS = 15


def slow_tesseract(directory: Path) -> Path:
    """Debian's tesseract, started SLOW_OCR_SECONDS late: an OCR run that takes long."""
    real = shutil.which("tesseract")
    assert real, "tesseract-ocr is installed by scripts/test"
    script = directory / "tesseract"
    script.write_text(f'#!/bin/sh\nsleep {SLOW_OCR_SECONDS}\nexec "{real}" "$@"\n')
    os.chmod(script, 0o755)
    return script


def _stow(server: Server, datasets: list) -> str:
    """STOW without waiting for the series to be decided; its de-identified series UID."""
    body = server.client().store_instances(datasets).to_json_dict()
    return str(body["00081199"]["Value"][0]["00081190"]["Value"][0].split("/")[-3])


def _states(server: Server, *series: str) -> dict[str, str]:
    with psycopg.connect(server.database_url) as conn:  # type: ignore[arg-type]
        rows = conn.execute(
            "SELECT series_uid, state FROM series WHERE series_uid = ANY(%s)", (list(series),)
        ).fetchall()
    return dict(rows)


@pytest.mark.parametrize(("workers", "overtaken"), [(2, True), (1, False)])
def test_a_series_behind_a_long_ocr_is_decided_first_with_two_workers(
    server_factory: Callable[..., Server],
    tmp_path: Path,
    workers: int,
    overtaken: bool,
) -> None:
    server = server_factory(
        CARINA_TESSERACT=str(slow_tesseract(tmp_path)), CARINA_SERIES_WORKERS=str(workers)
    )
    try:
        started = time.monotonic()
        slow = _stow(server, ct_with_text(Phi(), 1, text=False))  # 32 px and more: read
        # The answer does not wait for the decision (its submission's links to the series
        # are not blocked by the worker's lock on the series row while OCR reads).
        assert time.monotonic() - started < SLOW_OCR_SECONDS - 5
        time.sleep(1.5)  # settled (1 s after its request, 0 in tests) and claimed
        quick = _stow(server, ct_series(Phi(), 1, rows=16, columns=16))  # too small to read
        deadline = time.monotonic() + SLOW_OCR_SECONDS - 5
        while time.monotonic() < deadline and _states(server, quick)[quick] != "published":
            time.sleep(0.2)
        states = _states(server, slow, quick)
        assert (states[quick] == "published") is overtaken, states
        assert states[slow] == "incoming"  # still being read
    finally:
        server.stop()


def test_an_instance_sent_while_ocr_reads_its_series_does_not_wait_for_it(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    """The worker reads a series' frames before it locks the series row to decide it, so more
    instances of the series (which update its row) are stored at once rather than after OCR."""
    server = server_factory(CARINA_TESSERACT=str(slow_tesseract(tmp_path)))
    try:
        first, second = ct_with_text(Phi(), 2, text=False)
        series = _stow(server, [first])
        time.sleep(1.5)  # settled (0 s in tests) and taken by the worker, which reads it
        started = time.monotonic()
        assert _stow(server, [second]) == series
        assert time.monotonic() - started < SLOW_OCR_SECONDS - 5
        assert _states(server, series)[series] == "incoming"  # still being read
    finally:
        server.stop()
