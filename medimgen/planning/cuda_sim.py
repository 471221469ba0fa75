"""The peak CUDA memory of a training step, simulated on the CPU without computing anything.

Every training step of a planned model is run for real, op by op, on meta tensors (shapes, dtypes and storages,
no data), and a dispatch mode keeps the bytes of every storage alive at each moment, rounded as CUDA's caching
allocator rounds (512 B blocks). The peak of that running total is what `torch.cuda.max_memory_allocated` reports
for the same step, because it is the same sequence of allocations:

- AMP as CUDA runs it (`cuda_autocast_policy`): under ``torch.autocast("cpu")`` the autocast dispatch key is
  included for meta tensors too, and CUDA autocast's op lists are registered on it: convolutions and matmuls run in
  bf16, group/layer norm, softmax, upsampling, exp/log/pow and the losses in float32, with autocast's cache of
  weight casts. A test compares every op's output dtype with a forward on fake *CUDA* tensors (whose autocast is
  CUDA's own; PyTorch's autograd cannot run their backward without a GPU).
- backward as it really runs, including activation checkpointing's recomputation (the whole
  forward of a checkpointed block is alive during its backward), gradients of activations
  next to the saved tensors, AMP weight casts, AdamW's moments and foreach temporaries (counted, not run: one
  sqrt(v) per parameter, as torch.optim.AdamW(foreach=True), which CUDA uses by default, allocates them),
  gradient clipping, the EMA copy, the frozen autoencoder (LDM; with ``cache_latents`` no encoder pass in the
  step: the batch holds the latent cache's mu and sigma; the cache build's encoder pass, one image-size tile in 3D
  and a micro-batch of them in 2D, in float32, is counted before it) and perceptual network.
- attention through torch's scaled-dot-product attention with the kernel CPU would pick (its flash kernel: no N^2
  matrix, as CUDA's flash and memory-efficient kernels); meta's own pick would be the math path.
- the networks are built on the meta device outside the dispatch mode (their initialisation computes nothing).
- the step runs without a default device, as training does: the batch is made on the meta device and a tensor
  made without one is a CPU tensor, uncounted, as on a GPU (a scheduler's tables count once add_noise moves them).

Meta tensors rather than PyTorch's FakeTensorMode: the same allocations (the peaks of the two agree within a few
KiB on every planned model; benchmarks/README.md) at a third of the dispatch cost, which is most of `plan`'s time.

One steady-state step is run: AdamW's moments and the EMA copy already allocated (as from the
second step on) and, with accumulation, two micro-batches (the second runs next to the first's
gradients).
What the simulation cannot see (cuDNN's workspace, allocator fragmentation) is the calibrated
``CUDA_OVERHEAD`` in planning/memory.py.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from medimgen.config.kinds import kind
from medimgen.config.schema import GenerationConfig

BLOCK = 512  # CUDA caching allocator: every block is a multiple of 512 bytes

# CUDA autocast's op lists (aten/src/ATen/autocast_mode.h: AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32,
# AT_FORALL_FP32_SET_OPT_DTYPE, AT_FORALL_PROMOTE); overloads that do not exist in this torch are skipped
_LOWER_PRECISION = (
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr", "matmul",
    "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
)
_FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
    "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp", "upsample_nearest1d",
    "upsample_nearest1d.vec", "upsample_nearest2d", "upsample_nearest2d.vec", "upsample_nearest3d",
    "upsample_nearest3d.vec", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
    "upsample_linear1d", "upsample_bilinear2d", "upsample_bilinear2d.vec", "upsample_trilinear3d",
    "upsample_trilinear3d.vec", "upsample_bicubic2d",
)
_FP32_OPT_DTYPE = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
)
_PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
            "tensordot", "scatter_add")

_lock = threading.Lock()
_active = {"depth": 0, "lib": None, "clear": None}
_cast_cache: dict[int, tuple] = {}  # id(weight) -> (weakref to it, its lower-precision copy), as autocast's cache


def _no_autocast():
    return torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU))


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta" and t.is_floating_point()


def _cast(t, dtype):
    """autocast's cached_cast: an eligible tensor (not float64) to ``dtype``; a float32 leaf weight's lower-precision
    copy is kept in the cache until the outermost autocast region ends (``torch.clear_autocast_cache``)."""
    if isinstance(t, (list, tuple)):
        return type(t)(_cast(x, dtype) for x in t)
    if not _eligible(t) or t.dtype in (torch.float64, dtype):
        return t
    cache = (dtype == torch.get_autocast_dtype("cpu") and t.dtype == torch.float32 and t.requires_grad and t.is_leaf
             and not t._is_view() and torch.is_autocast_cache_enabled())
    hit = _cast_cache.get(id(t)) if cache else None
    if hit is not None and hit[0]() is t:
        return hit[1]
    out = t.to(dtype)
    if cache:
        _cast_cache[id(t)] = (weakref.ref(t), out)
    return out


def _lower_kernel(op):
    def kernel(*args, **kwargs):
        dtype = torch.get_autocast_dtype("cpu")
        args, kwargs = [_cast(a, dtype) for a in args], {k: _cast(v, dtype) for k, v in kwargs.items()}
        with _no_autocast():
            return op(*args, **kwargs)
    return kernel


def _fp32_kernel(op):
    def kernel(*args, **kwargs):
        args, kwargs = [_cast(a, torch.float32) for a in args], {k: _cast(v, torch.float32) for k, v in kwargs.items()}
        with _no_autocast():
            return op(*args, **kwargs)
    return kernel


def _opt_dtype_kernel(op):
    def kernel(*args, **kwargs):
        if args and _eligible(args[0]) and kwargs.get("dtype") is None:
            kwargs = {**kwargs, "dtype": torch.float32}
        with _no_autocast():
            return op(*args, **kwargs)
    return kernel


def _promote_kernel(op):
    def kernel(*args, **kwargs):
        dtype = torch.get_autocast_dtype("cpu")
        for t in tree_leaves((args, kwargs)):
            if _eligible(t) and dtype != torch.float64:
                dtype = torch.promote_types(dtype, t.dtype)
        args, kwargs = [_cast(a, dtype) for a in args], {k: _cast(v, dtype) for k, v in kwargs.items()}
        with _no_autocast():
            return op(*args, **kwargs)
    return kernel


def _overload(name: str):
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.aten, base, None)
    if packet is None:
        return None
    return getattr(packet, overload or "default", None)


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """scaled_dot_product_attention (its composite kernel) taking the kernel CPU picks for the same shapes and
    dtypes: its flash kernel (the output and the log-sum-exp, no N^2 matrix, as CUDA's flash and memory-efficient
    kernels) or the math path. Meta's own choice is always the math path, which holds the N^2 scores. The choice is
    CPU's own, made on stand-ins one token long."""
    def stand_in(t):
        return torch.empty((*t.shape[:-2], min(1, t.shape[-2]), t.shape[-1]), dtype=t.dtype, device="cpu") \
            if isinstance(t, torch.Tensor) else t
    choice = torch.ops.aten._fused_sdp_choice.default(stand_in(query), stand_in(key), stand_in(value),
                                                      stand_in(attn_mask), dropout_p, is_causal, scale=scale,
                                                      enable_gqa=enable_gqa)
    if choice == int(torch.nn.attention.SDPBackend.FLASH_ATTENTION.value):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_attention_math.default(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)[0]


