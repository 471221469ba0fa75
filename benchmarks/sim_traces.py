"""Simulated training-step memory of many planned models, to compare two versions of planning/cuda_sim.py.

    python benchmarks/sim_traces.py OUT.json [CONFIG.yaml ...]       # this checkout's simulation
    python benchmarks/sim_traces.py --compare BEFORE.json AFTER.json  # what changed

Every model (autoencoder, ddpm, ldm, controlnet) of both dimensions of each config (default:
tests/data/Dataset501_config_8GB.yaml) is simulated as planned and in variants: AMP off, latent cache on, activation
checkpointing all on / all off, gradient accumulation 2, no adversarial/perceptual loss, and MONAI's plain attention
instead of flash. For each: the peak and between-step bytes, the trainable parameters, the number of allocations and
a hash of the whole trace; the CPU seconds of the run are printed. `--compare` lists every difference and the
largest peak difference.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

VARIANTS = {
    "planned": [], "amp off": ["train_{m}.amp=off"], "latent cache": ["train_{m}.cache_latents=true"],
    "checkpointing on": [f"{s}.activation_checkpointing=true" for s in ("ddpm_unet", "ldm_unet", "autoencoder")],
    "checkpointing off": [f"{s}.activation_checkpointing=false" for s in ("ddpm_unet", "ldm_unet", "autoencoder")],
    "accumulation 2": ["train_{m}.grad_accumulation_steps=2"],
    "no GAN, no perceptual": ["losses.adversarial_weight=0", "losses.perceptual_weight=0"],
}
MODELS = ("autoencoder", "ddpm", "ldm", "controlnet")


def run(out: Path, configs: list[Path]) -> None:
    from medimgen.config import apply_overrides, load_config
    from medimgen.models import networks
    from medimgen.planning.cuda_sim import simulate

    results, t0 = {}, time.process_time()
    for path in configs:
        cfg = load_config(path)
        for dim in ("2d", "3d"):
            if cfg.get(dim) is None:
                continue
            for model in MODELS:
                for variant, overrides in [*VARIANTS.items(), ("plain attention", None)]:
                    try:
                        g = apply_overrides(cfg.get(dim), [o.format(m=model) for o in overrides or []])
                    except Exception as e:  # a section this config lacks (e.g. no ControlNet training section)
                        results[f"{path.parent.name}/{path.name}/{dim}/{model}/{variant}"] = f"not applicable: {e}"
                        continue
                    networks.FLASH_ATTENTION = overrides is not None
                    s = simulate(g, model)
                    results[f"{path.parent.name}/{path.name}/{dim}/{model}/{variant}"] = {
                        "peak": s.peak_bytes, "static": s.static_bytes, "params": s.params, "allocations": len(s.trace),
                        "trace_sha1": hashlib.sha1(json.dumps(s.trace).encode()).hexdigest()[:12]}
    networks.FLASH_ATTENTION = True
    out.write_text(json.dumps(results, indent=1))
    print(f"{len(results)} cases, {time.process_time() - t0:.1f} CPU s -> {out}")


def compare(before: Path, after: Path) -> None:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    worst = (0, "")
    for key in a:
        x, y = a[key], b.get(key)
        if x == y:
            continue
        if isinstance(x, dict) and isinstance(y, dict):
            changed = {f: (x[f], y[f]) for f in x if x[f] != y[f]}
            if x["peak"] != y["peak"]:
                worst = max(worst, (abs(y["peak"] - x["peak"]), key))
            print(key, changed)
        else:
            print(key, x, "->", y)
    same = sum(a[k] == b.get(k) for k in a)
    print(f"{same} of {len(a)} identical; largest peak difference {worst[0]} bytes ({worst[1] or '-'})")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--compare"]:
        compare(Path(args[1]), Path(args[2]))
    else:
        root = Path(__file__).resolve().parents[1]
        run(Path(args[0]), [Path(p) for p in args[1:]] or [root / "tests/data/Dataset501_config_8GB.yaml"])
