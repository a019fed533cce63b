"""A real `mlflow server` on 127.0.0.1: what `bench` measures the client/server logging path against, what
the tests stop and restart to simulate a tracking outage, and the one writer of a sqlite store that cells in
processes of their own share (`compare --parallel`)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Watches the pipe from the process that started a server: when that process ends, however it ends (SIGKILL
# included), the kernel closes its end, the read returns, and the server's process group is killed.
WATCHDOG = """
import os, signal, sys
sys.stdin.buffer.read()
try:
    os.killpg(int(sys.argv[1]), signal.SIGKILL)
except ProcessLookupError:
    pass
"""


def die_with_parent() -> None:
    """In a child between fork and exec: the kernel sends it SIGTERM when the process that started it dies
    (Linux's parent-death signal), so no cell outlives the compare that runs it."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalMlflowServer:
    """Started and stopped on the same port and sqlite store, so a restart is the same server coming back."""

    def __init__(
        self,
        root: Path,
        port: int | None = None,
        backend_store_uri: str | None = None,
        artifacts: Path | None = None,
        tied: bool = False,
    ):
        """By default a store of its own in `root`; `backend_store_uri` and `artifacts` serve an existing one.
        `tied`: the server (with its workers) ends when this process ends, however it ends."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.root / 'server.db'}"
        self.artifacts = Path(artifacts or self.root / "artifacts")
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.tied, self.watchdog = tied, None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 90.0) -> LocalMlflowServer:
        log = open(self.root / "server.log", "ab")
        self.process = subprocess.Popen(
            [
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                self.backend_store_uri,
                "--artifacts-destination",
                str(self.artifacts),
            ],
            cwd=self.root,
            # without MLflow's job runner (a huey consumer of five workers, for its GenAI jobs): runs and their
            # metrics need none of it, and on a small machine its start-up competes with the cells
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if self.tied:  # its own session too, so a signal to this process's group leaves it to do its work
            self.watchdog = subprocess.Popen(
                [sys.executable, "-c", WATCHDOG, str(self.process.pid)], stdin=subprocess.PIPE, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return self
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.2)
        self.stop()
        tail = (self.root / "server.log").read_text(errors="replace")[-1500:]
        raise RuntimeError(f"mlflow server on {self.uri} did not start: {tail}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server and its uvicorn worker
            self.process.wait(timeout=30)
        if self.watchdog is not None:
            self.watchdog.stdin.close()  # its work is done: it finds the group gone and ends
            self.watchdog.wait(timeout=30)
        self.process, self.watchdog = None, None

    def __enter__(self) -> LocalMlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