# ops whose meta kernel is a Python decomposition that costs milliseconds a call (most of a simulation's time),
# while a network calls them with a few distinct signatures (benchmarks/README.md)
_REMEMBERED = ("native_group_norm", "native_group_norm_backward", "addmm")


def _signature(args, kwargs):
    """A hashable key of an op's arguments: each tensor by its layout (shape, strides, offset, dtype), the rest as
    given."""
    def key(a):
        if isinstance(a, torch.Tensor):
            return ("T", tuple(a.shape), a.stride(), a.storage_offset(), a.dtype)
        if isinstance(a, (list, tuple)):
            return tuple(key(x) for x in a)
        return a
    return key(args), tuple(sorted((k, key(v)) for k, v in kwargs.items()))


def _fresh_layout(t, inputs) -> tuple | None:
    """(shape, strides, dtype) of an output that a fresh empty_strided tensor reproduces exactly (its own storage,
    of the least size); None for anything else (a view of an input, an offset, a larger storage)."""
    if not isinstance(t, torch.Tensor):
        return None
    shape, stride = tuple(t.shape), t.stride()
    least = (1 + sum((n - 1) * s for n, s in zip(shape, stride))) if all(shape) else 0
    storage = t.untyped_storage()
    if t.storage_offset() or storage.nbytes() != least * t.element_size() or any(
            storage._cdata == i.untyped_storage()._cdata for i in inputs):
        return None
    return shape, stride, t.dtype


