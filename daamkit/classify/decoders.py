"""DAT decoders: an attention module over the encoder's layer tokens, then the paper's conv head.

Input is one pooled vector per encoder layer, `[B, N_layers, d]`. Every attention module treats the N
layers as the token (or norm) axis of one item, never the batch axis (the authors' MHA attends across
the batch by mistake). The head reshapes the attention output `[B, N, w]` into `[B, N, h, w']` images
(h * w' = w, as square as possible), applies Conv2d(N->512, 3x3) -> ReLU -> Conv2d(512->N, 3x3) -> ReLU,
flattens and classifies with one Linear layer. Everything outside the attention module is Xavier-initialised.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from daamkit.common import (
    GQDAAM,
    DensityAdaptiveAttention,
    DensityBlock,
    GroupedQueryAttention,
    MixtureDensityAdaptiveAttention,
)
from daamkit.infra.errors import DaamkitError

DECODERS = ("mha", "mha-bn", "gqa", "daam-v1", "daam-v2", "gqdaam", "mixture")
# Decoders whose attention module produces a density gate (Importance Factor, Gaussian parameter table).
DENSITY_DECODERS = ("daam-v1", "daam-v2", "gqdaam", "mixture")
# The paper's head counts per decoder (Table 1); `--heads` overrides them.
DEFAULT_HEADS = {"mha": 8, "mha-bn": 8, "gqa": 8, "daam-v1": 8, "daam-v2": 1, "gqdaam": 8, "mixture": 8}
DEFAULT_GAUSSIANS = 4
GQA_KV_HEADS = 2
GQA_HEAD_DIM = 64
GQDAAM_QUERY_HEADS = 8  # GQDAAM's GQA stage keeps the paper's 8 query heads; --heads sets its DAAM heads
CONV_CHANNELS = 512


@dataclass(frozen=True)
class DecoderConfig:
    """Everything needed to rebuild a decoder (stored in checkpoints and run.json)."""

    decoder: str
    num_layers: int
    hidden_size: int
    num_classes: int
    heads: int
    gaussians: int = DEFAULT_GAUSSIANS

    def to_dict(self) -> dict:
        return asdict(self)


def check_decoder(decoder: str) -> None:
    """DaamkitError for a decoder name daamkit does not build."""
    if decoder not in DECODERS:
        raise DaamkitError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")


def decoder_config(
    decoder: str,
    num_layers: int,
    hidden_size: int,
    num_classes: int,
    heads: Optional[int] = None,
    gaussians: Optional[int] = None,
) -> DecoderConfig:
    """Validate a decoder choice against the cache shape; every bad combination is one DaamkitError line."""
    check_decoder(decoder)
    heads = DEFAULT_HEADS[decoder] if heads is None else heads
    gaussians = DEFAULT_GAUSSIANS if gaussians is None else gaussians
    if heads < 1 or gaussians < 1:
        raise DaamkitError("--heads and --gaussians must be at least 1")
    if num_classes < 2:
        raise DaamkitError(f"a classifier needs at least 2 classes, the feature cache has {num_classes}")
    if decoder in DENSITY_DECODERS and num_layers < heads:
        raise DaamkitError(
            f"decoder {decoder} splits the {num_layers} encoder layer(s) among {heads} heads; "
            f"use --heads {num_layers} or fewer, or train on more layers"
        )
    if decoder in ("mha", "mha-bn") and hidden_size % heads:
        raise DaamkitError(f"decoder {decoder}: hidden size {hidden_size} is not divisible by {heads} heads")
    if decoder == "gqa" and heads % GQA_KV_HEADS:
        raise DaamkitError(f"decoder gqa: {heads} query heads are not a multiple of the {GQA_KV_HEADS} key/value heads")
    return DecoderConfig(decoder, num_layers, hidden_size, num_classes, heads, gaussians)


def grid_shape(width: int) -> tuple[int, int]:
    """(h, w) with h * w = width and h <= w as close as possible: 1024 -> (32, 32), 5120 -> (64, 80)."""
    h = math.isqrt(width)
    while width % h:
        h -= 1
    return h, width // h


class _AttentionStage(nn.Module):
    """The decoder's attention module behind one interface: `forward(x, return_gate) -> (out, gate | None)`."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        n, d, heads = config.num_layers, config.hidden_size, config.heads
        self.kind = config.decoder
        self.norm: Optional[nn.Module] = None
        if self.kind in ("mha", "mha-bn"):
            # batch_first=True: the sequence axis is the N layer tokens of each item, not the batch.
            self.module = nn.MultiheadAttention(d, heads, batch_first=True)
            if self.kind == "mha-bn":
                self.norm = nn.BatchNorm1d(n)
            self.out_features = d
        elif self.kind == "gqa":
            self.module = GroupedQueryAttention(d, num_query_heads=heads, num_kv_heads=GQA_KV_HEADS, head_dim=GQA_HEAD_DIM)
            self.out_features = heads * GQA_HEAD_DIM
        elif self.kind == "gqdaam":
            self.module = GQDAAM(
                d, num_heads=heads, num_query_heads=GQDAAM_QUERY_HEADS, num_kv_heads=GQA_KV_HEADS, head_dim=GQA_HEAD_DIM
            )
            self.out_features = GQDAAM_QUERY_HEADS * GQA_HEAD_DIM
        elif self.kind == "mixture":
            self.module = DensityBlock(1, heads, config.gaussians, norm_axis=1)
            self.out_features = d
        else:  # daam-v1 / daam-v2: statistics across the layer axis, one (delta, c) pair per feature and head
            self.module = DensityAdaptiveAttention(heads, d, norm_axis=1, feature_axis=-1)
            self.out_features = d

    def forward(self, x: Tensor, return_gate: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if self.kind in ("mha", "mha-bn"):
            out = self.module(x, x, x, need_weights=False)[0]
            return (out if self.norm is None else self.norm(out)), None
        if self.kind == "gqa":
            return self.module(x), None
        if return_gate:
            return self.module(x, return_gate=True)
        return self.module(x), None


class DATDecoder(nn.Module):
    """Attention module over layer tokens -> conv head on each layer's feature image -> linear classifier."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.attention = _AttentionStage(config)
        n, width = config.num_layers, self.attention.out_features
        self.grid = grid_shape(width)
        self.head = nn.Sequential(
            nn.Conv2d(n, CONV_CHANNELS, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(CONV_CHANNELS, n, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(n * width, config.num_classes),
        )
        for layer in self.head:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, return_gate: bool = False):
        """Logits `[B, classes]`; with `return_gate=True` also the density gate `[B, N, d]` (None if not DAAM)."""
        out, gate = self.attention(x, return_gate=return_gate)
        logits = self.head(out.unflatten(-1, self.grid))
        return (logits, gate) if return_gate else logits


def build_decoder(config: DecoderConfig) -> DATDecoder:
    """A fresh decoder for `config` (core ValueErrors about shapes become one DaamkitError line)."""
    try:
        return DATDecoder(config)
    except ValueError as err:
        raise DaamkitError(f"cannot build decoder {config.decoder}: {err}") from err


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def gaussian_parameter_ranges(decoder: DATDecoder) -> Optional[dict]:
    """Min/max of the learned mean offsets and scaled variances `c` (paper Table 5), or None for non-DAAM decoders.

    The raw parameters are reported; the forward pass clamps `c` to a small positive floor.
    """
    offsets, variances = [], []
    for module in decoder.attention.modules():
        if isinstance(module, (DensityAdaptiveAttention, MixtureDensityAdaptiveAttention)):
            offsets.append(module.mean_offset.detach().float().flatten())
            variances.append(module.c.detach().float().flatten())
    if not offsets:
        return None
    offset, variance = torch.cat(offsets), torch.cat(variances)
    return {
        "mean_offset": {"min": offset.min().item(), "max": offset.max().item()},
        "scaled_variance": {"min": variance.min().item(), "max": variance.max().item()},
    }
