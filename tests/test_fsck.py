"""carina fsck: the index and the object store agree, and damage is reported."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import Server
from tests.factory import Phi, ct_series

pytestmark = pytest.mark.slow


def fsck(server: Server, *args: str) -> tuple[int, str]:
    done = server.run_cli("fsck", *args)  # in the server's own data directory
    return done.returncode, done.stdout + done.stderr


def test_fsck_reports_damage_and_repairs_only_orphans(server: Server) -> None:
    server.client().store_instances(ct_series(Phi(), 3, rows=16, columns=16))
    code, out = fsck(server)
    assert code == 0, out
    assert "checked 3 indexed instances" in out

    objects = sorted((server.data_dir / "objects").rglob("*.dcm"))
    assert len(objects) == 3
    missing, truncated, flipped = objects
    missing_bytes = missing.read_bytes()
    missing.unlink()
    truncated.write_bytes(truncated.read_bytes()[:-10])
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    flipped.write_bytes(bytes(data))
    orphan = server.data_dir / "objects" / "1.2.3" / "4.5.6" / "7.8.9.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left by a crash")
    stale = server.data_dir / "staging" / "stale.dcm"
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    code, out = fsck(server)
    assert code == 1
    assert f"missing object: {missing.relative_to(server.data_dir / 'objects')}" in out
    assert "wrong size:" in out
    assert "wrong checksum" not in out  # content is only compared with --checksums
    assert "orphan object (no index row): 1.2.3/4.5.6/7.8.9.dcm" in out
    assert "stale staging file: stale.dcm" in out

    code, out = fsck(server, "--checksums", "--repair")
    assert code == 1  # the missing and damaged objects cannot be repaired
    assert "wrong checksum:" in out
    assert "removed 2 orphan or stale files" in out
    assert not orphan.exists() and not stale.exists()
    assert truncated.exists() and flipped.exists()  # indexed objects are never deleted

    missing.write_bytes(missing_bytes)  # leave the module's archive as it was found
