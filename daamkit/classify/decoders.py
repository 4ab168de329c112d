"""DAT decoders: an attention module over the encoder's layer tokens, then a head; and the linear probe
every table compares them with. Decoders come from one registry (`REGISTRY`).

Input is one pooled vector per encoder layer, `[B, N_layers, d]`. Every attention module treats the N
layers as the token (or norm) axis of one item, never the batch axis (the authors' MHA attends across the
batch by mistake). Heads (`HEADS`):
- `conv`, the paper's: reshape the attention output `[B, N, w]` into `[B, N, h, w']` images (h * w' = w, as
  square as possible), Conv2d(N->512, 3x3) -> ReLU -> Conv2d(512->N, 3x3) -> ReLU, flatten, one Linear layer;
- `linear`: flatten the attention output and classify it with one Linear layer, so the attention stage is
  the decoder's only non-linearity. On a user's few hundred items the conv head's 3x3 filters over an
  arbitrary folding of the feature vector were no more accurate and took most of the training time;
- `mix`: a learned weighted sum of the attention output over the layers (as SUPERB's weighted sum of
  layers; `LayerMix`), then one Linear layer on that one `[B, w]` vector. The classifier has the linear
  probe's size whatever the layer count, and the layer weights say which layers the decoder reads.
`residual` adds the input to the attention output of `mha`, `mha-bn`, `gqa`, `gqdaam`, `daam-v1` and
`daam-v2`, as every transformer block does and the paper's decoders do not: `x + attention(x)` (mha-bn's
BatchNorm then moves before the attention; gqa/gqdaam project their heads back to the input width, and
gqdaam adds its DAAM-gated input; for DAAM it is the skip form `x + x * gate`, the one the `mixture`
decoder and the VQ-VAE always use). The decoder then starts from the encoder's own features, and on a
user's few hundred items the projection weights only have to learn a correction. Without it gqa/gqdaam
see each layer only through their two 64-wide key/value heads, and a DAAM gate that is small where a
layer stands out from the others (often the encoder's last layer, the most informative) shrinks that
layer's features. Everything outside the attention module is Xavier-initialised. `dropout` (0 in
the paper) drops the classifier's inputs while training: on a user's few hundred items the head otherwise
memorises the training set within a few epochs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

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
from daamkit.infra.progress import log

DEFAULT_GAUSSIANS = 4
GQA_KV_HEADS = 2
GQA_HEAD_DIM = 64
GQDAAM_QUERY_HEADS = 8  # GQDAAM's GQA stage keeps the paper's 8 query heads; `heads` sets its DAAM heads
CONV_CHANNELS = 512
MIX_SPEED = 10.0  # how much faster the `mix` head's layer weights learn than the other parameters (LayerMix)
HEADS = ("conv", "linear", "mix")
# A density head standardises over its own chunk of layers: over one layer the value is always 0, so the
# gate is exactly 1 and its parameters get zero gradients (DAAM is inert). Every head needs this many.
MIN_LAYERS_PER_HEAD = 2


@dataclass(frozen=True)
class DecoderConfig:
    """Everything needed to rebuild a decoder (stored in checkpoints and run.json); `heads` is None for linear.

    `head` is the DAT decoder's head (see the module docstring); run folders saved before it existed used `conv`
    (and no `residual`). The linear probe's head is `linear`. `norm_first` (set with `residual` on a decoder
    with a BatchNorm, mha-bn): `x + attention(BatchNorm(x))`, the input reaching the head unnormalised; run
    folders saved before it existed normalise after the sum, `BatchNorm(x + attention(x))`, and keep it.
    """

    decoder: str
    num_layers: int
    hidden_size: int
    num_classes: int
    heads: Optional[int]
    gaussians: int = DEFAULT_GAUSSIANS
    dropout: float = 0.0
    head: str = "conv"
    residual: bool = False
    norm_first: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class _SelfAttention(nn.Module):
    """nn.MultiheadAttention as self-attention over the layer tokens of each item (batch_first: never the batch),
    with `residual`, plus its input."""

    def __init__(self, width: int, heads: int, residual: bool = False):
        super().__init__()
        self.mha = nn.MultiheadAttention(width, heads, batch_first=True)
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.mha(x, x, x, need_weights=False)[0]
        return x + out if self.residual else out


def _no_attention(config: DecoderConfig) -> tuple[nn.Module, int]:
    return nn.Identity(), config.hidden_size


def _heads_divide_width(decoder: str, heads: int, hidden_size: int) -> Optional[str]:
    if hidden_size % heads:
        return f"decoder {decoder}: hidden size {hidden_size} is not divisible by {heads} heads"
    return None


def _heads_fill_kv_groups(decoder: str, heads: int, hidden_size: int) -> Optional[str]:
    if heads % GQA_KV_HEADS:
        return f"decoder {decoder}: {heads} query heads are not a multiple of the {GQA_KV_HEADS} key/value heads"
    return None


def _mha(config: DecoderConfig) -> tuple[nn.Module, int]:
    return _SelfAttention(config.hidden_size, config.heads, config.residual), config.hidden_size


class _NormFirstSelfAttention(nn.Module):
    """mha-bn's residual form: `x + attention(BatchNorm(x))`, BatchNorm over the layer axis."""

    def __init__(self, width: int, heads: int, num_layers: int):
        super().__init__()
        self.attention = _SelfAttention(width, heads)
        self.norm = nn.BatchNorm1d(num_layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attention(self.norm(x))


def _mha_bn(config: DecoderConfig) -> tuple[nn.Module, int]:
    """The paper's attention -> BatchNorm; with `residual`, x + attention(BatchNorm(x)) (`norm_first`), or in a
    run folder saved before `norm_first` existed BatchNorm(x + attention(x))."""
    if config.norm_first:
        return _NormFirstSelfAttention(config.hidden_size, config.heads, config.num_layers), config.hidden_size
    attention = _SelfAttention(config.hidden_size, config.heads, config.residual)
    return nn.Sequential(attention, nn.BatchNorm1d(config.num_layers)), config.hidden_size


class _ResidualGQA(GroupedQueryAttention):
    """Grouped-query self-attention plus its input, `x + attention(x)` (built with `out_features` = input width)."""

    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)


