"""Wall and CPU seconds of `medimgen plan`, `plan --explain` and `memory` on a preprocessed dataset.

    python benchmarks/bench_planning.py --dataset ID [--gpu-memory GB] [--edit KEY=VALUE]

The dataset must be in nnU-Net raw/preprocessed already (the demo: `medimgen demo-data` as medimgen/demo.py
makes it, then `nnUNetv2_plan_and_preprocess -d 990 -c 2d 3d_fullres`; GPU.md's recipe: see
../shared/reference/GPU.md). Each command runs in its own process, in this order, with an empty simulation
cache at the start (``MEDIMGEN_CACHE_DIR``, a fresh temporary folder):

1. `medimgen plan -d ID --force` (fresh: nothing simulated yet),
2. `medimgen plan -d ID --explain` (the config unchanged),
3. `medimgen memory ID` (unchanged),
4. `medimgen plan -d ID --explain` again (the disk table's networks are cached by the first one),
5. `medimgen memory ID` after editing one model's section of the 3D config (``--edit``, default a wider 3D
   DDPM UNet: its last level + 8 channels).

CPU seconds are the child processes' user + system time (the better figure on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(cmd: list[str], env: dict) -> tuple[float, float, int]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if out.returncode not in (0, 1):  # memory exits 1 when a model does not fit
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}")
    return wall, cpu, out.returncode


def _edit(config: Path, dim: str, edit: str | None) -> str:
    """Change one model's section of ``dim`` in the YAML (as a user would by hand); returns what was changed."""
    import yaml

    data = yaml.safe_load(config.read_text())
    section = data[dim]
    if edit:
        key, value = edit.split("=", 1)
        *path, leaf = key.split(".")
        node = section
        for p in path:
            node = node[p]
        node[leaf] = yaml.safe_load(value)
        what = f"{dim} {key}={value}"
    else:
        channels = section["ddpm_unet"]["channels"]
        channels[-1] += 8 * max(1, section["ddpm_unet"]["norm_num_groups"] // 8)
        what = f"{dim} ddpm_unet.channels={channels}"
    text = config.read_text()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    config.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return what


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", type=int, required=True)
    ap.add_argument("--gpu-memory", default=None)
    ap.add_argument("--edit", default=None, help="KEY=VALUE inside the 3D config (default: a wider DDPM UNet)")
    ap.add_argument("--dim", default="3d")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("medimgen"))
    env = dict(os.environ, MEDIMGEN_CACHE_DIR=tempfile.mkdtemp(prefix="medimgen-cache-"))
    from medimgen.core.paths import config_path

    gpu = ["--gpu-memory", str(args.gpu_memory)] if args.gpu_memory else []
    print(f"dataset {args.dataset}, {os.cpu_count()} cores, load average before: {os.getloadavg()[0]:.1f}")
    print("| command | wall s | CPU s |")
    print("|---|---|---|", flush=True)

    def row(name, cmd):
        wall, cpu, _ = _timed(cmd, env)
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |", flush=True)

    row("`plan --force` (fresh)", [exe, "plan", "-d", str(args.dataset), "--force", *gpu])
    row("`plan --explain` (unchanged)", [exe, "plan", "-d", str(args.dataset), "--explain"])
    row("`memory` (unchanged)", [exe, "memory", str(args.dataset)])
    row("`plan --explain` (unchanged, again)", [exe, "plan", "-d", str(args.dataset), "--explain"])
    what = _edit(config_path(args.dataset), args.dim, args.edit)
    row(f"`memory` after editing {what}", [exe, "memory", str(args.dataset)])


if __name__ == "__main__":
    main()
