"""`carina serve` on embedded defaults: starts its own PostgreSQL and stops it again."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import start_server

pytestmark = pytest.mark.slow


def _postgres_of(data_dir: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "postgres" and str(data_dir) in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_its_embedded_postgres_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    server = start_server(tmp_path / "data", None)
    try:
        assert requests.get(server.dicomweb + "/studies").status_code == 204
        assert _postgres_of(server.data_dir / "pg"), "embedded PostgreSQL should be running"
        server.process.send_signal(sig)
        server.process.wait(30)
        deadline = time.monotonic() + 15
        while _postgres_of(server.data_dir / "pg") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _postgres_of(server.data_dir / "pg")
    finally:
        server.stop()