def _remembered(op):
    """``op``'s meta kernel, run once per signature (in this process): a signature seen before gets fresh outputs of
    the layouts its first call gave (the same allocations: the simulation counts storages, not values)."""
    original = op.py_kernels[torch._C.DispatchKey.Meta]
    layouts = _LAYOUTS.setdefault(str(op), {})

    def kernel(*args, **kwargs):
        key = _signature(args, kwargs)
        known = layouts.get(key)
        if known is not None:
            made = [None if lay is False else torch.empty_strided(lay[0], lay[1], dtype=lay[2], device="meta")
                    for lay in known[1]]
            return tuple(made) if known[0] else made[0]
        out = original(*args, **kwargs)
        if key not in layouts:
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outs = out if isinstance(out, tuple) else (out,)
            found = [False if t is None else _fresh_layout(t, inputs) for t in outs]
            layouts[key] = (isinstance(out, tuple), found) if all(f is not None for f in found) else None
        return out
    return kernel


_LAYOUTS: dict = {}  # op -> {signature: (tuple output?, output layouts) or None (not reproducible)}


def _clear_cache():
    _cast_cache.clear()
    _active["clear"]()


@contextmanager
def cuda_autocast_policy():
    """While active, ``torch.autocast("cpu", ...)`` casts meta tensors as CUDA autocast casts CUDA tensors: the
    autocast dispatch key is included for every tensor, and CUDA's op lists are registered on it (CPU autocast's
    own kernels cast only CPU tensors, so they leave meta tensors alone), with autocast's cache of weight casts.
    It must stay active through backward (activation checkpointing recomputes under autocast). Reentrant; the CPU
    policy is restored when the outermost use ends."""
    with _lock:
        if _active["depth"] == 0:
            lib = torch.library.Library("aten", "IMPL")
            with warnings.catch_warnings():  # "overriding a previously registered kernel"
                warnings.simplefilter("ignore")
                for names, make in ((_LOWER_PRECISION, _lower_kernel), (_FP32, _fp32_kernel),
                                    (_FP32_OPT_DTYPE, _opt_dtype_kernel), (_PROMOTE, _promote_kernel)):
                    for name in names:
                        op = _overload(name)
                        if op is not None:
                            lib.impl(name, make(op), "AutocastCPU")
                lib.impl("scaled_dot_product_attention", _attention, "CompositeImplicitAutograd")
                for name in _REMEMBERED:
                    lib.impl(name, _remembered(_overload(name)), "Meta")
            _active["lib"], _active["clear"] = lib, torch.clear_autocast_cache
            torch.clear_autocast_cache = _clear_cache  # torch.autocast's exit calls it when the outermost one ends
        _active["depth"] += 1
    try:
        with torch._C._IncludeDispatchKeyGuard(torch._C.DispatchKey.AutocastCPU):
            yield
    finally:
        with _lock:
            _active["depth"] -= 1
            if _active["depth"] == 0:
                torch.clear_autocast_cache = _active["clear"]
                _cast_cache.clear()
                _active["lib"]._destroy()
                _active["lib"] = None


