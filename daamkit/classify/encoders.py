"""Frozen Hugging Face encoders (audio, image, text) reduced to one vector per hidden layer.

`FrozenEncoder.from_pretrained(name_or_path)` reads a local model folder or the local HF cache (never the
network): the config and the model's own processor come first (cheap), the weights load on first use.
`encode(raw_inputs)` returns float32 `(B, L, d)`: for every kept entry of `hidden_states` (all but the
embedding output unless `include_embeddings`), the exact mean over the valid time steps / tokens, taken
in float32. Padding never changes an item's vector:
- text: right padding (causal models are unaffected by later tokens) and the tokenizer's attention mask;
  a tokenizer without a pad token (Llama) pads with its EOS token.
- audio: the sample-level attention mask becomes the frame mask through the model's own
  `_get_feat_extract_output_lengths`; models whose feature extractor returns no attention mask
  (group-norm convolutions, e.g. wav2vec2-base) are run on equal-length groups, unpadded.
- image: every image has the processor's fixed size, so all patch tokens (and CLS) are averaged.
"""

from __future__ import annotations

import hashlib
import inspect
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from daamkit.infra.errors import DaamkitError
from daamkit.infra.local_weights import resolve_hf_model
from daamkit.infra.progress import log

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODALITY_BY_INPUT = {"input_values": "audio", "pixel_values": "image", "input_ids": "text"}
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf"}


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda, then mps, then cpu; anything else is passed to torch.device (clear error if invalid)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise DaamkitError(f"invalid `device` {device!r}: {err}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DaamkitError(f"`device` {device} asked for CUDA, but no CUDA device is available")
    return resolved


def model_fingerprint(folder: Path) -> str:
    """Hash of a model folder: the content of its config/processor/tokenizer files, names+sizes of weights."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix in _WEIGHT_SUFFIXES:
            digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
        elif path.stat().st_size <= 64 * 2**20:
            digest.update(f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()[:16]


@dataclass
class Prepared:
    """A batch turned into model inputs; `parts` are (row indices, inputs, valid-length per row or None)."""

    size: int
    parts: list[tuple[list[int], dict[str, torch.Tensor], torch.Tensor | None]]


class FrozenEncoder:
    """A frozen HF encoder plus its processor; `prepare` (CPU) and `forward` (device) make up `encode`."""

    def __init__(
        self,
        name: str,
        folder: Path,
        config: Any,
        processor: Any,
        modality: str,
        *,
        include_embeddings: bool,
        dtype: str,
        device: str,
        device_map: str | None,
        trust_remote_code: bool,
    ):
        self.name, self.folder, self.config, self.processor, self.modality = name, folder, config, processor, modality
        self.dtype, self.device_map, self.trust_remote_code = dtype, device_map, trust_remote_code
        self.device = resolve_device(device)
        self.num_hidden_layers = _config_int(config, "num_hidden_layers", folder)
        self.hidden_size = _config_int(config, "hidden_size", folder)
        self.layers = list(range(0 if include_embeddings else 1, self.num_hidden_layers + 1))
        self.config_hash = model_fingerprint(folder)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        include_embeddings: bool = False,
        dtype: str = "float32",
        device: str = "auto",
        device_map: str | None = None,
        trust_remote_code: bool = False,
    ) -> "FrozenEncoder":
        """Config + processor of a local model folder or HF-cache model; weights are loaded lazily."""
        from transformers import AutoConfig

        if dtype not in DTYPES:
            raise DaamkitError(f"unknown `dtype` {dtype!r}; choose one of {', '.join(DTYPES)}")
        folder = resolve_hf_model(name_or_path)
        try:
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, local_files_only=True)
        except ValueError as err:
            raise DaamkitError(f"cannot read the model config in {folder}: {_first_line(err)}") from err
        main_input = _model_class(config, folder, trust_remote_code).main_input_name
        modality = MODALITY_BY_INPUT.get(main_input)
        if modality is None:
            raise DaamkitError(
                f"{folder} ({config.model_type}) takes {main_input!r}; only audio (input_values), image "
                "(pixel_values) and text (input_ids) encoders are supported"
            )
        processor = _load_processor(folder, modality, trust_remote_code)
        name = str(Path(name_or_path).expanduser().resolve()) if Path(name_or_path).expanduser().is_dir() else name_or_path
        return cls(
            name, folder, config, processor, modality, include_embeddings=include_embeddings, dtype=dtype,
            device=device, device_map=device_map, trust_remote_code=trust_remote_code,
        )

    @property
    def sampling_rate(self) -> int | None:
        """The audio rate the feature extractor expects (None for image/text encoders)."""
        return getattr(self.processor, "sampling_rate", None) if self.modality == "audio" else None

    @cached_property
    def model(self) -> torch.nn.Module:
        """The frozen model in eval mode (loaded on first access; `device_map` spreads it over devices)."""
        from transformers import AutoModel, __version__

        dtype_key = "dtype" if tuple(int(x) for x in __version__.split(".")[:2]) >= (4, 56) else "torch_dtype"
        kwargs: dict[str, Any] = {dtype_key: DTYPES[self.dtype], "local_files_only": True,
                                  "trust_remote_code": self.trust_remote_code}
        if self.device_map:
            kwargs["device_map"] = self.device_map
        try:
            with _quiet_transformers():
                model, info = AutoModel.from_pretrained(self.folder, output_loading_info=True, **kwargs)
        except (OSError, ValueError) as err:
            raise DaamkitError(f"cannot load the model weights in {self.folder}: {_first_line(err)}") from err
        missing = sorted(key for key in info.get("missing_keys", ()) if not key.startswith("pooler."))
        if missing:
            log(f"warning: {len(missing)} parameter(s) of {self.name} are not in its checkpoint and stay random "
                f"(e.g. {missing[0]})")
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        if not self.device_map:
            model = model.to(self.device)
        model.eval().requires_grad_(False)
        return model

    def load(self) -> torch.nn.Module:
        """Load the weights now (they otherwise load on first use) and return the model."""
        return self.model

    @property
    def input_device(self) -> torch.device:
        return next(self.model.parameters()).device if self.device_map else self.device

    # ------------------------------------------------------------ preprocessing (CPU, thread-safe)

    def prepare(self, raw: Sequence[Any]) -> Prepared:
        """Processor outputs for a batch of raw inputs (strings, PIL images or 1-D waveforms)."""
        if self.modality == "text":
            return self._prepare_text(list(raw))
        if self.modality == "image":
            inputs = self.processor(images=list(raw), return_tensors="pt")
            return Prepared(len(raw), [(list(range(len(raw))), {"pixel_values": inputs["pixel_values"]}, None)])
        return self._prepare_audio([np.asarray(wave, dtype=np.float32) for wave in raw])

    def _prepare_text(self, texts: list[str]) -> Prepared:
        tokenizer = self.processor
        max_length = min(
            getattr(tokenizer, "model_max_length", 10**9) or 10**9,
            getattr(self.config, "max_position_embeddings", 10**9) or 10**9,
        )
        inputs = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        lengths = inputs["attention_mask"].sum(dim=1)
        if int(lengths.min()) < 1:
            raise DaamkitError("a text tokenized to zero tokens; the tokenizer adds no special tokens to empty text")
        return Prepared(len(texts), [(list(range(len(texts))), dict(inputs), lengths)])

    def _prepare_audio(self, waves: list[np.ndarray]) -> Prepared:
        if getattr(self.processor, "return_attention_mask", False):
            groups = [list(range(len(waves)))]
        else:  # no exact masking for this model: run equal-length groups without padding
            by_length: dict[int, list[int]] = {}
            for i, wave in enumerate(waves):
                by_length.setdefault(len(wave), []).append(i)
            groups = list(by_length.values())
        parts = []
        for rows in groups:
            inputs = self.processor(
                [waves[i] for i in rows], sampling_rate=self.sampling_rate, padding=True, return_tensors="pt",
                return_attention_mask=len(groups) == 1 and getattr(self.processor, "return_attention_mask", False),
            )
            samples = torch.tensor([len(waves[i]) for i in rows])
            frames = self._frame_lengths(samples)
            if int(frames.min()) < 1:
                shortest = int(samples[frames.argmin()])
                raise DaamkitError(f"an audio item of {shortest} samples is too short for this encoder")
            parts.append((rows, dict(inputs), frames))
        return Prepared(len(waves), parts)

    def _frame_lengths(self, samples: torch.Tensor) -> torch.Tensor:
        """Frames the model produces for each sample count (WavLM/wav2vec2 `_get_feat_extract_output_lengths`)."""
        compute = getattr(self.model, "_get_feat_extract_output_lengths", None)
        if compute is None:
            raise DaamkitError(f"{self.folder}: audio model {self.config.model_type!r} has no frame-length rule")
        kwargs = {"add_adapter": False} if "add_adapter" in inspect.signature(compute).parameters else {}
        return torch.as_tensor(compute(samples, **kwargs)).long()

    @cached_property
    def _forward_args(self) -> set[str] | None:
        """Input names the model's forward declares (processors may return extras such as token_type_ids);
        None when it takes its inputs through **kwargs only, and so gets everything the processor returns."""
        names = set(inspect.signature(self.model.forward).parameters)
        return names if self.model.main_input_name in names else None

    def model_inputs(self, inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """The processor outputs the model's forward accepts, moved to `device`."""
        accepted = self._forward_args
        return {k: v.to(device) for k, v in inputs.items() if accepted is None or k in accepted}

    # ------------------------------------------------------------ forward (device)

    @torch.inference_mode()
    def forward(self, prepared: Prepared) -> torch.Tensor:
        """float32 `(B, L, d)` masked means of the kept hidden states, on the CPU."""
        out = torch.empty(prepared.size, len(self.layers), self.hidden_size)
        for rows, inputs, lengths in prepared.parts:
            inputs = self.model_inputs(inputs, self.input_device)
            with warnings.catch_warnings():  # WavLM's own attention call triggers a torch deprecation notice
                warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
                hidden = self.model(**inputs, output_hidden_states=True).hidden_states
            if hidden is None or len(hidden) != self.num_hidden_layers + 1:
                raise DaamkitError(
                    f"{self.folder} returned {0 if hidden is None else len(hidden)} hidden states, expected "
                    f"{self.num_hidden_layers + 1} (embeddings + num_hidden_layers)"
                )
            out[rows] = torch.stack([masked_mean(hidden[i], lengths) for i in self.layers], dim=1).cpu()
        return out

    def encode(self, raw: Sequence[Any]) -> torch.Tensor:
        """`forward(prepare(raw))`."""
        return self.forward(self.prepare(raw))


def masked_mean(hidden: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Mean over axis 1 of `(B, T, d)` counting only the first `lengths[b]` steps of row b, in float32."""
    if hidden.dim() != 3:
        raise DaamkitError(f"hidden states of shape {tuple(hidden.shape)} are not (batch, tokens, features)")
    hidden = hidden.float()
    if lengths is None:
        return hidden.mean(dim=1)
    lengths = lengths.to(hidden.device)
    valid = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
    total = torch.where(valid[..., None], hidden, torch.zeros((), device=hidden.device)).sum(dim=1)
    return total / lengths[:, None].to(torch.float32)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' own load report and weight-loading bar (daamkit reports through `log`)."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _model_class(config: Any, folder: Path, trust_remote_code: bool) -> type:
    """The class AutoModel would build for `config` (without loading weights), custom code only if trusted."""
    from transformers import AutoModel

    if type(config) in AutoModel._model_mapping:
        return AutoModel._model_mapping[type(config)]
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModel" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModel"], str(folder))
    raise DaamkitError(
        f"{folder} holds a {config.model_type!r} model that transformers' AutoModel does not know"
        + ("" if trust_remote_code else "; pass `trust_remote_code` if you trust its custom code")
    )


# Files that hold a processor; transformers may otherwise build an empty default one silently.
PROCESSOR_FILES = {
    "text": ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model"),
    "audio": ("preprocessor_config.json", "processor_config.json"),
    "image": ("preprocessor_config.json", "processor_config.json"),
}


def _load_processor(folder: Path, modality: str, trust_remote_code: bool) -> Any:
    """The model's own tokenizer / feature extractor / image processor, from the same folder."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer

    loader = {"text": AutoTokenizer, "audio": AutoFeatureExtractor, "image": AutoImageProcessor}[modality]
    what = {"text": "tokenizer", "audio": "feature extractor", "image": "image processor"}[modality]
    if not any((folder / name).is_file() for name in PROCESSOR_FILES[modality]):
        raise DaamkitError(
            f"{folder} has no {what} for its {modality} model (none of {', '.join(PROCESSOR_FILES[modality])}); "
            "save it there with save_pretrained"
        )
    try:
        processor = loader.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DaamkitError(f"cannot load the {what} in {folder}: {_first_line(err)}") from err
    if modality == "text":
        processor.padding_side = "right"
        if processor.pad_token is None:
            if processor.eos_token is None and processor.unk_token is None:
                raise DaamkitError(f"the tokenizer in {folder} has no pad, eos or unk token to pad batches with")
            processor.pad_token = processor.eos_token if processor.eos_token is not None else processor.unk_token
    return processor


def _config_int(config: Any, key: str, folder: Path) -> int:
    value = getattr(config, key, None)
    if not isinstance(value, int):
        raise DaamkitError(f"the config in {folder} has no integer {key}; this encoder type is not supported")
    return value


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
