"""A throw-away PostgreSQL server on loopback for tests (Debian's postgresql package, initdb + pg_ctl).

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` system user (runuser). Whatever is
missing (the server binaries, the psycopg2 driver, a user to run as) becomes a skip reason, never a failure.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name)
                  if Path(d).parent.name.isdigit() else 0)
    return Path(dirs[-1]) if dirs and (Path(dirs[-1]) / "pg_ctl").exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing() -> str | None:
    """Why no server can be started here (None: it can)."""
    if importlib.util.find_spec("psycopg2") is None:
        return "psycopg2 is not installed (pip install 'medimgen[postgres]')"
    if _bin_dir() is None:
        return "no PostgreSQL server binaries (apt-get install postgresql; .ci/run does)"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root without runuser"
    return None


@contextmanager
def postgres_server(databases=("optuna",)):
    """Start a server on 127.0.0.1 (a free port, trust authentication, data in a temporary folder); yields
    {database name: SQLAlchemy URL}; stops the server and removes the folder afterwards."""
    bindir = _bin_dir()
    root = Path(tempfile.mkdtemp(prefix="medimgen-pg-"))
    as_root = os.geteuid() == 0
    if as_root:
        shutil.chown(root, "postgres", "postgres")
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, capture_output=True, text=True, cwd=root)

    data, port = root / "data", _free_port()
    try:
        try:
            run(str(bindir / "initdb"), "-D", str(data), "-U", "medimgen", "-A", "trust", "--no-sync", "-E", "UTF8")
            run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "start",
                "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100")
            for db in databases:
                run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "medimgen", db)
        except subprocess.CalledProcessError as e:
            log = (root / "server.log").read_text()[-2000:] if (root / "server.log").exists() else ""
            raise RuntimeError(f"{e.cmd[len(prefix)]} failed: {e.stderr.strip()[-2000:]} {log}") from None
        yield {db: f"postgresql+psycopg2://medimgen@127.0.0.1:{port}/{db}" for db in databases}
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, cwd=root)
        shutil.rmtree(root, ignore_errors=True)
