"""Start and stop modelcast services as separate processes (demo, benchmarks, tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from adapters.tls import client_context

from .wait import wait_until


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def modelcast_argv(*args: str) -> list[str]:
    """argv that runs the modelcast CLI with this interpreter, installed or not."""
    return [sys.executable, "-m", "modelcast_cli", *args]


class ServiceProcess:
    """A modelcast service in its own process, ready once its health URL answers.

    ``url`` is the base URL clients use (by default, the health URL's scheme and address).
    An https health URL is checked against the system's roots plus ``ca``.
    The process can be started again after a stop (a restart, on the same port).
    """

    def __init__(self, argv: list[str], health_url: str, log_path: Path | None = None,
                 env: dict[str, str] | None = None, name: str = "service", url: str | None = None,
                 ca: Path | None = None):
        self.argv = argv
        self.health_url = health_url
        self.ca = ca
        self._ssl = client_context(ca) if health_url.startswith("https:") else None
        self.url = url or "/".join(health_url.split("/", 3)[:3])
        self.log_path = log_path
        self.name = name
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout_s: float = 30.0) -> "ServiceProcess":
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log or subprocess.DEVNULL, stderr=subprocess.STDOUT if self._log else subprocess.DEVNULL,
            env=self.env, start_new_session=True,
        )
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until the health URL answers 200; stop the process if it does not in time."""

        def answering() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()  # closes the log
                raise RuntimeError(f"{self.name} exited with code {code} before it was ready"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(self.health_url, timeout=1, context=self._ssl) as resp:
                    return resp.status == 200
            except OSError:
                return False

        try:
            wait_until(answering, timeout_s, 0.05, f"{self.name} at {self.health_url}")
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"{self.name} not ready at {self.health_url} within {timeout_s:.0f}s"
                               + (f"; see {self.log_path}" if self.log_path else "")) from None

    def log_text(self) -> str:
        """What the process has logged so far ("" without a log file)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
