"""A PostgreSQL server of its own for tests and benchmarks: ``initdb`` + ``pg_ctl`` in a temporary directory.

Debian's ``postgresql`` package puts the server's programs in ``/usr/lib/postgresql/<v>/bin``
(not on PATH); :func:`postgres_bin` finds them.  PostgreSQL refuses to run as root, so when
we are root the cluster belongs to an unprivileged user (``postgres``, which the package
creates, else ``nobody``) and its directory is handed to that user.  The server listens on
127.0.0.1 on a free port, with its unix socket in its own directory, never the packaged
cluster's; it trusts local connections (a throwaway cluster, reachable only from here).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from .procs import free_port

SUPERUSER = "modelcast"


def postgres_bin() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl`` (the newest installed version), or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    dirs = [Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin") if (Path(d) / "initdb").exists()]
    if not dirs:
        return None

    def version(d: Path) -> tuple[int, ...]:
        try:
            return tuple(int(x) for x in d.parent.name.split("."))
        except ValueError:
            return (0,)

    return max(dirs, key=version)


def _run_as() -> pwd.struct_passwd | None:
    """The user the cluster runs as when we are root (PostgreSQL refuses root); None: ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and there is no 'postgres' or 'nobody' user to run PostgreSQL as")


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory; :meth:`start` and :meth:`stop` as often as needed.

    ``durable=False`` turns off fsync (tests: a crash of the machine loses nothing we keep);
    a clean ``pg_ctl stop`` still writes everything.
    """

    def __init__(self, *, durable: bool = False, bin_dir: Path | None = None):
        self.bin = bin_dir or postgres_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="modelcast-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.port = free_port()
        self.durable = durable
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self._pg("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8", "--locale=C",
                 "--no-sync")

    def _pg(self, program: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C", "LC_ALL": "C",
               "HOME": str(self.root), "TZ": "UTC"}
        out = subprocess.run([str(self.bin / program), *args], cwd=self.root, env=env, capture_output=True,
                             text=True, timeout=timeout, **kwargs)
        if out.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} failed ({out.returncode}): "
                               f"{(out.stderr or out.stdout).strip()[-2000:]}\n{log}")
        return out

    def start(self) -> "PostgresServer":
        options = [f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-c unix_socket_directories={self.root}",
                   "-c max_connections=200"]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", " ".join(options), "-w", "-t", "60",
                 "start")
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown: connections are cut, everything committed is kept)."""
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A new empty database ``name`` (letters, digits, '_'); its URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: letters, digits and '_' only")
        self._admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: letters, digits and '_' only")
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def close(self) -> None:
        """Stop the server if it runs and remove its directory."""
        try:
            if self.running:
                self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
