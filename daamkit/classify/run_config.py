"""The settings of one classifier run, validated, with every default in one place; round-trips JSON.

`RunConfig` is the protocol both kinds of run share (epochs, lr, batch, loss, dev split, seeds, runs,
precision); `DecoderRunConfig` adds the DAT decoder choice (`classify train`) and `LoRARunConfig` the
adapters (`classify lora`). A `None` marks a value resolved against the data (`resolve_lr`,
`default_epochs`, `default_batch_size` in `experiment`). The CLI takes its option defaults from here.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Optional, Union

from daamkit.infra.errors import DaamkitError

LOSSES = ("auto", "focal", "ce")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
SELECTIONS = ("best-epoch", "last-epoch")
DEFAULT_DEV_FRACTION = 0.1


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise DaamkitError(message)


def _positive_int(value: Any, name: str, optional: bool = False) -> None:
    if optional and value is None:
        return
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             f"`{name}` must be an integer of at least 1, got {value!r}")


@dataclass(frozen=True)
class RunConfig:
    """Protocol settings shared by DAT decoder and LoRA runs (paper defaults; None = resolved per data)."""

    epochs: Optional[int] = None
    lr: Union[float, str, None] = None
    batch_size: Optional[int] = None
    weight_decay: float = 0.1
    loss: str = "auto"
    dev_fraction: float = DEFAULT_DEV_FRACTION
    seed: int = 0
    runs: Optional[int] = None  # None: see experiment.resolve_runs (3 on a user's small train/test task)
    selection: Optional[str] = None  # None: see experiment.resolve_selection (last-epoch on a user's task)
    mixed_precision: str = "auto"
    method: Optional[str] = None

    def __post_init__(self) -> None:
        _positive_int(self.epochs, "epochs", optional=True)
        _positive_int(self.batch_size, "batch_size", optional=True)
        _positive_int(self.runs, "runs", optional=True)
        _require(self.selection is None or self.selection in SELECTIONS,
                 f"`selection` must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        _require(isinstance(self.seed, int) and not isinstance(self.seed, bool), f"`seed` must be an integer, got {self.seed!r}")
        _require(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
                 f"`weight_decay` must be a number >= 0, got {self.weight_decay!r}")
        _require(self.loss in LOSSES, f"`loss` must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        _require(isinstance(self.dev_fraction, (int, float)) and 0.0 < self.dev_fraction < 1.0,
                 f"`dev_fraction` must be between 0 and 1, got {self.dev_fraction!r}")
        _require(self.mixed_precision in MIXED_PRECISION,
                 f"`mixed_precision` must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.lr is not None and not (isinstance(self.lr, str) and self.lr.strip().lower() == "auto"):
            try:
                value = float(self.lr)
            except (TypeError, ValueError):
                value = float("nan")
            _require(value > 0, f"`lr` must be a positive number or auto, got {self.lr!r}")
            object.__setattr__(self, "lr", value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """The config saved in a run folder; unknown keys are refused."""
        if not isinstance(values, dict):
            raise DaamkitError(f"a {cls.__name__} must be a JSON object, got {type(values).__name__}")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise DaamkitError(f"{cls.__name__} has unknown key(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field `name` (the CLI's option defaults come from here)."""
        (field,) = [f for f in fields(cls) if f.name == name]
        return None if field.default is MISSING else field.default


@dataclass(frozen=True)
class DecoderRunConfig(RunConfig):
    """A DAT decoder run (`classify train`): the decoder and the layers it reads."""

    decoder: str = "daam-v1"
    layers: Optional[str] = None
    heads: Optional[int] = None
    gaussians: Optional[int] = None
    dropout: Optional[float] = None
    head: Optional[str] = None
    residual: Optional[bool] = None
    compile: bool = False

    def __post_init__(self) -> None:
        from daamkit.classify.decoders import HEADS, check_decoder

        super().__post_init__()
        check_decoder(self.decoder)
        _positive_int(self.heads, "heads", optional=True)
        _positive_int(self.gaussians, "gaussians", optional=True)
        _require(self.head is None or self.head in HEADS,
                 f"`head` must be one of {', '.join(HEADS)}, got {self.head!r}")
        _require(self.residual is None or isinstance(self.residual, bool),
                 f"`residual` must be true or false, got {self.residual!r}")
        _require(not self.residual or check_decoder(self.decoder).residual,
                 f"decoder {self.decoder} has no residual path; leave `residual` unset")
        _require(self.dropout is None or (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
                                          and 0.0 <= self.dropout < 1.0),
                 f"`dropout` must be a number at least 0 and below 1, got {self.dropout!r}")


@dataclass(frozen=True)
class LoRARunConfig(RunConfig):
    """A LoRA / LoRA+ run (`classify lora`): adapters on the encoder plus a linear head. `epochs` None is the
    paper's 3 on its tasks and at least `MIN_TRAIN_STEPS` steps on a user's (experiment.default_epochs)."""

    rank: int = 8
    alpha: float = 16.0
    plus: bool = False
    loraplus_ratio: float = 16.0
    target_modules: Optional[tuple[str, ...]] = None
    max_items: Optional[int] = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int(self.rank, "rank")
        _require(isinstance(self.alpha, (int, float)) and self.alpha > 0, f"`alpha` must be positive, got {self.alpha!r}")
        _require(not self.plus or self.loraplus_ratio >= 1,
                 f"`loraplus_ratio` must be at least 1 (lr of B / lr of A), got {self.loraplus_ratio!r}")
        _positive_int(self.max_items, "max_items", optional=True)
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