def _gqa(config: DecoderConfig) -> tuple[nn.Module, int]:
    """The paper's GQA (output 8 x 64 wide); with `residual`, projected back to the input width plus the input."""
    module = (_ResidualGQA if config.residual else GroupedQueryAttention)(
        config.hidden_size, num_query_heads=config.heads, num_kv_heads=GQA_KV_HEADS, head_dim=GQA_HEAD_DIM,
        out_features=config.hidden_size if config.residual else None)
    return module, module.out_features


def _daam(config: DecoderConfig) -> tuple[nn.Module, int]:
    """daam-v1 / daam-v2: statistics across the layer axis, one (mean offset, c) pair per feature and head;
    with `residual`, the skip form x + x * gate."""
    module = DensityAdaptiveAttention(config.heads, config.hidden_size, norm_axis=1, feature_axis=-1,
                                      skip=config.residual)
    return module, config.hidden_size


def _gqdaam(config: DecoderConfig) -> tuple[nn.Module, int]:
    module = GQDAAM(config.hidden_size, num_heads=config.heads, num_query_heads=GQDAAM_QUERY_HEADS,
                    num_kv_heads=GQA_KV_HEADS, head_dim=GQA_HEAD_DIM, residual=config.residual)
    return module, module.out_features


def _mixture(config: DecoderConfig) -> tuple[nn.Module, int]:
    return DensityBlock(1, config.heads, config.gaussians, norm_axis=1), config.hidden_size


