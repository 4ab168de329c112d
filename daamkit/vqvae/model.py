"""The DAAM-enhanced VQ-VAE: encoder of DownSampleBlocks, vector quantizer, mirrored decoder of UpSampleBlocks.

Each block ends in a residual block `x + a(h)` with `h = conv(relu(gn(conv(x))))`; `attention` picks how
Mixture-DAAM (over the channel axis, `norm_axis=1`) re-weights the branch, `a`:

- `daam` (the paper's form): `a(h) = h + MixtureDAAM(h) = h * (1 + mix)`, in every block.
- `daam-gated`: `a(h) = h * (1 + alpha * (C_h * mix - 1))`, per-channel alpha initialised to 0, in every block;
  `C_h * mix` has mean 1 over a head's C_h channels, so the network at initialisation equals `none`.
- `daam-gated-inner`: the gated form only in the two blocks nearest the quantizer (the encoder's last and
  the decoder's first), where the feature maps are smallest; the other blocks are plain.
- `none`: `a(h) = h`, the identical network without DAAM (the ablation baseline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from daamkit.common import MixtureDensityAdaptiveAttention
from daamkit.common.heads import head_sizes
from daamkit.vqvae.config import VQVAEConfig
from daamkit.vqvae.quantizer import QuantizerOutput, VectorQuantizer


def _group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= 32 that divides `channels`."""
    groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def _in_layout_of(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`t` in the memory layout of the model's conv `weight` (a no-op when it already is): contiguous unless
    the model was converted with `.to(memory_format=torch.channels_last)`. On CPU the quantizer's output and
    oneDNN's ConvTranspose2d come back channels-last; one layout through the network keeps the elementwise
    ops and Mixture-DAAM on their fast path (measured: benchmarks/bench_vqvae.py)."""
    channels_last = not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _mixture(config: VQVAEConfig, skip: bool = False) -> MixtureDensityAdaptiveAttention:
    return MixtureDensityAdaptiveAttention(config.heads, config.gaussians, norm_axis=1, init_c=config.init_c, skip=skip)


class GatedDAAM(nn.Module):
    """`h * (1 + alpha * (C_h * mix - 1))`: a zero-initialised, per-channel gate on Mixture-DAAM's map `mix`.

    `C_h` is the size of the channel's head, so `C_h * mix` has mean 1 per head and alpha = 0 (the
    initialisation) is the identity: the network starts as `attention="none"` and learns how much DAAM to use.
    """

    def __init__(self, channels: int, config: VQVAEConfig):
        super().__init__()
        self.mixture = _mixture(config)
        self.alpha = nn.Parameter(torch.zeros(channels))
        # heads split the channels as the Mixture-DAAM does (`head_sizes`)
        head_size = torch.cat([torch.full((size,), float(size)) for size in head_sizes(channels, config.heads)])
        self.register_buffer("head_size", head_size, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        _, mix = self.mixture(h, return_gate=True)
        shape = (1, -1) + (1,) * (h.dim() - 2)
        alpha, head_size = self.alpha.view(shape), self.head_size.view(shape)
        return h * (1 + alpha * (head_size * mix.to(h.dtype) - 1))


class DAAMResidualBlock(nn.Module):
    """`x + a(h)`, h = conv3x3(relu(gn(conv3x3(x)))); `a` is one of the module docstring's forms."""

    def __init__(self, channels: int, config: VQVAEConfig, form: str):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = _group_norm(channels)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.attention: nn.Module | None = None
        if form == "daam":  # h + MixtureDAAM(h), fused
            self.attention = _mixture(config, skip=True)
        elif form == "gated":
            self.attention = GatedDAAM(channels, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.act(self.norm(self.conv1(x))))
        if self.attention is not None:
            h = self.attention(h)
        return x + h


def block_forms(config: VQVAEConfig) -> list[str]:
    """The residual-block form ("daam", "gated" or "none") of each down-sampling block, outermost first;
    the decoder's up-sampling blocks mirror it."""
    n = config.num_downsamples
    if config.attention == "daam-gated-inner":
        return ["none"] * (n - 1) + ["gated"]
    return [{"daam": "daam", "daam-gated": "gated", "none": "none"}[config.attention]] * n


