"""Weight EMA: an exponential moving average of the tokenizer's weights, what LlamaGen, Open-MAGVIT2 and
TiTok evaluate. The average starts as a copy of the model and after every optimizer step becomes
`decay * average + (1 - decay) * weights` for every floating-point tensor of the state dict (parameters
and buffers such as the EMA codebook); other buffers (flags) are copied."""

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

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for average, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            if average.is_floating_point():
                average.lerp_(value.detach().to(average.dtype), 1.0 - self.decay)
            else:
                average.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()
