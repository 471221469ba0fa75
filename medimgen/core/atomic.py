"""Atomic file writes: a uniquely named temporary file in the target's folder, then os.replace."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: Path | str, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    Names are unique per call (two writers never share a temporary file); ``suffix`` keeps the extension
    for writers that choose the format by name (e.g. ``.png``, ``.nii.gz``)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
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
