"""What a simulated training step costs under different dispatch routes (the floor under `plan`'s simulations).

    python benchmarks/bench_dispatch.py

One forward + backward of a 2D MONAI DiffusionModelUNet (channels 32-64-128-256, attention on the last three
levels, batch 8 of 192 x 160, no AMP) with the network built outside the timing, each route twice (the second is
the warm figure): PyTorch's FakeTensorMode with a live-bytes dispatch mode (what planning/cuda_sim.py ran before
2026-12-07), meta tensors with the same mode (what it runs now), meta tensors without a mode, and real CPU tensors at 16 x 16, batch 1 (the framework's
own overhead, almost no compute). CPU seconds of this process; the peak of the live bytes printed where tracked.
"""

from __future__ import annotations

import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Live(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and id(s := t.untyped_storage()) not in self.seen:
                self.seen.add(id(s))
                self.live += s.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(s, self._free, id(s), s.nbytes())
        return out

    def _free(self, key, n):
        self.seen.discard(key)
        self.live -= n


def _net():
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(32, 64, 128, 256),
                              attention_levels=(False, True, True, True), num_res_blocks=2, num_head_channels=32)


def _step(net, shape):
    x, t = torch.randn(shape), torch.randint(0, 1000, (shape[0],))
    net(x, timesteps=t).float().pow(2).mean().backward()


def main() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = (8, 1, 192, 160)
    for route in ("FakeTensorMode + live bytes", "meta + live bytes", "meta, no mode", "CPU 16 x 16, batch 1"):
        for rep in range(2):
            mode = _Live() if "live" in route else None
            if route.startswith("Fake"):
                ctx = FakeTensorMode(allow_non_fake_inputs=True)
            elif route.startswith("meta"):
                ctx = torch.device("meta")
            else:
                ctx = torch.device("cpu")
            with ctx:
                net = _net()
                t0 = time.process_time()
                if mode is not None:
                    with mode:
                        _step(net, shape)
                else:
                    _step(net, (1, 1, 16, 16) if route.startswith("CPU") else shape)
                cpu = time.process_time() - t0
            extra = f", {mode.ops} ops, peak {mode.peak / 2**20:.1f} MiB" if mode else ""
            print(f"{route} (run {rep + 1}): {cpu:.2f} s CPU{extra}", flush=True)


if __name__ == "__main__":
    main()
