"""Pretrained weights: where each network's files live in the torch hub cache, whether they are there,
and ``medimgen weights download`` to fetch them.

Everything lives in ``torch.hub.get_dir()`` (``$TORCH_HOME/hub``, default ``~/.cache/torch/hub``),
exactly where the libraries that load them look:

- torchvision ImageNet classifiers (AlexNet/VGG16/SqueezeNet for MONAI's LPIPS perceptual loss,
  InceptionV3 for FID): ``hub/checkpoints/<file name of the torchvision URL>``; the file name
  carries the first hex digits of the file's sha256 (torch.hub's convention), checked on download.
- foundation autoencoders (``autoencoder.source``, medimgen.models.foundation): ``hub/checkpoints/<file>``, e.g.
  MAISI's VAE as ``hub/checkpoints/nv-generate-ct_autoencoder_v1.pt`` (``medimgen weights download maisi-vae``).
  No sha256 of it is published where medimgen could pin it offline, so the download is checked against the sha256
  the Hugging Face hub itself states for the file (its ``X-Linked-ETag`` header, the LFS object's sha256) and,
  where a mirror does not send that header, by format: a state dict that loads strictly into the published network;
  ``--checksums`` pins a sha256 of your own.
- RadImageNet / MedicalNet (MONAI's perceptual loss and medimgen's feature extractors): MONAI's
  torch.hub repository ``Project-MONAI/perceptual-models`` in ``hub/Project-MONAI_perceptual-models_main``
  and its weights in ``hub/monai_checkpoints/`` (where that repository's code looks before it
  would download from Hugging Face ``MONAI/checkpoints``).

Training and evaluation never download; only ``download_weights`` does, into ``<dest>.part``
(resumed with an HTTP Range request), verified, then renamed into place. This module imports
neither training nor evaluation (the planner uses it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from medimgen.core.errors import MedimgenError

MIRROR_ENV = "MEDIMGEN_WEIGHTS_MIRROR"
TIMEOUT_S = 30
CHUNK = 1 << 20

# torchvision weights: network name -> (torchvision builder, weights enum, URL of its IMAGENET1K_V1 weights; lpips
# uses those). The URLs are written out so that looking for a file does not import torchvision (~4 s: planning's
# notes ask); tests/test_weights.py checks them against torchvision's enums.
TORCHVISION = {
    "alex": ("alexnet", "AlexNet_Weights", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16", "VGG16_Weights", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights",
                "https://download.pytorch.org/models/squeezenet1_1-b8a52dc0.pth"),
    "inception_v3": ("inception_v3", "Inception_V3_Weights",
                     "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"),
}

# MONAI's torch.hub repository (the folder name torch.hub gives "Project-MONAI/perceptual-models:main"),
# pinned to a commit whose files are checked against these sha256s (computed from the repository's git history)
HUB_REPO = "Project-MONAI_perceptual-models_main"
HUB_REPO_COMMIT = "6ac297e49bfaeaa22c032a646512206e95cd9847"
HUB_REPO_URL = f"https://github.com/Project-MONAI/perceptual-models/archive/{HUB_REPO_COMMIT}.zip"
HUB_REPO_FILES = {
    "hubconf.py": "31bf6fb178b1aafb325f8456badd26acf16ce401ddd081db8bfe891205f0ffae",
    "medicalnet/resnet.py": "3dc09033099addeee952f5c8e55261c43bcdb4eb8f2b9a95f2398f24ac29599b",
    "radimagenet/resnet.py": "62de059159086b326da972ddacdcd8d9f4d1de6b09f0eceb3c2517119de3685e",
}
# weights the repository's entry points load: network -> file in Hugging Face MONAI/checkpoints
HUB_WEIGHTS = {
    "radimagenet_resnet50": "RadImageNet-ResNet50_notop.pth",
    "medicalnet_resnet10_23datasets": "medicalnet_resnet_10_23dataset.pth",
    "medicalnet_resnet50_23datasets": "medicalnet_resnet50_23datasets.pth",
}
HF_BASE = "https://huggingface.co/MONAI/checkpoints/resolve/main/"
# foundation autoencoders: network name -> its autoencoder.source (medimgen.models.foundation has URL and file)
FOUNDATION_WEIGHTS = {"maisi_vae": "maisi"}
HF_SHA256_HEADER = "X-Linked-ETag"  # the Hugging Face hub's sha256 of an LFS file, on its resolve URL

# what `medimgen weights download NAME` fetches: NAME -> networks
GROUPS = {
    "alex": ("alex",),
    "vgg": ("vgg",),
    "squeeze": ("squeeze",),
    "radimagenet": ("radimagenet_resnet50",),
    "medicalnet": ("medicalnet_resnet10_23datasets", "medicalnet_resnet50_23datasets"),
    "inception": ("inception_v3",),
    "maisi-vae": ("maisi_vae",),
}


def hub_dir() -> Path:
    """The torch hub cache: ``$TORCH_HOME/hub`` (``torch.hub.get_dir()``)."""
    import torch

    return Path(torch.hub.get_dir())


def checkpoint_path(url: str) -> Path:
    """Where torch.hub's ``load_state_dict_from_url`` keeps the file of ``url``."""
    return hub_dir() / "checkpoints" / url.rsplit("/", 1)[-1]


