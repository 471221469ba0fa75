"""One process per run: an OS lock (``flock``) on ``<run folder>/.lock`` for the run's lifetime.

The lock file holds the PID of the process that has the lock; the OS drops the lock when that
process ends, however it ends (kill -9 included), so a stale file never blocks a new start.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from medimgen.core.errors import MedimgenError

try:
    import fcntl
except ImportError:  # Windows: no flock; training runs unlocked, with a warning
    fcntl = None

LOCK = ".lock"


class RunLock:
    """``with RunLock(root):`` takes the lock if the folder exists; ``acquire()`` takes it, creating the folder."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.fd: int | None = None
        self.created: Path | None = None  # the outermost folder acquire() created (removed again if left empty)

    @property
    def path(self) -> Path:
        return self.root / LOCK

    def acquire(self) -> None:
        if self.fd is not None:
            return
        if not self.root.exists():
            top = self.root
            while not top.parent.exists():
                top = top.parent
            self.created = top
        self.root.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            warnings.warn(f"no file locks on this platform: nothing stops a second process from training into "
                          f"{self.root}", stacklevel=2)
            self.fd = -1  # "acquired" without a lock: warn once
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # never truncate: the holder's PID is in it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise MedimgenError(f"the run {self.root} is in use by another process (PID {holder}): wait for it to "
                                f"finish or stop it, then start again (-c continues it)") from None
        except OSError as e:  # a file system without locks (some network mounts): train, but say so
            os.close(fd)
            warnings.warn(f"cannot lock {self.path} ({e.strerror}): nothing stops a second process from "
                          f"training into the same run folder", stacklevel=2)
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None and self.fd != -1:
            try:
                os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
        self.fd = None
        self._remove_if_unused()

    def _remove_if_unused(self) -> None:
        """A new run that failed before writing anything leaves no folder behind (a retry starts clean)."""
        if self.created is None or not self.root.is_dir() or {p.name for p in self.root.iterdir()} - {LOCK}:
            return
        self.path.unlink(missing_ok=True)
        folder = self.root
        while True:
            try:
                folder.rmdir()
            except OSError:  # not empty (another run appeared meanwhile)
                break
            if folder == self.created:
                break
            folder = folder.parent
        self.created = None

    def __enter__(self) -> "RunLock":
        if self.root.is_dir():
            self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False
