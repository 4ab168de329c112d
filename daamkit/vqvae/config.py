"""Dataclass configs for the VQ-VAE model and its training run; both round-trip through JSON dicts.

`VQVAEConfig` fully describes the network (what a checkpoint needs to rebuild it); `TrainConfig` holds
the run's options (data, schedule, losses, logging), so a checkpoint folder can resume a run exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

from daamkit.infra.errors import DaamkitError
from daamkit.infra.typed_values import check_field_types

ATTENTION_CHOICES = ("daam", "daam-gated", "daam-gated-inner", "none")  # forms: daamkit.vqvae.model
RECON_LOSSES = ("l1", "mse")
MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")
DISC_LOSSES = ("hinge", "non-saturating")
LPIPS_NETS = ("alex", "vgg")
RESIZE_MODES = ("auto", "crop", "resize-crop")


def min_disc_image_size(layers: int) -> int:
    """Smallest square input a PatchGAN of `layers` stride-2 stages scores: after them, two 4x4 stride-1
    convs (padding 1) each shrink the map by one, and at least one patch logit must remain."""
    return 3 * 2 ** layers


def _from_dict(cls, values: dict[str, Any], what: str):
    """Build dataclass `cls` from `values`, refusing unknown keys with a DaamkitError."""
    if not isinstance(values, dict):
        raise DaamkitError(f"{what} must be a JSON object, got {type(values).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise DaamkitError(f"{what} has unknown key(s): {', '.join(unknown)}")
    try:
        return cls(**values)
    except TypeError as err:
        raise DaamkitError(f"{what} is invalid: {err}") from err


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise DaamkitError(message)


@dataclass
class VQVAEConfig:
    """Architecture of the DAAM VQ-VAE (encoder, quantizer, decoder).

    Channels start at `base_channels` (conv_in) and double after every down-sampling block except the
    first, capped at 4x, so `num_downsamples=2, base_channels=32` gives 32 -> 32 -> 64 channels and a
    latent grid of image_size / 4.
    """

    in_channels: int = 3
    base_channels: int = 32
    num_downsamples: int = 2
    embedding_dim: int = 64
    num_embeddings: int = 512
    attention: str = "none"
    heads: int = 8
    gaussians: int = 4
    init_c: float = 2.0
    beta: float = 0.25
    ema: bool = True
    ema_decay: float = 0.99
    l2_normalize: bool = False
    dead_code_threshold: float = 1.0
    search_chunk_elements: int = 1 << 24

    def __post_init__(self) -> None:
        check_field_types(self)
        _require(self.attention in ATTENTION_CHOICES, f"`attention` must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        for name in ("in_channels", "base_channels", "num_downsamples", "embedding_dim", "num_embeddings",
                     "heads", "gaussians", "search_chunk_elements"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                     f"`{name}` must be a positive integer, got {getattr(self, name)!r}")
        _require(self.num_embeddings >= 2, "`num_embeddings` must be at least 2")
        _require(self.init_c > 0, f"`init_c` must be positive, got {self.init_c}")
        _require(0.0 <= self.beta, f"`beta` must be >= 0, got {self.beta}")
        _require(0.0 < self.ema_decay < 1.0, f"`ema_decay` must be in (0, 1), got {self.ema_decay}")
        if self.attention != "none":
            smallest = min(self.channels)
            _require(self.heads <= smallest,
                     f"`heads` {self.heads} exceeds the smallest channel count {smallest}; lower `heads` or raise "
                     "`base_channels`")

    @property
    def channels(self) -> list[int]:
        """Channel count after conv_in and after each down-sampling block (length num_downsamples + 1)."""
        return [self.base_channels] + [self.base_channels * min(2 ** i, 4) for i in range(self.num_downsamples)]

    @property
    def downsample_factor(self) -> int:
        return 2 ** self.num_downsamples

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VQVAEConfig":
        return _from_dict(cls, values, "VQ-VAE model config")


@dataclass
class TrainConfig:
    """Options of one training run. `data` is "samples", an image folder, or a COCO 2017 root."""

    data: str = "samples"
    image_size: int = 64
    steps: int = 1000
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    recon_loss: str = "l1"
    perceptual_weight: float = 0.0
    lpips_net: str = "vgg"  # the anchors (taming, LlamaGen, Open-MAGVIT2) train with LPIPS-VGG
    lpips_weights: Optional[str] = None
    resize_mode: str = "auto"  # auto = resize-crop on COCO and folders of 1,000+ images, crop otherwise
    mixed_precision: str = "no"
    compile: bool = False
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    eval_every: int = 250
    val_images: int = 64
    disc_weight: float = 0.0
    disc_start: int = 0
    disc_loss: str = "hinge"
    adaptive_disc_weight: bool = True
    lecam_weight: float = 0.0
    disc_lr: Optional[float] = None
    disc_channels: int = 64
    disc_layers: int = 3
    weight_ema: float = 0.0

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("image_size", "steps", "batch_size", "log_every", "eval_every", "val_images"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                     f"`{name}` must be a positive integer, got {getattr(self, name)!r}")
        _require(self.lr > 0, f"`lr` must be positive, got {self.lr}")
        _require(self.warmup_steps >= 0 and self.num_workers >= 0, "`warmup_steps` and `num_workers` must be >= 0")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"`min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.grad_clip >= 0, f"`grad_clip` must be >= 0 (0 disables), got {self.grad_clip}")
        _require(self.recon_loss in RECON_LOSSES, f"`recon_loss` must be one of {RECON_LOSSES}, got {self.recon_loss!r}")
        _require(self.perceptual_weight >= 0, f"`perceptual_weight` must be >= 0, got {self.perceptual_weight}")
        _require(self.resize_mode in RESIZE_MODES,
                 f"`resize_mode` must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        _require(self.lpips_net in LPIPS_NETS, f"`lpips_net` must be one of {LPIPS_NETS}, got {self.lpips_net!r}")
        _require(self.mixed_precision in MIXED_PRECISION_CHOICES,
                 f"`mixed_precision` must be one of {MIXED_PRECISION_CHOICES}, got {self.mixed_precision!r}")
        self._check_adversarial()
        _require(self.weight_ema == 0.0 or 0.0 < self.weight_ema < 1.0,
                 f"`weight_ema` must be 0 (off) or in (0, 1), got {self.weight_ema}")

    def _check_adversarial(self) -> None:
        for name in ("disc_weight", "lecam_weight", "disc_start"):
            _require(getattr(self, name) >= 0, f"`{name}` must be >= 0, got {getattr(self, name)}")
        _require(self.disc_loss in DISC_LOSSES, f"`disc_loss` must be one of {DISC_LOSSES}, got {self.disc_loss!r}")
        _require(self.disc_lr is None or self.disc_lr > 0, f"`disc_lr` must be positive, got {self.disc_lr}")
        for name in ("disc_channels", "disc_layers"):
            _require(getattr(self, name) >= 1, f"`{name}` must be a positive integer, got {getattr(self, name)}")
        if self.disc_weight > 0:
            smallest = min_disc_image_size(self.disc_layers)
            _require(self.image_size >= smallest,
                     f"`image_size` {self.image_size} is below the {smallest} px a discriminator of `disc_layers` "
                     f"{self.disc_layers} needs; lower `disc_layers` or raise `image_size`")

    @property
    def gan(self) -> bool:
        return self.disc_weight > 0

    @property
    def discriminator_lr(self) -> float:
        """The discriminator's learning rate: `disc_lr`, else the generator's `lr`."""
        return self.lr if self.disc_lr is None else self.disc_lr

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, values, "training config")

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def checkpoint_config(model: VQVAEConfig, train: TrainConfig | None) -> dict[str, Any]:
    """The `config.json` payload of a VQ-VAE checkpoint."""
    return {"kind": "daamkit-vqvae", "model": model.to_dict(), "train": train.to_dict() if train else None}


def parse_checkpoint_config(raw: dict[str, Any], source: str) -> tuple[VQVAEConfig, TrainConfig | None]:
    """Inverse of `checkpoint_config`; DaamkitError when `source` is not a VQ-VAE checkpoint."""
    if not isinstance(raw, dict) or raw.get("kind") != "daamkit-vqvae" or "model" not in raw:
        raise DaamkitError(f"{source} is not a daamkit VQ-VAE checkpoint (config.json has no VQ-VAE model section)")
    model = VQVAEConfig.from_dict(raw["model"])
    train = TrainConfig.from_dict(raw["train"]) if raw.get("train") else None
    return model, train
