"""A real-anatomy nnU-Net raw dataset, built at benchmark time from head MRI that ships in public packages.

    python benchmarks/real_anatomy.py --out RAW_FOLDER [--id 801] [--cases 24] [--spacing 3.5] [--cache DIR]
    python benchmarks/real_anatomy.py --copy-sources DIR   # only the 7 source files, for an offline machine

Sources (fetched into ``--cache``, default ~/.cache/medimgen-bench, never into the repository):
- ``pip download --no-deps nilearn``: the MNI152 2009a symmetric T1 template with its grey- and white-matter
  probability maps (197x233x189, 1 mm; an average of 152 heads).
- ``apt-get download mricron-data``: Colin27 (``ch2.nii.gz``, one subject scanned 27 times, 181x217x181, 1 mm) and
  its brain-extracted copy ``ch2bet.nii.gz``.
- ``apt-get download insighttoolkit5-examples``: ``KmeansTest_T1UCharRaw.nii.gz`` (one T1 head, 128x128x62 at
  2x2x3 mm) and its skull-stripped mask ``KmeansTest_T1RawSkullStrip.nii.gz``.

Labels (the same four classes for every source): 0 background, 1 grey matter, 2 white matter, 3 other head tissue
(CSF, skull, scalp, ...). MNI: the probability maps >= 0.5 (the larger one wins). Colin27 and the ITK head have no
tissue map: inside their brain mask a 3-cluster k-means of the T1 intensities gives CSF (-> other) / GM / WM, which
is approximate (partial volume, no bias correction). "Other" is the head mask (T1 above 10 % of its 99th
percentile, holes filled) outside GM and WM.

Cases: the sources in turn; each case is a random crop (80-95 % of the head's bounding box per axis, random
offset) of one source, optionally mirrored left-right, resampled to ``--spacing`` mm (x0.85-1.15 per axis,
slightly anisotropic) and intensity-varied (gamma 0.7-1.4, a smooth multiplicative bias field of +-15 %, a scale of
200-1200, 1 % Gaussian noise). nnU-Net's 2d configuration trains on the axial slices of these volumes (hundreds
of distinct slices at the default size), its 3d_fullres configuration on the volumes (3D crops).

Limits: three heads (one of them an average), so the dataset tests anatomy, geometry, units and label-following,
not population diversity; variety comes only from the crops, mirroring, resampling and intensity changes. Two of
the three label maps are intensity clusters, not expert segmentations. No pathology.
"""

from __future__ import annotations

import argparse
import glob
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CACHE = Path.home() / ".cache" / "medimgen-bench"
LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2, "other": 3}
MNI = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
COLIN = "usr/share/mricron/templates/{}.nii.gz"
ITK = "usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_{}.nii.gz"
FILES = [MNI.format("t1"), MNI.format("gm"), MNI.format("wm"), COLIN.format("ch2"), COLIN.format("ch2bet"),
         ITK.format("T1UCharRaw"), ITK.format("T1RawSkullStrip")]


class FetchError(RuntimeError):
    """The public packages could not be downloaded (no registry reachable)."""


def fetch_sources(cache: Path = CACHE) -> Path:
    """Download and unpack the three packages into ``cache`` (once); return the folder holding ``FILES``."""
    root = cache / "extracted"
    if all((root / f).is_file() for f in FILES):
        return root
    cache.mkdir(parents=True, exist_ok=True)
    root.mkdir(exist_ok=True)
    if not glob.glob(str(cache / "nilearn-*.whl")):
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "nilearn", "-d", str(cache)], "pip download nilearn")
    for pkg in ("mricron-data", "insighttoolkit5-examples"):
        if not glob.glob(str(cache / f"{pkg}_*.deb")):
            _run(["apt-get", "download", pkg], f"apt-get download {pkg}", cwd=cache)
    with zipfile.ZipFile(sorted(glob.glob(str(cache / "nilearn-*.whl")))[-1]) as wheel:
        for kind in ("t1", "gm", "wm"):
            wheel.extract(MNI.format(kind), root)
    for deb in ("mricron-data", "insighttoolkit5-examples"):
        _run(["dpkg-deb", "-x", sorted(glob.glob(str(cache / f"{deb}_*.deb")))[-1], str(root)], f"dpkg-deb -x {deb}")
    missing = [f for f in FILES if not (root / f).is_file()]
    if missing:
        raise FetchError(f"the packages did not contain {missing[0]}")
    return root


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"{what} failed: {e}") from None
    if out.returncode != 0:
        raise FetchError(f"{what} failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")


