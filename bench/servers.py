"""The DICOMweb servers a benchmark measures, each on loopback in its own temporary directory.

Carina runs as `python -m carina serve` (its own embedded PostgreSQL in the data directory);
Orthanc runs as Debian's `Orthanc` with the `orthanc-dicomweb` plugin, when both are installed.
Stopping a server stops every process it started and removes its directory."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import requests

START_TIMEOUT = 180.0  # seconds; the first embedded PostgreSQL start runs initdb
STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.25
ORTHANC_PLUGIN_DIRS = (
    "/usr/share/orthanc/plugins",
    "/usr/lib/orthanc",
    "/usr/local/share/orthanc/plugins",
)


class ServerError(RuntimeError):
    """A server did not start, or stopped, or answered in a way the benchmark cannot use."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    """Whether pid is a running process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    """Poll until pid is gone or timeout passes; whether it is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(POLL_INTERVAL)
    return not _alive(pid)


class Server:
    """A DICOMweb server started for one benchmark run; use as a context manager."""

    name = "server"

    def __init__(self) -> None:
        self.port = free_port()
        self.tmp = Path(tempfile.mkdtemp(prefix=f"bench-{self.name.lower()}-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.version = "?"
        self.notes: list[str] = []
        self._log: IO[bytes] | None = None
        # Headers every request to the server sends (Carina's admin token).
        self.headers: dict[str, str] = {}

    @property
    def base(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root URL (no trailing slash)."""
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        """Where the server's stdout and stderr go."""
        return self.tmp / "server.log"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        """Start the process and wait (bounded) until it answers."""
        cmd, env = self._command()
        # Temporary files of the server (and of its children) go in its own directory too.
        env["TMPDIR"] = str(self.tmp / "tmp")
        (self.tmp / "tmp").mkdir(mode=0o700)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        # A session of its own: a Ctrl-C on the terminal reaches the benchmark, which then
        # stops the server in order, instead of reaching the server directly.
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.name} {self.exit_description()} while starting; log:\n{self.log_tail()}"
                )
            try:
                if self._ready():
                    return
            except requests.RequestException:
                pass
            time.sleep(POLL_INTERVAL)
        raise ServerError(
            f"{self.name} did not answer within {START_TIMEOUT:.0f} s; log tail:\n{self.log_tail()}"
        )

    def _stop_signal(self) -> int:
        return signal.SIGTERM

    def _after_exit(self) -> None:
        """Clean up what the server process may leave behind."""

    def stop(self) -> None:
        """Stop the server and everything it started, then remove its directory."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(self._stop_signal())
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.notes.append(
                        f"{self.name} did not stop within {STOP_TIMEOUT:.0f} s; killed"
                    )
                    self.proc.kill()
                    self.proc.wait(STOP_TIMEOUT)
            if self.proc is not None:
                # Anything left in the server's own process group (e.g. worker processes).
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            self._after_exit()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            shutil.rmtree(self.tmp, ignore_errors=True)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by every live process of the server: those of
        its own session (worker processes included) and, for Carina, of its embedded PostgreSQL
        (pg_ctl starts it in a session of its own). Unlike wall time, hardly changed by other
        load on the machine."""
        if self.proc is None:
            return 0.0
        sessions = self._sessions()
        parents = self._parents()
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            # proc(5): fields after the command: state, ppid, pgrp, session, ..., utime, stime
            if int(fields[3]) in sessions or int(fields[1]) in parents:
                total += int(fields[11]) + int(fields[12])
        return total / tick

    def _sessions(self) -> set[int]:
        """The sessions whose processes are the server's."""
        return {self.proc.pid} if self.proc is not None else set()

    def _parents(self) -> set[int]:
        """Processes whose children are the server's whatever their session."""
        return set()

    def check_running(self) -> None:
        """Raise ServerError (with the log tail) if the server process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerError(f"{self.name} {self.exit_description()}; log:\n{self.log_tail()}")

    def exit_description(self) -> str:
        """How the server process ended, e.g. 'exited with status 1' or 'killed by SIGTERM'."""
        if self.proc is None or self.proc.returncode is None:
            return "is running"
        rc = self.proc.returncode
        if rc < 0:
            # The benchmark signals a server only in stop(): this came from elsewhere.
            return f"was killed by {signal.Signals(-rc).name} (not sent by the benchmark)"
        return f"exited with status {rc}"

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log (without DEBUG chatter of libraries)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        kept = [x for x in text.splitlines() if not x.startswith("DEBUG ")]
        return "\n".join("    " + x for x in kept[-lines:]) or "    (empty)"

    def __enter__(self) -> Server:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class CarinaServer(Server):
    """`python -m carina serve` with a fresh data directory and its embedded PostgreSQL."""

    name = "Carina"

    def __init__(self, python: str = sys.executable, log_level: str = "warning") -> None:
        super().__init__()
        self.python = python
        self.log_level = log_level

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root URL."""
        return f"{self.base}/dicomweb"

    @property
    def data_dir(self) -> Path:
        """CARINA_DATA_DIR of this run."""
        return self.tmp / "data"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        # Inherit nothing Carina-specific: no DATABASE_URL (so the embedded PostgreSQL is
        # used), no S3 store or other CARINA_* setting from the caller's environment.
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("CARINA_") and k != "DATABASE_URL"
        }
        env.update(
            CARINA_DATA_DIR=str(self.data_dir),
            CARINA_PORT=str(self.port),
            CARINA_SECRET_KEY="bench",
            CARINA_LOG_LEVEL=self.log_level,
        )
        return [self.python, "-m", "carina", "serve"], env

    def cli(self, *args: str) -> str:
        """Run `carina ARGS` with this server's settings (its data directory and embedded
        PostgreSQL); its stdout. ServerError when it fails."""
        _, env = self._command()
        done = subprocess.run(
            [self.python, "-m", "carina", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            raise ServerError(f"carina {' '.join(args)} failed: {done.stderr[-2000:]}")
        return done.stdout

    def start(self) -> None:
        """Make an admin token (storing needs one, and the default collection is restricted),
        then start."""
        token = self.cli("token", "create", "--role", "admin", "--name", "bench").strip()
        self.headers = {"Authorization": f"Bearer {token}"}
        super().start()

    def _ready(self) -> bool:
        r = requests.get(f"{self.base}/healthz", timeout=2)
        if r.status_code != 200:
            return False
        self.version = str(r.json().get("version", "?"))
        return True

    def _sessions(self) -> set[int]:
        sessions = super()._sessions()
        postmaster = self._postmaster()
        if postmaster is not None:
            with contextlib.suppress(OSError):
                sessions.add(os.getsid(postmaster))
        return sessions

    def _parents(self) -> set[int]:
        # PostgreSQL's backends each start a session of their own (setsid), so they are found
        # as the postmaster's children: the server's connections' work is its work.
        postmaster = self._postmaster()
        return {postmaster} if postmaster is not None else set()

    def _postmaster(self) -> int | None:
        try:
            return int((self.data_dir / "pg" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _stop_signal(self) -> int:
        # SIGINT, as a Ctrl-C would: uvicorn shuts down and the process exits through
        # Python's normal exit, where the embedded PostgreSQL is stopped.
        return signal.SIGINT

    def _after_exit(self) -> None:
        pidfile = self.data_dir / "pg" / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        if not _alive(pid):
            return
        self.notes.append(
            "Carina's embedded PostgreSQL was still running after `carina serve` exited; "
            "the benchmark stopped it"
        )
        os.kill(pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown
        if not _wait_gone(pid, STOP_TIMEOUT):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, STOP_TIMEOUT)


def find_orthanc() -> tuple[str, str] | None:
    """(Orthanc executable, DICOMweb plugin library), or None when either is not installed."""
    exe = shutil.which("Orthanc") or next(
        (p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.access(p, os.X_OK)), None
    )
    if exe is None:
        return None
    for d in ORTHANC_PLUGIN_DIRS:
        found = sorted(glob.glob(os.path.join(d, "libOrthancDicomWeb.so*")))
        if found:
            return exe, found[0]
    return None


class OrthancServer(Server):
    """Debian's Orthanc with its DICOMweb plugin, default settings except as configured here."""

    name = "Orthanc"

    def __init__(self, executable: str, plugin: str) -> None:
        super().__init__()
        self.executable = executable
        self.plugin = plugin
        self.plugin_version = "?"
        self.config = {
            "Name": "carina-bench",
            "StorageDirectory": str(self.tmp / "storage"),
            "IndexDirectory": str(self.tmp / "index"),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            # Carina stores files as received; so should Orthanc.
            "StorageCompression": False,
            "Plugins": [plugin],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }

    @property
    def dicomweb(self) -> str:
        """The DICOMweb root URL."""
        return f"{self.base}/dicom-web"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        path = self.tmp / "orthanc.json"
        path.write_text(json.dumps(self.config, indent=2))
        return [self.executable, str(path)], dict(os.environ)

    def _ready(self) -> bool:
        r = requests.get(f"{self.base}/system", timeout=2)
        if r.status_code != 200:
            return False
        self.version = str(r.json().get("Version", "?"))
        p = requests.get(f"{self.base}/plugins/dicom-web", timeout=2)
        if p.status_code == 200:
            self.plugin_version = str(p.json().get("Version", "?"))
        return True