def torchvision_weights_file(network: str) -> tuple[Path, str]:
    """(expected local path, download URL) of the torchvision weights for ``network``
    (alex, vgg, squeeze as lpips loads them; inception_v3)."""
    url = TORCHVISION[network][2]
    return checkpoint_path(url), url


def hub_repo_dir() -> Path:
    """MONAI's perceptual-models torch.hub repository folder in the hub cache."""
    return hub_dir() / HUB_REPO


def hub_repo_present() -> bool:
    return (hub_repo_dir() / "hubconf.py").is_file()


def hub_weights_path(network: str) -> Path:
    """Where ``medimgen weights download`` puts a RadImageNet/MedicalNet weights file (the repository's own cache)."""
    return hub_dir() / "monai_checkpoints" / HUB_WEIGHTS[network]


def find_hub_weights(network: str) -> Path | None:
    """The RadImageNet/MedicalNet weights file on disk, wherever a version of the repository's code put it."""
    name = HUB_WEIGHTS[network]
    hub = hub_dir()
    candidates = [hub_weights_path(network)]
    if network == "radimagenet_resnet50":
        candidates.append(hub / name)
    # older repository versions went through huggingface_hub's cache layout
    candidates += sorted((hub / "models--MONAI--checkpoints" / "snapshots").glob(f"*/{name}"))
    return next((p for p in candidates if p.is_file()), None)


def group_of(network: str) -> str:
    """The ``medimgen weights download`` name that fetches ``network``'s weights."""
    for group, networks in GROUPS.items():
        if network in networks:
            return group
    raise MedimgenError(f"no downloadable weights for {network!r}: choose one of {', '.join(GROUPS)}")


def download_command(network: str) -> str:
    return f"medimgen weights download {group_of(network)}"


def missing_weights(network: str) -> list[Path]:
    """The files/folders ``network`` needs that are not on disk (empty: ready; 'none' needs nothing)."""
    if network == "none":
        return []
    if network in TORCHVISION:
        path, _ = torchvision_weights_file(network)
        return [] if path.is_file() else [path]
    if network in HUB_WEIGHTS:
        missing = [] if hub_repo_present() else [hub_repo_dir()]
        return missing + ([] if find_hub_weights(network) else [hub_weights_path(network)])
    if network in FOUNDATION_WEIGHTS:
        from medimgen.models.foundation import weights_path

        path = weights_path(FOUNDATION_WEIGHTS[network])
        return [] if path.is_file() else [path]
    raise MedimgenError(f"unknown network {network!r}: choose one of {', '.join([*TORCHVISION, *HUB_WEIGHTS, *FOUNDATION_WEIGHTS])}")


def weights_present(network: str) -> bool:
    return not missing_weights(network)


