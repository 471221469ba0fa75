"""Memory-simulation results kept on disk, so that the next command reads what an earlier one simulated.

One small JSON file per simulated training step, named by the SHA-256 of everything that decides the
result (the caller's key: network sections, image size, micro-batch pair, checkpointing, AMP, EMA, frozen
networks, label channels) together with the versions of torch, MONAI and medimgen and the source of the
modules that build and run the simulated step. A file is written atomically; one that cannot be read,
does not parse, or records another key is ignored (and rewritten by the caller's next ``store``).

Folder: ``$MEDIMGEN_CACHE_DIR`` if set (``off`` disables the cache), else ``$XDG_CACHE_HOME/medimgen``,
else ``~/.cache/medimgen``; results go to its ``memory/`` subfolder. A folder that cannot be written
only costs the speed-up.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

CACHE_ENV = "MEDIMGEN_CACHE_DIR"
FORMAT = 2  # bump when the stored payload changes meaning
# the modules whose code decides a simulated peak (networks built, steps run, how bytes are counted)
_SOURCES = ("medimgen.planning.cuda_sim", "medimgen.models.networks", "medimgen.models.diffusion",
            "medimgen.models.labels", "medimgen.models.losses", "medimgen.models.foundation")


def cache_dir() -> Path | None:
    """The folder of cached simulations, or None when switched off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() == "off":
        return None
    if value:
        root = Path(value).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "medimgen"
    return root / "memory"


@functools.lru_cache(maxsize=1)
def _versions() -> str:
    import importlib.util
    from importlib.metadata import version

    from medimgen import __version__

    code = hashlib.sha256()
    for name in _SOURCES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            code.update(Path(spec.origin).read_bytes())
    return f"format {FORMAT}, torch {version('torch')}, monai {version('monai')}, medimgen {__version__}, " \
           f"code {code.hexdigest()[:16]}"  # versions as installed: importing MONAI would cost a second


def key_text(key) -> str:
    """The text a key is stored under: its repr (frozen dataclasses, tuples, numbers) and the versions."""
    return f"{_versions()} | {key!r}"


def _path(text: str) -> Path | None:
    folder = cache_dir()
    if folder is None:
        return None
    return folder / f"{hashlib.sha256(text.encode()).hexdigest()}.json"


def load(key) -> dict | None:
    """The payload stored for ``key``, or None (absent, unreadable, corrupt, or another key's)."""
    text = key_text(key)
    path = _path(text)
    if path is None:
        return None
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != text or not isinstance(entry.get("result"), dict):
        return None
    return entry["result"]


def store(key, result: dict) -> None:
    """Keep ``result`` (JSON-able) for ``key``, atomically; a folder that cannot be written is skipped."""
    from medimgen.core.atomic import write_json_atomic

    text = key_text(key)
    path = _path(text)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"key": text, "result": result})
    except OSError:
        pass
