"""Typed, frozen configuration sections.

Every field carries a ``doc`` (written as a comment into medimgen_config.yaml) so the
file explains itself. Axis order of every per-axis value is nnU-Net's preprocessed
(transposed) order, i.e. the order of the arrays in nnUNet_preprocessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from medimgen import __version__
from medimgen.config.kinds import auto_generators, kind
from medimgen.core.names import EXPERIMENT_NAME_ALLOWED, EXPERIMENT_NAME_RULE


_REQUIRED = object()


# an nnU-Net plans identifier: the plans file's name without .json (nnUNetPlans, nnUNetResEncUNetMPlans, ...)
PLANS_IDENTIFIER = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
PLANS_IDENTIFIER_ALLOWED = "a plans name of letters, digits, '_', '-' and '.' (the plans file without .json)"


def doc(text: str, default=_REQUIRED, *, ge=None, gt=None, le=None, lt=None, pattern=None, **kwargs):
    """A dataclass field with documentation attached (and an optional default).

    ``ge``/``gt``/``le``/``lt``: the allowed range of the value (of every element of a list), checked
    whenever a config is read or overridden (medimgen.config.validate); ``pattern``: (regex, what it allows)
    a string value must match whole."""
    metadata = {"doc": text}
    if pattern is not None:
        metadata["pattern"] = pattern
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        metadata["bounds"] = bounds
    if default is _REQUIRED:
        return field(metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


AmpMode = Literal["auto", "bf16", "fp16", "off"]

# The dimensionalities medimgen plans (the models it trains: medimgen.config.kinds).
DIMS = ("2d", "3d")


@dataclass(frozen=True)
class DataConfig:
    nnunet_configuration: str = doc("nnU-Net configuration whose preprocessed cases are used ('2d' or '3d_fullres')")
    spatial_dims: int = doc("2 or 3")
    in_channels: int = doc("image channels (nnU-Net channel_names of dataset.json)", ge=1)
    channel_names: tuple[str, ...] = doc("names of the channels, from dataset.json")
    image_size: tuple[int, ...] = doc(
        "generated image size (voxels): nnU-Net's median preprocessed shape rounded up to a multiple of "
        "the total downsampling of the networks (size_divisor); samples cover the typical whole image", ge=1)
    size_divisor: tuple[int, ...] = doc("per-axis total downsampling the image size must be divisible by (derived)", ge=1)
    spacing: tuple[float, ...] = doc("voxel spacing of the preprocessed data (nnU-Net target spacing), mm", gt=0)
    median_image_size: tuple[int, ...] = doc("nnU-Net's median image size after preprocessing, voxels", ge=1)
    nnunet_patch_size: tuple[int, ...] = doc("nnU-Net's segmentation patch size (for reference and patch training)")
    nnunet_batch_size: int = doc("nnU-Net's batch size for its patch size (for reference)")
    normalization_schemes: tuple[str, ...] = doc("nnU-Net normalisation per channel (ZScoreNormalization, CTNormalization, ...)")
    plans_identifier: str = doc(
        "nnU-Net plans this config was planned from (`medimgen plan --plans`): training, sampling and evaluation read "
        "<plans_identifier>.json and its preprocessed <plans_identifier>_<configuration> folder",
        "nnUNetPlans", pattern=(PLANS_IDENTIFIER, PLANS_IDENTIFIER_ALLOWED))
    intensity_range: tuple[float, float] = doc("range the model sees; nnU-Net-normalised intensities are mapped linearly into it", (-1.0, 1.0))
    intensity_low: tuple[float, ...] = doc(
        "per channel, the nnU-Net-normalised value mapped to intensity_range[0] (0.5th percentile: CT from the fingerprint, exact; else of the preprocessed voxels)",
        default_factory=tuple)
    intensity_high: tuple[float, ...] = doc(
        "per channel, the nnU-Net-normalised value mapped to intensity_range[1] (99.5th percentile, as intensity_low)",
        default_factory=tuple)
    intensity_mean: tuple[float, ...] = doc(
        "per channel foreground mean in original units (fingerprint); maps samples back only when intensity_case_mean is empty",
        default_factory=tuple)
    intensity_std: tuple[float, ...] = doc(
        "per channel foreground std in original units (fingerprint); maps samples back only when intensity_case_std is empty",
        default_factory=tuple)
    intensity_case_mean: tuple[float, ...] = doc(
        "per channel offset nnU-Net's normalisation removed, original units, to map samples back: z-score, the median "
        "over the raw cases of each case's mean over the voxels nnU-Net used (all, or the nonzero mask with "
        "use_mask_for_norm); CT, the fingerprint mean (exact); rescale-to-01, the median minimum (empty: intensity_mean)",
        default_factory=tuple)
    intensity_case_std: tuple[float, ...] = doc(
        "per channel scale nnU-Net's normalisation divided by, as intensity_case_mean (z-score: median per-case std; "
        "CT: the fingerprint std) (empty: intensity_std)", default_factory=tuple, gt=0)
    intensity_background: tuple[float, ...] = doc(
        "per channel original value of samples at intensity_range[0], the value training gives voxels outside "
        "nnU-Net's nonzero mask: their raw value 0 (CT channels: the lower bound mapped back, exact); empty when "
        "the cases have no such voxels (the lower bound then maps back like any other value)", default_factory=tuple)
    intensity_clip_low: tuple[float, ...] = doc(
        "per channel, the lowest nnU-Net-normalised value nnU-Net's own preprocessing gives (CT: its 0.5th-percentile "
        "clip); samples mapped back to nnU-Net's space (evaluation features) are clamped to it. Set where the model's "
        "range reaches beyond nnU-Net's (a foundation autoencoder's HU window); empty: no clamp", default_factory=tuple)
    intensity_clip_high: tuple[float, ...] = doc(
        "per channel, the highest nnU-Net-normalised value nnU-Net's preprocessing gives (CT: its 99.5th-percentile "
        "clip), as intensity_clip_low", default_factory=tuple)
    oversample_foreground_percent: float = doc("fraction of samples centred on foreground, as nnU-Net does", 0.33, ge=0, le=1)
    augmentation: Literal["none", "mild", "nnunet"] = doc(
        "nnU-Net augmentation strength: 'mild' (no large rotations; they hurt generation), 'nnunet' (segmentation defaults), 'none'", "mild")
    num_workers: int = doc("background workers for loading/augmentation (0 = in the main process)", 4, ge=0)
    crop_size: tuple[int, ...] = doc(
        "native voxels cropped per image before resampling to image_size; set by the memory fitter only when "
        "the planned size cannot fit the GPU (empty: same as image_size)", default_factory=tuple, ge=1)
    native_spacing: tuple[float, ...] = doc(
        "nnU-Net spacing of the preprocessed data when the memory fitter coarsened `spacing` (empty: unchanged)",
        default_factory=tuple, gt=0)
    data_size: tuple[int, ...] = doc(
        "voxels (at `spacing`) of the data that image_size pads: the median preprocessed shape the plan was made "
        "from (scaled with `spacing` by the memory fitter); samples are centre-cropped to it on output, as the "
        "loader centres cases in image_size (`sample --no-crop` keeps image_size; empty: no crop)",
        default_factory=tuple, ge=1)
    generate_labels: bool = doc(
        "generate a label map with every image (joint model): planned true when dataset.json has real labels "
        "(not the body masks `medimgen import` makes); the labels enter the networks as one-hot channels after "
        "the image channels (medimgen.models.labels)", False)
    label_values: tuple[int, ...] = doc(
        "nnU-Net label values of the foreground labels a joint model generates (dataset.json labels; background 0 "
        "is implied)", default_factory=tuple, ge=1)
    label_names: tuple[str, ...] = doc("names of label_values, from dataset.json", default_factory=tuple)


# Where an LDM's autoencoder comes from (``autoencoder.source``): trained on the dataset, or a published foundation
# autoencoder adopted as it is (medimgen.models.foundation; README "Start from a foundation autoencoder").
TRAINED = "trained"
AUTOENCODER_SOURCES = (TRAINED, "maisi")


def is_foundation(source: str) -> bool:
    """Whether an ``autoencoder.source`` is a published foundation autoencoder (adopted), not one trained here."""
    return source != TRAINED


@dataclass(frozen=True)
class AutoencoderConfig:
    channels: tuple[int, ...] = doc("filters per level; few suffice for good reconstructions (seed: 32)", ge=1)
    strides: tuple[tuple[int, ...], ...] = doc(
        "per-axis downsampling of each level transition: nnU-Net's first pooling strides, so an anisotropic axis "
        "is not downsampled where nnU-Net does not downsample it; 2-3 downsamplings at most")
    latent_channels: int = doc("channels of the latent space (3 for 3D, 4 for 2D as in common LDMs)", ge=1)
    num_res_blocks: int = doc("residual blocks per level", 2, ge=1)
    attention_levels: tuple[bool, ...] = doc("self-attention per level (off: too costly at full resolution)", default_factory=tuple)
    norm_num_groups: int = doc("group-norm groups (must divide every channel count)", 32, ge=1)
    activation_checkpointing: bool = doc("recompute activations in backward to save memory", False)
    source: Literal["trained", "maisi"] = doc(
        "where the autoencoder comes from: 'trained' (trained on this dataset by `medimgen train autoencoder`) or "
        "'maisi' (MAISI's published foundation VAE, NV-Generate-CT autoencoder_v1.pt, trained on CT and MR; "
        "`medimgen train autoencoder` adopts it after a reconstruction check instead of training, and trains one "
        "when the check fails). 'maisi' fixes the architecture (channels [64, 128, 256], strides 2 on every axis, "
        "4 latent channels, 2 residual blocks, 32 groups, no attention: validated), needs 3D, one image channel and "
        "data.generate_labels false; planned when its weights are present and the modality is CT or MR (`plan "
        "--explain` says why). Configs without this key are 'trained'", "trained")
    foundation_min_psnr: float = doc(
        "source 'maisi': the reconstruction check's PSNR (dB, over data.intensity_range) the validation cases must "
        "reach for `train autoencoder` to adopt the foundation autoencoder (else it trains one)", 25.0)
    foundation_min_ssim: float = doc(
        "source 'maisi': the reconstruction check's SSIM the validation cases must reach, as foundation_min_psnr",
        0.8, le=1)

    @property
    def is_foundation(self) -> bool:
        """A published foundation autoencoder (``source`` other than 'trained'): adopted, never trained here."""
        return is_foundation(self.source)


# The published architecture of each foundation source (MAISI: Project-MONAI model-zoo maisi_ct_generative
# configs/inference.json "autoencoder_def", the same network as NV-Generate-CT's autoencoder_v1.pt): what
# `autoencoder.source` fixes, in this schema's terms (medimgen.models.foundation builds it; config.validate checks it).
FOUNDATION_ARCHITECTURES = {
    "maisi": AutoencoderConfig(channels=(64, 128, 256), strides=((2, 2, 2), (2, 2, 2)), latent_channels=4,
                               num_res_blocks=2, attention_levels=(False, False, False), norm_num_groups=32,
                               source="maisi"),
}


@dataclass(frozen=True)
class DiscriminatorConfig:
    channels: int = doc("filters of the first patch-discriminator layer", 64, ge=1)
    num_layers: int = doc("strided layers of the patch discriminator (at most what the smallest image axis allows)", 3, ge=1)


@dataclass(frozen=True)
class UNetConfig:
    channels: tuple[int, ...] = doc("filters per level, from nnU-Net's features_per_stage (2D DDPM: 4x, at most 256)", ge=1)
    strides: tuple[tuple[int, ...], ...] = doc("per-axis downsampling between levels, from nnU-Net's pooling strides")
    attention_levels: tuple[bool, ...] = doc(
        "self-attention where a level has at most 32^2 (2D) / 16^3 (3D) positions, never at the first level")
    num_res_blocks: int = doc("residual blocks per level", 2, ge=1)
    num_head_channels: int = doc("channels per attention head", 32, ge=1)
    norm_num_groups: int = doc("group-norm groups (must divide every channel count)", 32, ge=1)
    activation_checkpointing: bool = doc("recompute block activations in backward to save memory", False)


@dataclass(frozen=True)
class ControlNetConfig:
    base: Literal["auto", "ldm", "ddpm"] = doc(
        "the trained generator the ControlNet steers: 'auto' takes the dataset's trained ldm run of the same split, "
        "else its ddpm; a ControlNet run's own config.yaml records the one it was trained on", "auto")
    conditioning_channels: tuple[int, ...] = doc(
        "filters of the conditioning embedding's levels (it reads the one-hot label map, background first, at "
        "image size); a DDPM base uses the first only (no downsampling)", (16, 32, 64), ge=1)
    conditioning_strides: tuple[tuple[int, ...], ...] = doc(
        "per-axis strides between the embedding's levels: the autoencoder's strides, so a full-size label map "
        "reaches the LDM's latent size (one per level transition; empty: the autoencoder's strides; ignored for a "
        "DDPM base)", default_factory=tuple)
    activation_checkpointing: bool = doc("recompute the ControlNet's and the frozen UNet's block activations in "
                                         "backward to save memory", False)
    segmenter: str = doc(
        "nnU-Net that segments the ControlNet's generated images for its follow-the-mask Dice "
        "(quality/follow_mask_dice: Dice between each conditioning map and the segmentation of the image made for "
        "it): 'auto' the dataset's trained nnU-Net of this dimensionality in nnUNet_results when there is one (e.g. "
        "from `medimgen train-feature-nnunet`), 'nnunet:/path/to/model_folder[/fold_X]' a named one, 'none' no Dice",
        "auto", pattern=(r"^(auto|none|nnunet|nnunet:.+)$", "auto, none, nnunet or nnunet:/path/to/model_folder"))


@dataclass(frozen=True)
class SchedulerConfig:
    type: Literal["ddpm", "rflow"] = doc(
        "noise process the model is trained and sampled with: 'ddpm' (beta schedule below; sampled with `sampler`) or "
        "'rflow' (rectified flow, MONAI's RFlowScheduler: the UNet predicts the velocity image - noise, sampled in "
        "num_inference_steps Euler steps; schedule, betas, prediction_type and sampler are not used). Configs "
        "without this key are 'ddpm'", "ddpm")
    num_train_timesteps: int = doc("diffusion steps in training", 1000, ge=1)
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"] = doc("beta schedule", "linear_beta")
    beta_start: float = doc("first beta", 1e-4, gt=0, lt=1)
    beta_end: float = doc("last beta", 2e-2, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = doc("what the UNet predicts", "epsilon")
    sampler: Literal["ddpm", "ddim"] = doc("sampler used for validation plots and sampling", "ddim")
    num_inference_steps: int = doc(
        "sampling steps (DDIM, rflow; at most num_train_timesteps); DDPM always uses num_train_timesteps", 50, ge=1)


@dataclass(frozen=True)
class LossConfig:
    reconstruction: Literal["l1", "l2"] = doc("autoencoder reconstruction loss", "l1")
    kl_weight: float = doc("KL weight of the autoencoder", 1e-6, ge=0)
    perceptual_weight: float = doc("perceptual loss weight (seed's experiments: 1.0 beats 0.01)", 1.0, ge=0)
    adversarial_weight: float = doc("adversarial loss weight (seed's experiments: 0.25 beats 0.1)", 0.25, ge=0)
    perceptual_network: str = doc(
        "alex | vgg | squeeze | radimagenet_resnet50 | medicalnet_resnet10_23datasets | medicalnet_resnet50_23datasets | none "
        "(pretrained weights must be in the torch hub cache; 'none' disables the perceptual loss)", "alex")
    perceptual_fake_3d: bool = doc("3D: apply a 2D network on slices along the three axes", True)
    perceptual_fake_3d_ratio: float = doc("3D fake-3D: fraction of slices used", 0.2, gt=0, le=1)
    adversarial_warmup_epochs: int = doc("epochs of autoencoder training before the discriminator joins", 0, ge=0)
    label_ce_weight: float = doc(
        "joint models: weight of the cross-entropy on the autoencoder's label logits (1.0: as nnU-Net weighs CE "
        "next to Dice)", 1.0, ge=0)
    label_dice_weight: float = doc(
        "joint models: weight of the soft Dice loss on the autoencoder's label logits (1.0, as nnU-Net)", 1.0, ge=0)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = doc("training epochs; planned so the run makes about target_steps optimiser steps", ge=1)
    batch_size: int = doc("micro-batch size per step", ge=1)
    grad_accumulation_steps: int = doc("micro-batches per optimiser step (effective batch = batch_size * this)", 1, ge=1)
    iterations_per_epoch: int = doc("micro-batches per epoch (about one pass over the training cases)", 1, ge=1)
    learning_rate: float = doc("Adam learning rate", 1e-4, gt=0)
    disc_learning_rate: Optional[float] = doc("discriminator learning rate (autoencoder only)", None, gt=0)
    weight_decay: float = doc("AdamW weight decay", 0.0, ge=0)
    lr_schedule: Literal["constant", "cosine", "poly"] = doc("learning-rate schedule over epochs", "constant")
    amp: AmpMode = doc("mixed precision: auto (bf16 where supported, else fp16 with GradScaler; off on CPU)", "auto")
    grad_clip: Optional[float] = doc("max gradient norm (null: no clipping)", 1.0, gt=0)
    ema_decay: Optional[float] = doc("EMA of the weights for sampling, warm-up min(decay, (1+n)/(10+n)) at update n; "
                                     "used once past 1/(1-decay) updates (null: off)", None, ge=0, lt=1)
    val_interval: int = doc("validate every N epochs", 1, ge=1)
    val_plot_interval: int = doc("save sample/reconstruction plots every N epochs", 10, ge=1)
    eval_interval: int = doc("score the model (quality/* metrics in MLflow) every N epochs and at the end of "
                             "training (0: at the end only); planned so scoring costs a bounded share of training", 0,
                             ge=0)
    eval_samples: int = doc("images a generator samples per quality check (0: no quality checks; autoencoders "
                            "reconstruct the validation cases)", 8, ge=0)
    eval_steps: Optional[int] = doc("sampling steps per quality check (null: the scheduler's num_inference_steps)",
                                    None, ge=1)
    seed: int = doc("random seed", 12345, ge=0, le=2**32 - 1)
    cache_latents: bool = doc(
        "latent-space kinds (the LDM, a ControlNet on an LDM) only: train on latents encoded once per training case "
        "by the frozen autoencoder (its posterior's mean and std, stored beside the nnU-Net-preprocessed data in "
        "medimgen_latents/; z = mean + std * noise drawn every step) instead of encoding every augmented batch; "
        "augmentation is then latent flips ('nnunet' only) and crops. Planned true when the cache fits a quarter "
        "of the free disk and of the available RAM and training draws more samples than the cache encodes "
        "(`plan --explain` says why); false: the image-space path; ignored by image-space kinds", False)


@dataclass(frozen=True)
class TrackingConfig:
    experiment_name: Optional[str] = doc("MLflow experiment (null: the dataset name)", None,
                                         pattern=(EXPERIMENT_NAME_RULE, EXPERIMENT_NAME_ALLOWED))
    tracking_uri: Optional[str] = doc("MLflow tracking URI (null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)", None)
    log_models: bool = doc("log trained samplers as MLflow pyfunc models", True)
    register_models: bool = doc("register logged models as DatasetXXX_<model>_<dim>", True)
    log_checkpoints: bool = doc(
        "also copy checkpoints/best.pt and last.pt into the MLflow run (large: last.pt holds the optimiser and EMA; "
        "without it MLflow gets the registered model and the small artifacts only)", False)
    output_mode: Literal["print", "log"] = doc("print progress to the terminal, or write it to log.txt", "print")


@dataclass(frozen=True)
class MemoryConfig:
    target_gb: float = doc("GPU memory the plan must fit (detected GPU, else 8 GB like nnU-Net)", 8.0, gt=0)


@dataclass(frozen=True)
class DerivedConfig:
    """Results, not settings: written by the planner and by training, kept apart from the inputs above."""

    memory_fitted: bool = doc("whether every model's predicted peak fits memory.target_gb (set by the planner)", False)
    predicted_peak_gb: dict = doc("predicted peak training memory per model, GB (set by the planner)",
                                  default_factory=dict)
    autoencoder_choice: str = doc(
        "why the planner picked autoencoder.source (one line; set by the planner, printed by `plan --explain`)", "")
    foundation_check: dict = doc(
        "autoencoder runs of source 'maisi': the reconstruction check on the validation cases (psnr, ssim, the "
        "thresholds, adopted true/false; set by `medimgen train autoencoder`). A run that fell back to training "
        "has source 'trained' and this record", default_factory=dict)
    fallback_autoencoder: dict = doc(
        "autoencoder.source other than 'trained': the autoencoder section `medimgen train autoencoder` trains when "
        "the reconstruction check fails (planned from nnU-Net's strides like any trained one; set by the planner)",
        default_factory=dict)
    latent_scale_factor: Optional[float] = doc(
        "LDM only: 1/std of the autoencoder latents, computed once when LDM training starts (null until then)", None)
    world_size: int = doc("processes (GPUs) the run trains on (set by training; torchrun / --gpus)", 1, ge=1)
    micro_batch_size: Optional[int] = doc(
        "micro-batch per process as trained (set by training: train_*.batch_size, lowered only where several "
        "processes need it to keep the effective batch)", None, ge=1)
    grad_accumulation_steps: Optional[int] = doc(
        "micro-batches per optimiser step on each process as trained (set by training)", None, ge=1)
    effective_batch_size: Optional[int] = doc(
        "samples per optimiser step = micro_batch_size x grad_accumulation_steps x world_size (set by training; "
        "the planned batch_size x grad_accumulation_steps where it divides)", None, ge=1)


@dataclass(frozen=True)
class GenerationConfig:
    """Everything needed to train and sample one dimensionality (2d or 3d) of a dataset."""

    data: DataConfig
    autoencoder: AutoencoderConfig
    discriminator: DiscriminatorConfig
    ddpm_unet: UNetConfig
    ldm_unet: UNetConfig
    ddpm_scheduler: SchedulerConfig
    ldm_scheduler: SchedulerConfig
    losses: LossConfig
    train_autoencoder: TrainConfig
    train_ddpm: TrainConfig
    train_ldm: TrainConfig
    tracking: TrackingConfig
    memory: MemoryConfig
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    train_controlnet: Optional[TrainConfig] = None
    derived: DerivedConfig = field(default_factory=DerivedConfig)

    # -- one section per model, looked up through its kind (medimgen.config.kinds) rather than by name
    def train_for(self, model: str) -> TrainConfig:
        """The training section of ``model`` (a config without train_controlnet, planned by an older medimgen,
        trains a kind steering a generator like its base)."""
        k = kind(model)
        section = getattr(self, k.train_section)
        if section is None and k.steers:
            return self.train_for(self.controlnet_base())
        return section

    def with_train(self, model: str, **changes) -> "GenerationConfig":
        """A copy with ``changes`` applied to the training section of ``model``."""
        from dataclasses import replace

        return replace(self, **{kind(model).train_section: replace(self.train_for(model), **changes)})

    def controlnet_base(self) -> str:
        """The generator a ControlNet of this config steers: ``controlnet.base``, for 'auto' the first of
        kinds.auto_generators() (the LDM: what planning assumes; training records the base it found)."""
        return auto_generators()[0] if self.controlnet.base == "auto" else self.controlnet.base

    def generator_for(self, model: str) -> str:
        """The generator whose networks and noise process ``model`` samples with: itself, or the base it steers."""
        return self.controlnet_base() if kind(model).steers else kind(model).name

    def space_of(self, model: str) -> str:
        """'image' or 'latent': where ``model`` works (a kind steering a generator: where its base works)."""
        return kind(self.generator_for(model)).space

    def network_for(self, model: str):
        """The network section of ``model`` itself (a ControlNet: its own, not its base's)."""
        return getattr(self, kind(model).network_section)

    def unet_for(self, model: str) -> UNetConfig:
        """The diffusion UNet of ``model`` (a generator; one steering a generator: its base's, which it copies)."""
        return self.network_for(self.generator_for(model))

    def scheduler_for(self, model: str) -> SchedulerConfig:
        """The noise process of ``model`` (a generator; one steering a generator: its base's)."""
        return getattr(self, kind(self.generator_for(model)).scheduler_section)

    def trained_fallback(self) -> "GenerationConfig":
        """A config whose autoencoder is a foundation one (``autoencoder.source``): the copy that trains the planned
        fallback autoencoder instead (``derived.fallback_autoencoder``; memory fitting uses it; a failed
        reconstruction check re-plans the whole dimensionality instead: medimgen.planning.fallback). A trained autoencoder's config: itself."""
        from dataclasses import replace

        if not self.autoencoder.is_foundation:
            return self
        from medimgen.config.io import from_dict
        from medimgen.core.errors import MedimgenError

        if not self.derived.fallback_autoencoder:
            raise MedimgenError("autoencoder.source is a foundation autoencoder, but derived.fallback_autoencoder is "
                                "empty: re-plan (medimgen plan) to get the autoencoder a failed check trains")
        ae = from_dict(AutoencoderConfig, dict(self.derived.fallback_autoencoder), "derived.fallback_autoencoder")
        ae = replace(ae, source=TRAINED, activation_checkpointing=self.autoencoder.activation_checkpointing)
        return replace(self, autoencoder=ae)

    @property
    def dim(self) -> str:
        """'2d' or '3d'."""
        return f"{self.data.spatial_dims}d"


@dataclass(frozen=True)
class DatasetInfo:
    id: int = doc("nnU-Net dataset id")
    name: str = doc("nnU-Net dataset folder name")
    num_training: int = doc("training cases (dataset.json numTraining)")
    labels: dict = doc("label names -> values, from dataset.json")
    file_ending: str = doc("image file ending of the raw dataset")
    transpose_forward: tuple[int, ...] = doc("nnU-Net's axis transposition of raw to preprocessed arrays")
    transpose_backward: tuple[int, ...] = doc("inverse of transpose_forward")
    original_median_spacing: tuple[float, ...] = doc("median spacing of the raw data (transposed order), mm")
    plans_identifier: str = doc(
        "nnU-Net plans used (`medimgen plan --plans`; the same as every section's data.plans_identifier)",
        "nnUNetPlans", pattern=(PLANS_IDENTIFIER, PLANS_IDENTIFIER_ALLOWED))


@dataclass(frozen=True)
class MedimgenConfig:
    """The whole medimgen_config.yaml: dataset facts plus a 2d and (for 3D data) a 3d section."""

    dataset: DatasetInfo
    configs: dict  # {"2d": GenerationConfig, "3d": GenerationConfig}
    medimgen_version: str = __version__

    def get(self, dim: str) -> GenerationConfig:
        from medimgen.core.errors import MedimgenError

        if dim not in self.configs:
            raise MedimgenError(
                f"no '{dim}' section in the configuration of {self.dataset.name} (available: {', '.join(sorted(self.configs))})")
        return self.configs[dim]