# --- what to download ------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightFile:
    """One download: ``url`` -> ``dest`` (a file, or a folder for the hub repository)."""

    name: str  # file name (the key of a --checksums file)
    url: str
    dest: Path
    sha256: str | None = None  # full expected sha256 of the downloaded file
    hash_prefix: str | None = None  # torch.hub convention: the hex digits in the file name
    repo: bool = False  # a zip of the hub repository, extracted to dest
    state_dict_key: str | None = None  # format check where no checksum is published
    foundation: str | None = None  # an autoencoder.source: the file must load strictly into its published network
    sha256_header: str | None = None  # response header of ``url`` stating the file's sha256 (Hugging Face LFS)

    @property
    def check(self) -> str:
        if self.sha256:
            return "sha256"
        if self.hash_prefix:
            return f"sha256 prefix {self.hash_prefix} (torch.hub)"
        if self.repo:
            return "sha256 of hubconf.py and the network code"
        if self.foundation:
            return "format: a state dict of the published network (no sha256 stated by the server)"
        return "format: a PyTorch state dict (no published checksum)"

    def present(self) -> Path | None:
        if self.repo:
            return self.dest if (self.dest / "hubconf.py").is_file() else None
        if self.dest.is_file():
            return self.dest
        network = next((n for n, f in HUB_WEIGHTS.items() if f == self.name), None)
        return find_hub_weights(network) if network else None


def _hash_prefix(file_name: str) -> str | None:
    from torch.hub import HASH_REGEX

    m = HASH_REGEX.search(file_name)
    return m.group(1) if m and m.group(1) else None


def weight_files(network: str) -> list[WeightFile]:
    """What ``network`` needs, in download order."""
    if network in TORCHVISION:
        dest, url = torchvision_weights_file(network)
        return [WeightFile(dest.name, url, dest, hash_prefix=_hash_prefix(dest.name))]
    if network in FOUNDATION_WEIGHTS:
        from medimgen.models.foundation import foundation, weights_path

        f = foundation(FOUNDATION_WEIGHTS[network])
        dest = weights_path(f.source)
        return [WeightFile(dest.name, f.url, dest, foundation=f.source, sha256_header=HF_SHA256_HEADER)]
    name = HUB_WEIGHTS[network]
    return [WeightFile(f"perceptual-models-{HUB_REPO_COMMIT[:7]}.zip", HUB_REPO_URL, hub_repo_dir(), repo=True),
            WeightFile(name, HF_BASE + name, hub_weights_path(network),
                       state_dict_key="state_dict" if network.startswith("medicalnet") else None)]


def resolve_targets(names: Iterable[str]) -> list[str]:
    """Download names (alex, ..., all; also network names such as radimagenet_resnet50) -> networks."""
    networks: list[str] = []
    for name in names:
        if name == "all":
            found = [n for g in GROUPS.values() for n in g]
        elif name in GROUPS:
            found = list(GROUPS[name])
        elif name in TORCHVISION or name in HUB_WEIGHTS or name in FOUNDATION_WEIGHTS:
            found = [name]
        else:
            raise MedimgenError(f"unknown weights {name!r}: choose from {', '.join(GROUPS)}, all")
        networks += [n for n in found if n not in networks]
    return networks


# --- list ----------------------------------------------------------------------------------------


def weights_report() -> str:
    """`medimgen weights list`: per download name, each file: present or missing, where it is expected, the command."""
    lines = [f"torch hub cache: {hub_dir()} (TORCH_HOME/hub)"]
    for group, networks in GROUPS.items():
        files = list({f.dest: f for n in networks for f in weight_files(n)}.values())
        found = [f.present() for f in files]
        state = "present" if all(found) else "missing"
        lines.append(f"{group:<12} {state}" + ("" if all(found) else f"  -> medimgen weights download {group}"))
        for f, at in zip(files, found):
            repo = "  (torch.hub repository)" if f.repo else ""
            lines.append(f"    {'ok  ' if at else '--  '}{at or f.dest}{repo}")
    lines.append("all at once: medimgen weights download all (over 1 GB); a mirror: --mirror URL or "
                 f"{MIRROR_ENV}=URL; offline machine: copy this hub folder from a machine that has them")
    return "\n".join(lines)


# --- download -----------------------------------------------------------------------------------


