"""A Redis server of its own for tests and benchmarks: ``redis-server`` on a free port in a temporary directory.

Debian's ``redis-server`` package (``make test`` installs it) puts the program on PATH.
The server listens on 127.0.0.1 only, without persistence (no RDB, no AOF), so a
:meth:`RedisServer.restart` is a Redis that lost its data, as after a crash of a cache.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .procs import free_port


def redis_server_bin() -> str | None:
    """The ``redis-server`` program, or None where it is not installed."""
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if Path(p).exists()), None)


class RedisServer:
    """One ``redis-server`` process; ``url`` is ``redis://127.0.0.1:PORT/0``."""

    def __init__(self, work_dir: Path | None = None, port: int | None = None) -> None:
        binary = redis_server_bin()
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server; make test does)")
        self.binary = binary
        self._tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="modelcast-redis-")
        self.dir = Path(work_dir or self._tmp.name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        log = open(self.dir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.dir / 'redis.log'}")
            if self.ping():
                return self
            time.sleep(0.05)
        raise TimeoutError(f"redis-server did not answer on port {self.port} within {timeout_s} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """SIGKILL: the data (kept only in memory) is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port, empty."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