def copy_sources(dest: Path, cache: Path = CACHE) -> Path:
    """Copy only the seven source files (~12 MB) into ``dest/extracted`` (a cache for a machine without a registry,
    e.g. carried to a lent GPU): ``--cache dest`` there finds them without downloading."""
    import shutil

    root = fetch_sources(cache)
    for f in FILES:
        (Path(dest) / "extracted" / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, Path(dest) / "extracted" / f)
    return Path(dest)


@dataclass
class Head:
    name: str
    image: np.ndarray  # float32, RAS voxel order
    labels: np.ndarray  # uint8, LABELS values
    spacing: tuple[float, float, float]  # mm, RAS axes


def _canonical(path: Path):
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asanyarray(img.dataobj).astype(np.float32), tuple(float(z) for z in img.header.get_zooms()[:3])


def head_mask(t1: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    mask = t1 > 0.1 * np.percentile(t1, 99)
    mask = ndimage.binary_closing(mask, iterations=2)
    return ndimage.binary_fill_holes(mask)


def kmeans_tissue(t1: np.ndarray, brain: np.ndarray, iterations: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """GM and WM masks from a 3-cluster k-means of the T1 intensities inside ``brain`` (CSF < GM < WM)."""
    values = t1[brain]
    centres = np.percentile(values, [15, 50, 85]).astype(np.float64)
    for _ in range(iterations):
        cluster = np.abs(values[:, None] - centres[None]).argmin(1)
        centres = np.array([values[cluster == k].mean() if (cluster == k).any() else centres[k] for k in range(3)])
    cluster = np.abs(t1[..., None] - centres).argmin(-1)
    return brain & (cluster == 1), brain & (cluster == 2)


def _labels(head: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    out = np.zeros(head.shape, np.uint8)
    out[head] = LABELS["other"]
    out[gm] = LABELS["grey_matter"]
    out[wm] = LABELS["white_matter"]
    return out


def load_heads(root: Path) -> list[Head]:
    t1, sp = _canonical(root / MNI.format("t1"))
    gm, wm = (_canonical(root / MNI.format(k))[0] / 255.0 for k in ("gm", "wm"))
    mni = Head("mni152", t1, _labels(head_mask(t1), (gm >= 0.5) & (gm > wm), (wm >= 0.5) & (wm >= gm)), sp)
    heads = [mni]
    for name, t1_file, brain_file in (("colin27", COLIN.format("ch2"), COLIN.format("ch2bet")),
                                      ("itk_t1", ITK.format("T1UCharRaw"), ITK.format("T1RawSkullStrip"))):
        t1, sp = _canonical(root / t1_file)
        brain = _canonical(root / brain_file)[0] > 0
        g, w = kmeans_tissue(t1, brain)
        heads.append(Head(name, t1, _labels(head_mask(t1) | brain, g, w), sp))
    return heads


def _bias_field(shape, rng: np.random.Generator, strength: float = 0.15) -> np.ndarray:
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    field = sum(rng.uniform(-1, 1) * g for g in grids) + sum(rng.uniform(-0.5, 0.5) * g * g for g in grids)
    field = field / max(1e-6, np.abs(field).max())
    return (1 + strength * field).astype(np.float32)


def make_case(head: Head, spacing: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, tuple]:
    """One random crop of ``head``, mirrored or not, resampled and intensity-varied: (image, labels, spacing)."""
    from scipy import ndimage

    nz = np.argwhere(head.labels > 0)
    lo, hi = nz.min(0), nz.max(0) + 1
    start, stop = [], []
    for a in range(3):
        extent = hi[a] - lo[a]
        size = int(round(extent * rng.uniform(0.80, 0.95)))
        s = lo[a] + int(rng.integers(0, extent - size + 1))
        start.append(s)
        stop.append(s + size)
    box = tuple(slice(s, e) for s, e in zip(start, stop))
    image, labels = head.image[box], head.labels[box]
    if rng.random() < 0.5:  # left-right mirror (RAS axis 0)
        image, labels = image[::-1], labels[::-1]
    target = tuple(spacing * rng.uniform(0.85, 1.15) for _ in range(3))
    zoom = [s / t for s, t in zip(head.spacing, target)]
    image = ndimage.zoom(np.ascontiguousarray(image), zoom, order=1)
    labels = ndimage.zoom(np.ascontiguousarray(labels), zoom, order=0)
    p99 = max(1e-6, float(np.percentile(image, 99)))
    image = np.clip(image / p99, 0, None) ** rng.uniform(0.7, 1.4)
    image = image * _bias_field(image.shape, rng)
    image = image * rng.uniform(200, 1200)
    image = image + rng.normal(0, 0.01 * float(image.max()), image.shape)
    return np.clip(image, 0, None).astype(np.float32), labels.astype(np.uint8), target


def build_dataset(out: Path | str, dataset_id: int = 801, num_cases: int = 24, spacing: float = 3.5, seed: int = 0,
                  cache: Path = CACHE, name: str = "RealHeads", echo=print) -> Path:
    """Write ``out/DatasetXXX_<name>`` (imagesTr, labelsTr, dataset.json) from the public heads; return it."""
    import nibabel as nib
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if num_cases < 3:
        raise ValueError("num_cases must be at least 3 (one per head)")
    folder = Path(out) / f"Dataset{int(dataset_id):03d}_{name}"
    if (folder / "dataset.json").is_file():
        echo(f"real-anatomy dataset already at {folder}")
        return folder
    heads = load_heads(fetch_sources(cache))
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    slices = 0
    for i in range(num_cases):
        head = heads[i % len(heads)]
        image, labels, sp = make_case(head, spacing, rng)
        affine = np.diag([*sp, 1.0])
        case = f"{head.name}_{i:03d}"
        nib.save(nib.Nifti1Image(image, affine), folder / "imagesTr" / f"{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), folder / "labelsTr" / f"{case}.nii.gz")
        slices += image.shape[2]
    generate_dataset_json(str(folder), channel_names={"0": "MRI"}, labels=LABELS, num_training_cases=num_cases,
                          file_ending=".nii.gz", dataset_name=folder.name,
                          description="real head MRI (MNI152 2009a, Colin27, ITK example T1) from public packages, "
                                      "cropped, resampled and intensity-varied by medimgen's benchmarks/real_anatomy.py")
    echo(f"wrote {num_cases} cases ({slices} axial slices) from {', '.join(h.name for h in heads)} to {folder}")
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="nnU-Net raw folder to write DatasetXXX_RealHeads into")
    ap.add_argument("--copy-sources", type=Path, default=None, help="only copy the source files into this cache folder")
    ap.add_argument("--id", type=int, default=801)
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--spacing", type=float, default=3.5, help="mm; 3.5 gives ~45x55x45 volumes (CPU), 1.5 for a GPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=CACHE)
    a = ap.parse_args()
    if not a.out and not a.copy_sources:
        ap.error("give --out (build the dataset) or --copy-sources")
    try:
        if a.copy_sources:
            print(f"source files copied to {copy_sources(a.copy_sources, a.cache)}")
            return
        build_dataset(a.out, a.id, a.cases, a.spacing, a.seed, a.cache)
    except FetchError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