@dataclass(frozen=True)
class DecoderSpec:
    """One registry entry: how to build the attention stage and what the decoder needs.

    `attention` is None for the linear probe (no attention stage, no conv head). `density` decoders produce
    a density gate (Importance Factor, Gaussian table) and need `MIN_LAYERS_PER_HEAD` layers per head.
    `paper_heads` is the paper's head count (Table 1), None where heads do not apply. `heads_problem`
    says why a head count does not fit the hidden size (None when it does). `table_row`: a row
    `classify reproduce` trains (the ablation-only `conv-head`, a head without attention, is not). `residual`:
    the attention stage can take a residual path (`DecoderConfig.residual`). `batch_norm`: the attention
    stage has a BatchNorm, which a residual path puts first (`DecoderConfig.norm_first`).
    """

    attention: Optional[Callable[[DecoderConfig], tuple[nn.Module, int]]]
    paper_heads: Optional[int]
    density: bool = False
    residual: bool = False
    batch_norm: bool = False
    heads_problem: Callable[[str, int, int], Optional[str]] = lambda decoder, heads, hidden_size: None
    table_row: bool = True

    @property
    def one_layer(self) -> bool:
        """The linear probe reads the pooled features of exactly one layer."""
        return self.attention is None


REGISTRY: dict[str, DecoderSpec] = {
    "linear": DecoderSpec(None, None),
    # A DAT decoder's head alone: what a density decoder over one layer amounts to (DAAM there is the identity).
    "conv-head": DecoderSpec(_no_attention, None, table_row=False),
    "mha": DecoderSpec(_mha, 8, heads_problem=_heads_divide_width, residual=True),
    "mha-bn": DecoderSpec(_mha_bn, 8, heads_problem=_heads_divide_width, residual=True, batch_norm=True),
    "gqa": DecoderSpec(_gqa, 8, heads_problem=_heads_fill_kv_groups, residual=True),
    "daam-v1": DecoderSpec(_daam, 8, density=True, residual=True),
    "daam-v2": DecoderSpec(_daam, 1, density=True, residual=True),
    "gqdaam": DecoderSpec(_gqdaam, 8, density=True, residual=True),
    "mixture": DecoderSpec(_mixture, 8, density=True),
}
DECODERS = tuple(REGISTRY)
DENSITY_DECODERS = tuple(name for name, spec in REGISTRY.items() if spec.density)
TABLE_DECODERS = tuple(name for name, spec in REGISTRY.items() if spec.table_row)


def check_decoder(decoder: str) -> DecoderSpec:
    """The registry entry of `decoder`, or a DaamkitError for a name daamkit does not build."""
    if decoder not in REGISTRY:
        raise DaamkitError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    return REGISTRY[decoder]


def is_density(decoder: str) -> bool:
    """Whether `decoder` produces a density gate (Importance Factor, Gaussian parameter table)."""
    return check_decoder(decoder).density


def max_density_heads(num_layers: int) -> int:
    """The most heads a density decoder may split `num_layers` layers into (each head gets >= 2 layers)."""
    return num_layers // MIN_LAYERS_PER_HEAD


def default_heads(decoder: str, num_layers: int) -> Optional[int]:
    """The paper's head count, lowered for density decoders until every head spans at least 2 layers."""
    spec = check_decoder(decoder)
    if spec.density:
        return max(1, min(spec.paper_heads, max_density_heads(num_layers)))
    return spec.paper_heads


