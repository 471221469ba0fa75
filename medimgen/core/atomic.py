"""Atomic file writes: a uniquely named temporary file in the target's folder, then os.replace; and a file lock
for read-modify-write of one file by several processes (:func:`file_lock`).

The temporary file gets the mode an ordinary ``open()`` would give (0666 less the umask) before the rename:
``mkstemp`` makes it 0600, and a renamed 0600 file would be unreadable to the group and others whatever the
user's umask says. A failed write (a full disk included) removes the temporary file: no 0-byte or
half-written file is ever left under the target's name.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from medimgen.core.errors import MedimgenError


def umask() -> int:
    """The process's umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def write_failure(e: Exception, path: Path | str) -> OSError:
    """An OSError for a writer's non-OSError failure (torch's C++ writer, SimpleITK raise RuntimeError): ENOSPC
    where the disk is (nearly) full, so that :func:`disk_error` names the folder and its free space."""
    import shutil

    try:
        full = shutil.disk_usage(Path(path).parent).free < 64 * 2**20
    except OSError:
        full = False
    text = str(e).strip().splitlines()[-1][:160] if str(e).strip() else type(e).__name__
    return OSError(errno.ENOSPC if full else errno.EIO, text, str(path))


def disk_error(e: OSError, path: Path | str) -> MedimgenError:
    """One line for a write that failed: the folder, and for a full disk the space there was."""
    import shutil

    folder = Path(path).parent
    if e.errno == errno.ENOSPC:
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        room = f" ({free / 1e6:.1f} MB free there)" if free is not None else ""
        return MedimgenError(f"no space left on the device of {folder}{room}: free space there and run again "
                             f"(nothing was left half-written)")
    return MedimgenError(f"cannot write {path} ({e.strerror or type(e).__name__})")


@contextmanager
def atomic_path(path: Path | str, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    Names are unique per call (two writers never share a temporary file); ``suffix`` keeps the extension
    for writers that choose the format by name (e.g. ``.png``, ``.nii.gz``). An OSError of the write (no
    space, no permission) becomes one line naming the folder."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as e:
        raise disk_error(e, path) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise disk_error(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path | str, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: Path | str, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path | str, obj) -> Path:
    return write_bytes_atomic(path, json.dumps(obj).encode())


def backup_name(path: Path | str) -> Path:
    """A hidden, unused name beside ``path`` for the previous version of a file or folder (nnU-Net and the
    planner never read a hidden name as a dataset)."""
    import time

    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f".{path.name}.backup-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f".{path.name}.backup-{stamp}-{n}")
    return candidate


def publish_folder(tmp: Path, out: Path, force: bool, option: str = "--force") -> Path | None:
    """Rename the finished folder ``tmp`` to ``out``. An existing ``out`` is refused unless ``force``; then it is
    renamed to a backup first (returned), never merged into or deleted; a failed rename puts it back."""
    tmp, out = Path(tmp), Path(out)
    backup = None
    if out.exists() or out.is_symlink():
        if not force:
            raise MedimgenError(f"{out} already exists: choose another dataset id or name, or pass {option} "
                                f"(the existing folder is kept as a backup)")
        backup = backup_name(out)
        out.rename(backup)
    try:
        tmp.rename(out)
    except BaseException:
        if backup is not None:
            backup.rename(out)
        raise
    return backup


def check_output_folder(folder: Path | str, what: str = "output folder") -> Path:
    """Refuse, before any long work, an output folder that cannot be made or written: its nearest existing
    ancestor must be a writable folder (nothing is created here)."""
    folder = Path(folder)
    probe = folder.absolute()
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise MedimgenError(f"{what} {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK) or str(probe.resolve()).startswith(("/proc", "/sys")):
        raise MedimgenError(f"{what} {folder} cannot be created or written ({probe} is not writable)")
    return folder


@contextmanager
def scratch_folder(path: Path | str) -> Iterator[Path]:
    """A fresh hidden working folder ``path`` (its parent is a root like nnUNet_raw), removed on failure together
    with every trace of it: the parent's modification time is put back, so a refused import or demo dataset
    leaves the root exactly as it was. On success the caller has renamed it (see :func:`publish_folder`)."""
    import shutil

    path = Path(path)
    parent = path.parent
    stat = parent.stat() if parent.exists() else None
    shutil.rmtree(path, ignore_errors=True)
    try:
        yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        if stat is not None:
            try:
                os.utime(parent, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            except OSError:
                pass
        raise


@contextmanager
def file_lock(path: Path | str) -> Iterator[None]:
    """An exclusive OS lock (``flock``) on the lock file ``path`` for the block, waiting for another holder; the OS
    drops it when its process ends, however it ends. Without flock (Windows) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
