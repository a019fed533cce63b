"""A real `mlflow server` on 127.0.0.1: what `bench` measures the client/server logging path against, what
the tests stop and restart to simulate a tracking outage, and the one writer of a sqlite store that cells in
processes of their own share (`compare --parallel`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalMlflowServer:
    """Started and stopped on the same port and sqlite store, so a restart is the same server coming back."""

    def __init__(
        self, root: Path, port: int | None = None, backend_store_uri: str | None = None, artifacts: Path | None = None
    ):
        """By default a store of its own in `root`; `backend_store_uri` and `artifacts` serve an existing one."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.root / 'server.db'}"
        self.artifacts = Path(artifacts or self.root / "artifacts")
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process = None

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
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
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
        self.process = None

    def __enter__(self) -> LocalMlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