def _blocks(nbytes: int) -> int:
    """What CUDA's caching allocator takes for ``nbytes``: whole 512 B blocks, at least one."""
    return max(BLOCK, math.ceil(nbytes / BLOCK) * BLOCK)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages alive now and at the peak, counted as CUDA's allocator counts them."""

    def __init__(self, device: str = "meta"):
        super().__init__()
        self.device = device  # the simulated device's tensors (meta); tests count fake CPU tensors with "cpu"
        self.live = 0
        self.peak = 0
        self.trace: list[int] = []  # live bytes after every allocation
        self._seen: set[int] = set()

    def track(self, tensors) -> None:
        for t in tree_leaves(tensors):
            if not isinstance(t, torch.Tensor) or t.device.type != self.device:
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._seen:
                continue
            n = _blocks(storage.nbytes())
            self._seen.add(key)
            self.live += n
            self.peak = max(self.peak, self.live)
            self.trace.append(self.live)
            weakref.finalize(storage, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        self._seen.discard(key)
        self.live -= n

    def allocate(self, sizes) -> int:
        """Count new storages of ``sizes`` bytes, one after the other, as ``track`` would; returns their blocks."""
        total = 0
        for nbytes in sizes:
            n = _blocks(nbytes)
            total += n
            self.live += n
            self.trace.append(self.live)
        self.peak = max(self.peak, self.live)
        return total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out


# ---------------------------------------------------------------------------- the simulated steps
@dataclass(frozen=True)
class Simulated:
    trace: tuple[int, ...]  # live bytes after each allocation of the step
    # live bytes between steps (weights, optimiser moments, EMA, frozen networks, and what a loss keeps of its last
    # micro-batch, the autoencoder's reconstruction, counted as at micro-batch 2 when the step ran a larger one)
    static_bytes: int
    params: int  # trainable parameters
    # the EMA copy of the trained weights (whether this step had one or not): allocated before the step, so a step
    # with it is the step without it, every live count and static_bytes higher by this
    ema_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return max(self.trace)


def _nbytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def _clip_grad_norm(tracker: "LiveBytes", n: int) -> None:
    """The allocations of torch.nn.utils.clip_grad_norm_(grads, max_norm, foreach=True) for ``n`` float32
    gradients (torch/nn/utils/clip_grad.py), counted, not run: one norm per gradient, their stack and its norm
    (then the norms and the stack are freed), total + eps, its reciprocal and the coefficient (the first two freed),
    the clamped coefficient; the gradients are scaled in place."""
    if n == 0:  # torch.tensor(0.0), and nothing to scale
        tracker.live -= tracker.allocate([4])
        return
    norms = tracker.allocate([4] * n + [4 * n])
    total = tracker.allocate([4])
    tracker.live -= norms
    temporaries = tracker.allocate([4, 4])
    coef = tracker.allocate([4])
    tracker.live -= temporaries
    clamped = tracker.allocate([4])
    tracker.live -= total + coef + clamped


class _Phase:
    """One optimiser (params, AdamW state, clipping) as the training loop runs it.

    AdamW's own memory is counted, not run: torch.optim.AdamW(foreach=True).step() (torch/optim/adam.py,
    _multi_tensor_adam) updates the parameters and its two moments in place and allocates one temporary per
    parameter with a gradient (sqrt of the second moment), all alive together until the update is done; the
    moments are one copy each of every trained parameter, kept between steps (tests/test_memory.py checks
    both against torch's own AdamW on fake tensors)."""

    def __init__(self, modules, train):
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.train = train

    def state_sizes(self) -> list[int]:
        """Bytes of AdamW's moments (exp_avg, exp_avg_sq: zeros_like each parameter)."""
        return [_nbytes(p) for p in self.params] * 2

    def step(self, tracker: "LiveBytes") -> None:
        grads = [p for p in self.params if p.grad is not None]
        if self.train.grad_clip:
            _clip_grad_norm(tracker, len(grads))
        denom = tracker.allocate([_nbytes(p) for p in grads])  # torch._foreach_sqrt(v)
        tracker.live -= denom
        for p in self.params:
            p.grad = None


@contextmanager
def _frozen(modules):
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _built(make):
    """``make()``'s network on the meta device (its initialisation computes nothing); tensors some networks make on
    the CPU whatever the default device (lpips' scaling buffers) are moved to it, so the step sees meta only. The
    build runs outside the simulation's dispatch modes (it allocates nothing on the simulated device)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.device("meta"):
        net = make()
    moved = {}

    def meta(t, param: bool):
        if t.device.type == "meta":
            return t
        if id(t) not in moved:
            m = t.detach().to("meta")
            moved[id(t)] = torch.nn.Parameter(m, t.requires_grad) if param else m
        return moved[id(t)]

    with _disable_current_modes():
        for sub in net.modules():
            for name, p in sub._parameters.items():
                if p is not None:
                    sub._parameters[name] = meta(p, True)
            for name, b in sub._buffers.items():
                if b is not None:
                    sub._buffers[name] = meta(b, False)
            for name, t in list(vars(sub).items()):  # plain tensor attributes (MONAI attention's empty causal_mask)
                if isinstance(t, torch.Tensor):
                    setattr(sub, name, meta(t, False))
    return net


def _tensors(module) -> list:
    """The tensors a module holds: parameters, buffers and plain tensor attributes (alive as long as it is)."""
    return [*module.parameters(), *module.buffers(),
            *(t for sub in module.modules() for t in vars(sub).values() if isinstance(t, torch.Tensor))]


def _diffusion_parts(cfg: GenerationConfig, model: str):
    from medimgen.models.diffusion import noised, training_scheduler
    from medimgen.models.networks import autoencoder_for, unet_for
    sched_cfg = cfg.scheduler_for(model)
    scheduler = training_scheduler(sched_cfg, cfg.data.spatial_dims)
    frozen = None
    if cfg.space_of(model) == "latent":
        frozen = _built(lambda: autoencoder_for(cfg))
        for p in frozen.parameters():
            p.requires_grad_(False)
        frozen.eval()
    unet = _built(lambda: unet_for(cfg, model))

    def loss(batch):
        x = batch["image"]
        if "mu" in batch:  # the latent cache: z drawn from cached mu/sigma, no encoder pass
            x = (batch["mu"] + batch["sigma"] * torch.randn_like(batch["sigma"])) * 1.0
        elif frozen is not None:
            with torch.no_grad():
                x = frozen.encode_stage_2_inputs(x) * 1.0
        noisy, t, target = noised(scheduler, sched_cfg.prediction_type, x)
        pred = unet(noisy, timesteps=t)
        return F.mse_loss(pred.float(), target.float())

    return [unet], [frozen] if frozen is not None else [], {"diffusion": ([unet], loss)}, [unet]


def _controlnet_parts(cfg: GenerationConfig):
    """A ControlNet step: the frozen base UNet (and an LDM's frozen autoencoder) around the trained ControlNet."""
    from medimgen.models.diffusion import target_for, training_scheduler
    from medimgen.models.labels import condition_channels
    from medimgen.models.networks import autoencoder_for, build_controlnet, enable_unet_checkpointing, unet_for

    base = cfg.controlnet_base()
    sched_cfg = cfg.scheduler_for(base)
    scheduler = training_scheduler(sched_cfg)
    unet = _built(lambda: unet_for(cfg, base))
    if cfg.controlnet.activation_checkpointing:
        enable_unet_checkpointing(unet)
    latent = cfg.space_of(base) == "latent"
    frozen = [unet] + ([_built(lambda: autoencoder_for(cfg))] if latent else [])
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    controlnet = _built(lambda: build_controlnet(cfg))
    values = cfg.data.label_values  # none (a dataset without labels): the background channel only

    def loss(batch):
        x = batch["image"]
        if "mu" in batch:  # the latent cache: z drawn from cached mu/sigma, no encoder pass
            x = (batch["mu"] + batch["sigma"] * torch.randn_like(batch["sigma"])) * 1.0
        elif latent:
            with torch.no_grad():
                x = frozen[1].encode_stage_2_inputs(x) * 1.0
        noise = torch.randn_like(x)
        t = torch.randint(0, scheduler.num_train_timesteps, (x.shape[0],), device=x.device)
        noisy = scheduler.add_noise(original_samples=x, noise=noise, timesteps=t)
        down, mid = controlnet(x=noisy, timesteps=t, controlnet_cond=condition_channels(batch["label"], values))
        pred = unet(noisy, timesteps=t, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        target = target_for(scheduler, sched_cfg.prediction_type, x, noise, t)
        return F.mse_loss(pred.float(), target.float())

    return [controlnet], frozen, {"diffusion": ([controlnet], loss)}, [controlnet]


def _perceptual_on(cfg: GenerationConfig) -> bool:
    return cfg.losses.perceptual_network != "none" and cfg.losses.perceptual_weight > 0


def _perceptual(cfg: GenerationConfig):
    """MONAI's PerceptualLoss as training builds it, with random backbone weights (sizes only)."""
    from monai.losses import PerceptualLoss
    from torch import nn

    from medimgen.models.losses import PerChannel

    network = cfg.losses.perceptual_network
    loss = PerceptualLoss.__new__(PerceptualLoss)
    nn.Module.__init__(loss)
    loss.spatial_dims = cfg.data.spatial_dims
    loss.is_fake_3d = cfg.losses.perceptual_fake_3d and cfg.data.spatial_dims == 3
    loss.fake_3d_ratio = cfg.losses.perceptual_fake_3d_ratio
    loss.channel_wise = False
    loss.perceptual_function = _perceptual_backbone(network)
    loss = PerChannel(loss)
    loss.eval()
    for p in loss.parameters():
        p.requires_grad_(False)
    return loss


def _perceptual_backbone(network: str):
    import lpips

    if network in ("alex", "vgg", "squeeze"):
        with warnings.catch_warnings():  # lpips uses torchvision's deprecated 'pretrained' argument
            warnings.simplefilter("ignore")
            return lpips.LPIPS(pretrained=True, net=network, pnet_rand=True, verbose=False)
    # the medical backbones come from a torch.hub repository that may not be on disk: their
    # architecture (a ResNet-50 for RadImageNet, MONAI's 3D ResNets for MedicalNet) with the
    # similarity computed as MONAI does (normalised features, squared difference, mean)
    if network.startswith("radimagenet"):
        import torchvision

        body = torch.nn.Sequential(*list(torchvision.models.resnet50().children())[:-2])
    else:
        from monai.networks.nets import resnet10, resnet50

        body = (resnet10 if "resnet10" in network else resnet50)(spatial_dims=3, n_input_channels=1, feed_forward=False)
    return _FeatureDistance(body)


class _FeatureDistance(torch.nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, a, b):
        if a.shape[1] == 1 and isinstance(self.body, torch.nn.Sequential):
            a, b = a.repeat(1, 3, *[1] * (a.ndim - 2)), b.repeat(1, 3, *[1] * (b.ndim - 2))
        fa, fb = self.body(a), self.body(b)
        fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        return (fa - fb).pow(2).sum(1, keepdim=True).mean()


def _adversarial_loss():
    """MONAI's PatchAdversarialLoss (least squares) with its target made on the simulated device: MONAI makes it
    with ``Tensor.type(input.type())``, which has no meta form (on a GPU it is one 512-byte block)."""
    from monai.losses import PatchAdversarialLoss

    class OnDevice(PatchAdversarialLoss):
        def get_target_tensor(self, input, target_is_real):
            label = self.real_label if target_is_real else self.fake_label
            return torch.full((), label, dtype=input.dtype, device=input.device).expand_as(input)

    return OnDevice(criterion="least_squares")


def _autoencoder_parts(cfg: GenerationConfig):
    from medimgen.models.losses import kl_loss
    from medimgen.models.labels import label_channels
    from medimgen.models.networks import autoencoder_for, build_discriminator

    nd, ch = cfg.data.spatial_dims, cfg.data.in_channels
    ae = _built(lambda: autoencoder_for(cfg))
    adversarial = cfg.losses.adversarial_weight > 0
    disc = _built(lambda: build_discriminator(cfg.discriminator, nd, ch)) if adversarial else None
    joint = label_channels(cfg) > 0
    perceptual = _built(lambda: _perceptual(cfg)) if _perceptual_on(cfg) else None
    adv = _adversarial_loss()
    keep: dict = {}
    rec = F.mse_loss if cfg.losses.reconstruction == "l2" else F.l1_loss

    def generator(batch):
        keep.clear()  # the loop drops the previous step's state before the next forward
        x = batch["image"]
        out, z_mu, z_sigma = ae(x)
        recon = out[:, :ch]
        keep["recon"] = recon  # the loop keeps it for the discriminator phase
        total = rec(recon.float(), x[:, :ch].float()) + cfg.losses.kl_weight * kl_loss(z_mu.float(), z_sigma.float())
        if joint:  # cross-entropy + soft Dice on the label logits, as the trainer computes them
            logits = out[:, ch:].float()
            probs = torch.softmax(logits, dim=1)
            target = torch.zeros_like(logits[:, 0], dtype=torch.long)
            total = total + F.cross_entropy(logits, target) + (1 - probs.sum() / probs.numel())
            x = x[:, :ch]
        if perceptual is not None:
            total = total + cfg.losses.perceptual_weight * perceptual(recon.float(), x.float())
        if disc is not None:
            logits = disc(recon.contiguous().float())[-1]
            total = total + cfg.losses.adversarial_weight * adv(logits, target_is_real=True, for_discriminator=False)
        return total

    def discriminator(batch):
        fake = disc(keep["recon"].detach().contiguous().float())[-1]
        real = disc(batch["image"][:, :ch].contiguous().float())[-1]
        d = 0.5 * (adv(fake, target_is_real=False, for_discriminator=True)
                   + adv(real, target_is_real=True, for_discriminator=True))
        return cfg.losses.adversarial_weight * d

    trained = [ae] + ([disc] if disc is not None else [])
    generator.kept = keep
    phases = {"generator": ([ae], generator)}
    if disc is not None:
        phases["discriminator"] = ([disc], discriminator)
    return trained, [perceptual] if perceptual is not None else [], phases, []


def simulate(cfg: GenerationConfig, model: str) -> Simulated:
    """Run a training step of ``model`` for ``cfg`` on meta tensors and return its memory (see module doc)."""
    train = cfg.train_for(model)
    amp = train.amp != "off"  # 'auto' is AMP on any GPU this plan targets
    accum = max(1, train.grad_accumulation_steps)
    from medimgen.models.labels import network_channels

    shape = (train.batch_size, network_channels(cfg), *cfg.data.image_size)
    cached = train.cache_latents and cfg.space_of(model) == "latent"
    if cached:
        from medimgen.models.networks import latent_size

        latent = (train.batch_size, cfg.autoencoder.latent_channels, *latent_size(cfg))
    tracker = LiveBytes()
    meta = torch.device("meta")
    with cuda_autocast_policy(), tracker:
        trained, frozen, phases, averaged = (_autoencoder_parts(cfg) if kind(model).encoder else
                                           _controlnet_parts(cfg) if kind(model).steers else
                                           _diffusion_parts(cfg, model))
        for m in [*trained, *frozen]:
            tracker.track(_tensors(m))
            m.train() if m in trained else m.eval()
        optimisers = {name: _Phase(mods, train) for name, (mods, _) in phases.items()}
        ema = [_nbytes(p) for m in averaged for p in m.parameters()]  # the EMA copy of the weights, if on
        params = sum(p.numel() for m in trained for p in m.parameters())
        # the steady state: AdamW's moments exist from the previous step, next to the EMA copy (counted, not made)
        tracker.allocate([n for opt in optimisers.values() for n in opt.state_sizes()]
                         + (ema if train.ema_decay else []))
        tracker.trace.clear()
        if cached:  # the cache build's encoder pass (training.latents.tiles_per_pass: one image_size tile in 3D,
            # the micro-batch of them in 2D; float32, no grad), before the first step, next to the networks (counted
            # here next to the moments)
            encoder = next((m for m in frozen if hasattr(m, "encode_stage_2_inputs")), None)
            if encoder is not None:
                with torch.no_grad():
                    tiles = shape[0] if cfg.data.spatial_dims == 2 else 1
                    encoder.encode(torch.randn((tiles, *shape[1:]), device=meta))
        for _ in range(min(accum, 2)):  # with accumulation, the second micro-batch runs next to the first's gradients
            batch = {"image": torch.randn(shape, device=meta),
                     "label": torch.zeros(shape[:1] + (1,) + shape[2:], dtype=torch.int16, device=meta)}
            if cached:  # the latent cache's batch: mu and sigma at latent size (the image tensor is not made)
                batch = {"label": batch["label"], "image": None, "mu": torch.randn(latent, device=meta),
                         "sigma": torch.rand(latent, device=meta)}
            for name, (mods, loss_fn) in phases.items():
                others = [m for other, (ms, _) in phases.items() if other != name for m in ms]
                with _frozen(others):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                        loss = loss_fn(batch)
                    (loss / accum).backward()
                del loss
            del batch
        for opt in optimisers.values():
            opt.step(tracker)
        # the EMA update (torch._foreach_lerp_ in place) allocates nothing
        static = tracker.live
        if train.batch_size > 2:  # what a loss keeps of the last micro-batch, as at micro-batch 2 (see Simulated)
            for t in (t for _, fn in phases.values() for t in getattr(fn, "kept", {}).values()):
                n = t.untyped_storage().nbytes()
                static += _blocks(n * 2 // train.batch_size) - _blocks(n)
        trace = tuple(tracker.trace)
    return Simulated(trace=trace, static_bytes=static, params=params, ema_bytes=sum(_blocks(n) for n in ema))


def peak_of(build, amp: bool = True) -> int:
    """Peak CUDA bytes of ``build()()``: ``build`` makes modules/inputs and returns a step function
    (e.g. forward + backward), both run on meta tensors under CUDA's autocast policy."""
    tracker = LiveBytes()
    with torch.device("meta"), cuda_autocast_policy(), tracker:
        step = build()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = step()
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.float().sum().backward()
    return tracker.peak