def decoder_config(
    decoder: str,
    num_layers: int,
    hidden_size: int,
    num_classes: int,
    heads: Optional[int] = None,
    gaussians: Optional[int] = None,
    dropout: float = 0.0,
    head: Optional[str] = None,
    residual: bool = False,
) -> DecoderConfig:
    """Validate a decoder choice against the cache shape; every bad combination is one DaamkitError line.

    With `heads=None` a density decoder takes the paper's head count or fewer (see `default_heads`) and
    says so when it had to lower it; an explicit `heads` that leaves a head fewer than 2 layers is refused.
    `head=None` is the paper's `conv` head for a DAT decoder; the linear probe's head is always `linear`.
    """
    spec = check_decoder(decoder)
    gaussians = DEFAULT_GAUSSIANS if gaussians is None else gaussians
    if heads is not None and heads < 1 or gaussians < 1:
        raise DaamkitError(f"`heads` and `gaussians` must be at least 1, got {heads} and {gaussians}")
    if not 0.0 <= dropout < 1.0:
        raise DaamkitError(f"`dropout` must be at least 0 and below 1, got {dropout}")
    if head is not None and head not in HEADS:
        raise DaamkitError(f"`head` must be one of {', '.join(HEADS)}, got {head!r}")
    if num_classes < 2:
        raise DaamkitError(f"a classifier needs at least 2 classes, the feature cache has {num_classes}")
    if residual and not spec.residual:
        with_one = ", ".join(name for name, entry in REGISTRY.items() if entry.residual)
        raise DaamkitError(f"decoder {decoder} has no residual path (only {with_one}); leave `residual` unset")
    if spec.paper_heads is None and heads is not None:
        raise DaamkitError(f"decoder {decoder} has no attention heads; leave `heads` unset")
    if spec.one_layer:
        if num_layers != 1:
            raise DaamkitError(f"decoder {decoder} reads one layer's pooled features, got {num_layers} layers; "
                               "choose one with `layers` or leave it unset for the last one")
        if head == "conv":
            raise DaamkitError(f"decoder {decoder} is one Linear layer and has no conv head; leave `head` unset")
        return DecoderConfig(decoder, num_layers, hidden_size, num_classes, None, gaussians, dropout, "linear")
    if spec.density:
        if num_layers < MIN_LAYERS_PER_HEAD:
            raise DaamkitError(
                f"decoder {decoder} over {num_layers} layer is the identity (DAAM standardises across layers: "
                f"its gate is exactly 1); train it on at least {MIN_LAYERS_PER_HEAD} `layers`, or use `decoder` linear"
            )
        most = max_density_heads(num_layers)
        if heads is None:
            heads = default_heads(decoder, num_layers)
            if heads < spec.paper_heads:
                log(f"decoder {decoder}: {heads} head(s) instead of the paper's {spec.paper_heads}, so that each "
                    f"of them spans at least {MIN_LAYERS_PER_HEAD} of the {num_layers} layers")
        elif heads > most:
            raise DaamkitError(
                f"decoder {decoder}: `heads` {heads} on {num_layers} layers leaves a head fewer than "
                f"{MIN_LAYERS_PER_HEAD} layers (DAAM over one layer is the identity); use `heads` {most} or fewer"
            )
    heads = spec.paper_heads if heads is None else heads
    problem = None if heads is None else spec.heads_problem(decoder, heads, hidden_size)
    if problem:
        raise DaamkitError(problem)
    return DecoderConfig(decoder, num_layers, hidden_size, num_classes, heads, gaussians, dropout, head or "conv",
                         residual, norm_first=residual and spec.batch_norm)


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
        spec = REGISTRY[config.decoder]
        self.module, self.out_features = spec.attention(config)
        self.density = spec.density

    def forward(self, x: Tensor, return_gate: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if self.density and return_gate:
            return self.module(x, return_gate=True)
        return self.module(x), None


class LayerMix(nn.Module):
    """A learned weighted sum over the layer axis: `[B, N, ...]` -> `[B, prod(...)]`, uniform (1/N each) at the start.

    The weights are `1/N + MIX_SPEED * offsets`, the offsets trained from 0. Under Adam every parameter moves
    about `lr` per step, so without the factor weights of 1/N barely move in a few hundred steps and the head
    stays a plain mean of the layers. They are not squashed by a softmax: a softmax this fast saturated on
    whichever layer the random initial classifier favoured and never recovered (no gradient reaches a weight
    near 0; with seed 0 of the informative-layer test in tests/test_classify_decoders.py it kept 0.98 on a
    noise layer); unconstrained weights do not saturate. A weight may turn negative (that layer's features
    then enter with the opposite sign); its size says how much the layer counts (`layer_mix_shares`). The sum
    is scaled by sqrt(N), which keeps it at the spread of one layer's features at the uniform start when the
    layers vary independently.
    """

    def __init__(self, num_layers: int):
        super().__init__()
        self.offsets = nn.Parameter(torch.zeros(num_layers))

    def weights(self) -> Tensor:
        """The current weight of each layer."""
        return 1.0 / len(self.offsets) + MIX_SPEED * self.offsets

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2)
        return torch.einsum("bnw,n->bw", x, self.weights().to(x.dtype)) * math.sqrt(x.shape[1])


