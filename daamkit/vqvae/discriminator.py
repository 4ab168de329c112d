"""The adversarial part of the tokenizer recipe: taming-transformers' PatchGAN discriminator and its losses.

`PatchDiscriminator` scores overlapping patches (one logit each). The generator's adversarial term is
scaled by taming's adaptive weight, the ratio of the reconstruction and adversarial gradient norms at the
decoder's last layer, so neither term drowns the other. `LeCam` is the optional regulariser of Tseng et
al. (2021) that Open-MAGVIT2 and TiTok add: it ties the discriminator's logits to running means of the
opposite side's logits; its running means are part of the training state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from daamkit.infra.errors import DaamkitError
from daamkit.vqvae.config import DISC_LOSSES

DISC_WEIGHTS_FILE = "discriminator.safetensors"  # beside model.safetensors in a GAN run's checkpoints


class PatchDiscriminator(nn.Module):
    """taming's NLayerDiscriminator: 4x4 convs, stride 2 for `layers` stages (channels double up to 8x),
    BatchNorm + LeakyReLU(0.2), then a stride-1 stage and a one-channel stride-1 conv: logits [B, 1, h, w]."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        stack: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = channels
        for stage in range(1, layers + 1):
            out = channels * min(2 ** stage, 8)
            stride = 2 if stage < layers else 1
            stack += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            width = out
        stack.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*stack)
        self.apply(_taming_init)

    def forward(self, images: torch.Tensor, batches: int = 1) -> torch.Tensor:
        """Patch logits of `images`. `batches` > 1: `images` is that many equal batches stacked (real images,
        then reconstructions) and every BatchNorm normalises each batch on its own, as separate forward passes
        would (taming scores real and fake images in two calls); one call keeps one DDP forward per backward.
        Normalising real and fake together would let the discriminator tell them apart by their batch statistics,
        which the generator's step, a batch of reconstructions alone, never shows it."""
        if batches == 1:
            return self.main(images)
        x = images
        for layer in self.main:
            x = torch.cat([layer(part) for part in x.chunk(batches)]) if isinstance(layer, nn.BatchNorm2d) else layer(x)
        return x


def _taming_init(module: nn.Module) -> None:
    """N(0, 0.02) conv kernels, N(1, 0.02) BatchNorm scales, zero BatchNorm shifts (taming's weights_init)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def discriminator_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge: mean(relu(1 - real)) + mean(relu(1 + fake)); non-saturating: softplus(-real) + softplus(fake);
    halved, as in taming."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    if kind == "non-saturating":
        return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    raise DaamkitError(f"`disc_loss` must be one of {DISC_LOSSES}, got {kind!r}")


def generator_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """Hinge: -mean(fake); non-saturating: mean(softplus(-fake))."""
    if kind == "hinge":
        return -fake.mean()
    if kind == "non-saturating":
        return F.softplus(-fake).mean()
    raise DaamkitError(f"`disc_loss` must be one of {DISC_LOSSES}, got {kind!r}")


def adaptive_weight(nll: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """taming's balance: |d nll / d W| / (|d adv / d W| + 1e-4) at the decoder's last weight W, clamped to
    [0, 1e4] and detached (the graph is kept for the backward pass that follows)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class LeCam:
    """LeCam regulariser: mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2), with exponential
    running means (decay 0.999 in the paper) of the mean real and fake logits."""

    def __init__(self, decay: float = 0.999):
        self.decay = decay
        self.ema_real = self.ema_fake = None

    def __call__(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        real_mean, fake_mean = real.detach().mean().float(), fake.detach().mean().float()
        if self.ema_real is None:
            self.ema_real, self.ema_fake = real_mean, fake_mean
        else:
            self.ema_real = self.decay * self.ema_real + (1 - self.decay) * real_mean
            self.ema_fake = self.decay * self.ema_fake + (1 - self.decay) * fake_mean
        return F.relu(real - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - fake).pow(2).mean()

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"ema_real": self.ema_real, "ema_fake": self.ema_fake}

    def load_state_dict(self, state: dict[str, torch.Tensor | None]) -> None:
        self.ema_real, self.ema_fake = state["ema_real"], state["ema_fake"]
