"""Weight EMA: an exponential moving average of the tokenizer's weights, what LlamaGen, Open-MAGVIT2 and
TiTok evaluate. The average starts as a copy of the model and after optimizer step `t` (0-based) becomes
`d * average + (1 - d) * weights` for every floating-point tensor of the state dict (parameters and
buffers such as the EMA codebook), with the warmed-up decay `d = min(decay, (1 + t) / (10 + t))`; other
buffers (flags) are copied. Without the warm-up, a 0.9999 average of a run of a few thousand steps would
still be mostly the random initialisation."""

from __future__ import annotations

import copy

import torch
from torch import nn

EMA_WEIGHTS_FILE = "ema.safetensors"  # saved beside model.safetensors; preferred by evaluate/reconstruct/encode/decode


class WeightEMA:
    """A frozen copy of `model` (`.module`, usable for evaluation) whose weights track `model` via `update`."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, step: int) -> float:
        """The decay used after optimizer step `step` (0-based): `decay`, warmed up over the first steps."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        weight = 1.0 - self.decay_at(step)
        for average, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            if average.is_floating_point():
                average.lerp_(value.detach().to(average.dtype), weight)
            else:
                average.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()
