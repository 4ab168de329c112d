"""Run configs: validated on construction, every default in one place, JSON round trip, CLI defaults from them."""

import json

import pytest

from daamkit.classify.run_config import DecoderRunConfig, LoRARunConfig, RunConfig
from daamkit.infra.errors import DaamkitError


def test_round_trip_through_json():
    for config in (DecoderRunConfig(decoder="mixture", lr="auto", layers="2-5", heads=2),
                   LoRARunConfig(rank=4, plus=True, target_modules=("query", "key"), lr=3e-4)):
        again = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config


def test_defaults_live_in_the_dataclass_and_the_cli_uses_them():
    from daamkit.cli.classify import lora, train

    def cli_default(command, name):
        import inspect

        return inspect.signature(command).parameters[name].default.default

    for name in ("epochs", "lr", "batch_size", "weight_decay", "loss", "dev_fraction", "seed", "runs", "heads", "dropout", "head",
                 "selection"):
        assert cli_default(train, name) == DecoderRunConfig.default(name)
    for name in ("epochs", "lr", "runs", "selection", "rank", "alpha", "loraplus_ratio", "weight_decay", "dtype"):
        assert cli_default(lora, name) == LoRARunConfig.default(name)
    assert RunConfig.default("weight_decay") == 0.1 and LoRARunConfig.default("epochs") is None  # resolved per task


@pytest.mark.parametrize(("cls", "values", "message"), [
    (DecoderRunConfig, {"decoder": "transformer"}, "unknown decoder"),
    (DecoderRunConfig, {"epochs": 0}, "`epochs` must be an integer of at least 1"),
    (DecoderRunConfig, {"lr": "fast"}, "`lr` must be a positive number or auto"),
    (DecoderRunConfig, {"dev_fraction": 1.5}, "`dev_fraction` must be between 0 and 1"),
    (DecoderRunConfig, {"loss": "hinge"}, "`loss` must be one of"),
    (DecoderRunConfig, {"dropout": 1}, "`dropout` must be a number at least 0 and below 1, got 1"),
    (DecoderRunConfig, {"dropout": "half"}, "`dropout` must be a number"),
    (DecoderRunConfig, {"head": "mlp"}, "`head` must be one of conv, linear, mix, got 'mlp'"),
    (DecoderRunConfig, {"selection": "best"}, "`selection` must be one of best-epoch, last-epoch, got 'best'"),
    (DecoderRunConfig, {"residual": "yes"}, "`residual` must be true or false, got 'yes'"),
    (DecoderRunConfig, {"decoder": "mixture", "residual": True}, "decoder mixture has no residual path"),
    (LoRARunConfig, {"lr": "fast"}, "`lr` must be a positive number or auto"),
    (LoRARunConfig, {"selection": "last"}, "`selection` must be one of best-epoch, last-epoch, got 'last'"),
    (LoRARunConfig, {"plus": True, "loraplus_ratio": 0.5}, "`loraplus_ratio` must be at least 1"),
    (DecoderRunConfig, {"bogus": 1}, "unknown key"),
])
def test_bad_values_are_one_clear_error(cls, values, message):
    with pytest.raises(DaamkitError, match=message):
        cls.from_dict(values)