class DATDecoder(nn.Module):
    """Attention module over layer tokens -> head (conv over layer images, a layer mix, or none) -> Linear."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.attention = _AttentionStage(config)
        n, width = config.num_layers, self.attention.out_features
        self.grid = grid_shape(width)
        if config.head == "mix":
            self.head = nn.Sequential(LayerMix(n), nn.Linear(width, config.num_classes))
        else:
            conv = [nn.Conv2d(n, CONV_CHANNELS, 3, padding=1), nn.ReLU(), nn.Conv2d(CONV_CHANNELS, n, 3, padding=1),
                    nn.ReLU()] if config.head == "conv" else []
            self.head = nn.Sequential(*conv, nn.Flatten(), nn.Linear(n * width, config.num_classes))
        self.dropout = nn.Dropout(config.dropout)
        _xavier(self.head)

    def forward(self, x: Tensor, return_gate: bool = False):
        """Logits `[B, classes]`; with `return_gate=True` also the density gate `[B, N, d]` (None if not DAAM)."""
        out, gate = self.attention(x, return_gate=return_gate)
        features = self.head[:-1](out.unflatten(-1, self.grid))  # the head up to the classifier, flattened
        logits = self.head[-1](self.dropout(features))
        return (logits, gate) if return_gate else logits


class LinearProbe(nn.Module):
    """The simplest honest baseline: one Linear layer on the pooled features of one encoder layer `[B, 1, d]`."""

    attention = None  # no attention stage: nothing to gate, no Importance Factor

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.head = nn.Linear(config.hidden_size, config.num_classes)
        self.dropout = nn.Dropout(config.dropout)
        _xavier(self.head)

    def forward(self, x: Tensor, return_gate: bool = False):
        logits = self.head(self.dropout(x.flatten(1)))
        return (logits, None) if return_gate else logits


def _xavier(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every conv/linear layer outside the attention module."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)


def build_decoder(config: DecoderConfig) -> nn.Module:
    """A fresh decoder for `config` (core ValueErrors about shapes become one DaamkitError line)."""
    try:
        return LinearProbe(config) if REGISTRY[config.decoder].one_layer else DATDecoder(config)
    except ValueError as err:
        raise DaamkitError(f"cannot build decoder {config.decoder}: {err}") from err


def attention_parameters(decoder: nn.Module) -> int:
    """Trainable parameters of the decoder's attention stage (0 for the linear probe)."""
    return 0 if decoder.attention is None else count_parameters(decoder.attention)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def layer_mix_shares(decoder: nn.Module) -> Optional[list[float]]:
    """The `mix` head's share of each layer, |weight| / sum of |weights| (decoder layer order); None for other heads."""
    mix = decoder.head[0] if isinstance(decoder.head, nn.Sequential) else None
    if not isinstance(mix, LayerMix):
        return None
    size = mix.weights().detach().abs()
    return (size / size.sum()).tolist()


def gaussian_parameter_ranges(decoder: nn.Module) -> Optional[dict]:
    """Min/max of the learned mean offsets and scaled variances `c` (paper Table 5), or None for non-DAAM decoders.

    The raw parameters are reported; the forward pass clamps `c` to a small positive floor.
    """
    offsets, variances = [], []
    for module in () if decoder.attention is None else decoder.attention.modules():
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