def _mirrored(url: str, mirror: str | None) -> str:
    """``url`` with its scheme and host replaced by ``mirror`` (which may carry a path prefix)."""
    if not mirror:
        return url
    m = urllib.parse.urlsplit(mirror)
    if m.scheme not in ("http", "https") or not m.netloc:
        raise MedimgenError(f"weights mirror must be an http(s) URL such as http://host:8000/prefix, got {mirror!r}")
    u = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((m.scheme, m.netloc, m.path.rstrip("/") + u.path, u.query, ""))


def read_checksums(path: Path | str) -> dict[str, str]:
    """A ``sha256sum``-style file (``<hex>  <file name>`` per line) -> {file name: sha256}."""
    out = {}
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise MedimgenError(f"cannot read checksums file {path}: {e.strerror or e}") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        digest = parts[0].lower()
        if len(parts) != 2 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise MedimgenError(f"{path}:{n}: expected '<sha256>  <file name>', got {line.strip()!r}")
        out[Path(parts[1].strip().lstrip("*")).name] = digest
    return out


def _one_line(text: object) -> str:
    return " ".join(str(text).split())[:200]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, part: Path, label: str, progress: bool | None) -> None:
    """Download ``url`` into ``part``, continuing a partial ``part`` with a Range request."""
    from tqdm import tqdm

    from medimgen import __version__

    for attempt in range(2):
        have = part.stat().st_size if part.is_file() else 0
        req = urllib.request.Request(url, headers={"User-Agent": f"medimgen/{__version__}"})
        if have:
            req.add_header("Range", f"bytes={have}-")
        try:
            resp = urllib.request.urlopen(req, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have and attempt == 0:  # the partial file does not fit the server's: start over
                part.unlink()
                continue
            raise
        with resp:
            resumed = bool(have) and resp.status == 206
            start = have if resumed else 0
            length = resp.headers.get("Content-Length")
            total = start + int(length) if length and length.isdigit() else None
            with open(part, "ab" if resumed else "wb") as f, tqdm(
                    total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                    disable=None if progress is None else not progress, leave=False) as bar:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        if total is not None and part.stat().st_size != total:
            raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")
        return


def _verify(entry: WeightFile, part: Path, url: str) -> None:
    """Checksum (or, where none is published, format); a bad file is removed."""
    def bad(why: str) -> MedimgenError:
        part.unlink(missing_ok=True)
        return MedimgenError(f"{entry.name} from {url} {why}; the file was removed")

    if entry.sha256 or entry.hash_prefix:
        digest = _sha256(part)
        if entry.sha256 and digest != entry.sha256:
            raise bad(f"has sha256 {digest}, expected {entry.sha256} (checksum mismatch)")
        if not entry.sha256 and not digest.startswith(entry.hash_prefix):
            raise bad(f"has sha256 {digest[:16]}..., expected a sha256 starting {entry.hash_prefix} "
                      f"(checksum mismatch)")
        return
    if entry.repo:
        try:
            with zipfile.ZipFile(part) as z:
                tops = {n.split("/", 1)[0] for n in z.namelist()}
                if len(tops) != 1:
                    raise bad("is not a repository archive (expected one top folder)")
                top = tops.pop()
                for rel, want in HUB_REPO_FILES.items():
                    try:
                        got = hashlib.sha256(z.read(f"{top}/{rel}")).hexdigest()
                    except KeyError:
                        raise bad(f"lacks {rel}") from None
                    if got != want:
                        raise bad(f"has {rel} with sha256 {got[:16]}..., expected {want[:16]}... (checksum mismatch)")
        except zipfile.BadZipFile:
            raise bad("is not a zip archive") from None
        return
    import torch

    try:
        try:
            obj = torch.load(part, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            obj = torch.load(part, map_location="cpu", weights_only=True)
    except Exception as e:
        raise bad(f"is not a PyTorch weights file ({type(e).__name__}: {_one_line(e)})") from None
    if not isinstance(obj, dict) or (entry.state_dict_key and entry.state_dict_key not in obj):
        key = f" (no '{entry.state_dict_key}')" if entry.state_dict_key else ""
        raise bad(f"is not the expected state dict{key}")
    if entry.foundation:
        from medimgen.models.foundation import build_foundation_autoencoder, read_state_dict

        try:
            build_foundation_autoencoder(entry.foundation).load_state_dict(read_state_dict(part))
        except (RuntimeError, MedimgenError) as e:
            raise bad(f"does not fit the published network ({_one_line(e)[:120]})") from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the hub states the sha256 on its own (redirecting) answer, not on the CDN's


def stated_sha256(url: str, header: str) -> str | None:
    """The sha256 the server states for ``url`` in ``header`` (Hugging Face: X-Linked-ETag on the resolve URL),
    None where it states none (a mirror, a plain file server)."""
    from medimgen import __version__

    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": f"medimgen/{__version__}"})
    try:
        resp = urllib.request.build_opener(_NoRedirect).open(req, timeout=TIMEOUT_S)
        headers = resp.headers
    except urllib.error.HTTPError as e:  # the 302 to the CDN carries it
        headers = e.headers
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return None
    value = (headers.get(header) or "").strip().strip('"').lower() if headers is not None else ""
    return value if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else None


def _install(entry: WeightFile, part: Path) -> None:
    """Move a verified download into place atomically (a repository archive: extracted, then renamed)."""
    if not entry.repo:
        os.replace(part, entry.dest)
        return
    if entry.dest.exists():
        raise MedimgenError(f"{entry.dest} exists but has no hubconf.py: move it away and download again")
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.dest.name}.", dir=entry.dest.parent))
    try:
        with zipfile.ZipFile(part) as z:
            z.extractall(tmp)
        (top,) = list(tmp.iterdir())
        os.rename(top, entry.dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    part.unlink()


def download_file(entry: WeightFile, mirror: str | None = None, progress: bool | None = None) -> tuple[Path, str]:
    """Fetch one entry into place: ``<dest>.part`` (resumed if present), verified, renamed at the end; (its path,
    how it was verified)."""
    url = _mirrored(entry.url, mirror)
    if entry.sha256_header and not entry.sha256:
        digest = stated_sha256(url, entry.sha256_header)
        if digest:
            entry = dataclasses.replace(entry, sha256=digest)
    entry.dest.parent.mkdir(parents=True, exist_ok=True)
    part = entry.dest.parent / (f"{entry.name}.part" if entry.repo else f"{entry.dest.name}.part")
    try:
        _fetch(url, part, entry.name, progress)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError) else e
        kept = f"; the {part.stat().st_size} bytes fetched are kept in {part} to resume" \
            if part.is_file() and part.stat().st_size else ""
        raise MedimgenError(
            f"cannot download {entry.name} from {url} ({_one_line(reason)}){kept}. Offline? set {MIRROR_ENV} or "
            f"--mirror to a reachable copy, or copy {hub_dir()} from a machine that has the weights") from None
    _verify(entry, part, url)
    _install(entry, part)
    return entry.dest, entry.check


def download_weights(names: Sequence[str], mirror: str | None = None, checksums: Path | str | None = None,
                     progress: bool | None = None, echo: Callable[[str], object] = print) -> list[Path]:
    """`medimgen weights download NAME...`: fetch what the named networks need into the torch hub cache.

    ``mirror`` (default ``$MEDIMGEN_WEIGHTS_MIRROR``) replaces the scheme and host of every URL;
    ``checksums`` (a sha256sum-style file) sets the expected sha256 of files by name, e.g. for a
    mirror that serves other builds. Files already present are left alone. Returns the paths."""
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    expected = read_checksums(checksums) if checksums else {}
    done: dict[Path, Path] = {}
    for network in resolve_targets(names):
        for entry in weight_files(network):
            if entry.dest in done:
                continue
            if entry.name in expected:
                entry = dataclasses.replace(entry, sha256=expected[entry.name], hash_prefix=None)
            at = entry.present()
            if at:
                echo(f"present     {at}")
            else:
                at, check = download_file(entry, mirror, progress)
                echo(f"downloaded  {at} (checked: {check})")
            done[entry.dest] = at
    return list(done.values())