class _ResampleBlock(nn.Module):
    """`conv` (stride 2) -> GroupNorm -> ReLU -> DAAM residual block."""

    def __init__(self, conv: nn.Module, out_channels: int, config: VQVAEConfig, form: str):
        super().__init__()
        self.conv = conv
        self.norm = _group_norm(out_channels)
        self.act = nn.ReLU()
        self.residual = DAAMResidualBlock(out_channels, config, form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(self.act(self.norm(_in_layout_of(self.conv(x), self.conv.weight))))


class DownSampleBlock(_ResampleBlock):
    """Conv stride 2 -> GroupNorm -> ReLU -> DAAM residual block (halves H and W)."""

    def __init__(self, in_channels: int, out_channels: int, config: VQVAEConfig, form: str):
        super().__init__(nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), out_channels, config, form)


class UpSampleBlock(_ResampleBlock):
    """ConvTranspose stride 2 -> GroupNorm -> ReLU -> DAAM residual block (doubles H and W)."""

    def __init__(self, in_channels: int, out_channels: int, config: VQVAEConfig, form: str):
        super().__init__(nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1), out_channels, config,
                         form)


class Encoder(nn.Module):
    """conv_in -> DownSampleBlocks -> 1x1 conv to `embedding_dim`."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        ch, forms = config.channels, block_forms(config)
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.blocks = nn.Sequential(*(DownSampleBlock(ch[i], ch[i + 1], config, forms[i])
                                      for i in range(config.num_downsamples)))
        self.conv_out = nn.Conv2d(ch[-1], config.embedding_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.blocks(self.conv_in(x)))


class Decoder(nn.Module):
    """1x1 conv from `embedding_dim` -> UpSampleBlocks (mirroring the encoder) -> conv_out."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        ch, forms = config.channels, block_forms(config)
        self.conv_in = nn.Conv2d(config.embedding_dim, ch[-1], 1)
        self.blocks = nn.Sequential(*(UpSampleBlock(ch[i + 1], ch[i], config, forms[i])
                                      for i in reversed(range(config.num_downsamples))))
        self.conv_out = nn.Conv2d(ch[0], config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.blocks(self.conv_in(z)))


def _ask_for_gate(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: call the Mixture-DAAM module with `return_gate=True`."""
    return args, {**kwargs, "return_gate": True}


def _gate_keeper(name: str, gates: dict[str, torch.Tensor]):
    """Forward hook: store the gate under `name` (detached) and hand the block only the gated output."""
    def hook(module: nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        gates[name] = output[1].detach()
        return output[0]
    return hook


@dataclass
class VQVAEOutput:
    reconstruction: torch.Tensor     # [B, C, H, W], images live in [-1, 1]
    quant: QuantizerOutput
    # with `return_gates=True`: Mixture-DAAM module name -> its density gate [B, C, h, w] (empty without DAAM)
    gates: dict[str, torch.Tensor] = field(default_factory=dict)


class VQVAE(nn.Module):
    """Image tokenizer: images in [-1, 1], H and W divisible by 2**num_downsamples."""

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(
            config.num_embeddings, config.embedding_dim, beta=config.beta, ema=config.ema, decay=config.ema_decay,
            l2_normalize=config.l2_normalize, dead_code_threshold=config.dead_code_threshold,
            chunk_elements=config.search_chunk_elements,
        )
        self.decoder = Decoder(config)

    def forward(self, images: torch.Tensor, return_gates: bool = False) -> VQVAEOutput:
        """Reconstruct `images`; `return_gates=True` also collects the density gate of every Mixture-DAAM
        module (`output.gates`, keyed by module name, in encoder-then-decoder order) for inspection."""
        if not return_gates:
            quant = self.quantizer(self.encoder(images))
            return VQVAEOutput(self.decoder(quant.quantized), quant)
        gates: dict[str, torch.Tensor] = {}
        handles = []
        for name, module in self.named_modules():
            if isinstance(module, MixtureDensityAdaptiveAttention):
                handles.append(module.register_forward_pre_hook(_ask_for_gate, with_kwargs=True))
                handles.append(module.register_forward_hook(_gate_keeper(name, gates)))
        try:
            quant = self.quantizer(self.encoder(images))
            reconstruction = self.decoder(quant.quantized)
        finally:
            for handle in handles:
                handle.remove()
        return VQVAEOutput(reconstruction, quant, gates)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Token-id grids [B, H/f, W/f] for images [B, C, H, W] in [-1, 1]."""
        return self.quantizer(self.encoder(images)).indices

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from token-id grids [B, h, w]."""
        return self.decoder(self.quantizer.lookup(indices))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def daam_parameters(self) -> dict[str, torch.Tensor]:
        """Named Mixture-DAAM parameters and gates' alpha (for TensorBoard histograms); empty for attention="none"."""
        return {name: p for name, p in self.named_parameters() if ".attention." in name}

