"""`--config FILE.toml` support: read a TOML table whose keys are CLI option names; CLI flags win."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Collection, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from daamkit.infra.errors import DaamkitError
from daamkit.infra.typed_values import coerce


def read_toml(path: str | Path, allowed: Collection[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Read a TOML file of option values; keys may use dashes or underscores. Unknown keys are an error.

    When `allowed` maps option names to type hints, every value is checked against (and converted to)
    its type, so `lr = "fast"` or `data = 5` is one error naming the option.
    """
    path = Path(path)
    if path.is_dir():
        raise DaamkitError(f"config file {path} is a folder; give the path of a .toml file")
    if not path.is_file():
        raise DaamkitError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise DaamkitError(f"config file {path} is not valid TOML: {err}") from err
    except OSError as err:
        raise DaamkitError(f"config file {path} cannot be read: {err.strerror or err}") from err
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise DaamkitError(f"config file {path} has unknown option(s): {', '.join(unknown)}")
    if isinstance(allowed, Mapping):
        try:
            values = {key: coerce(key, value, allowed[key]) for key, value in values.items()}
        except DaamkitError as err:
            raise DaamkitError(f"config file {path}: {err}") from err
    return values


def explicit_options(ctx: Any) -> set[str]:
    """Names of the options the user typed on the command line of this click/Typer context.

    Compared by enum name: Typer >= 0.2x ships its own copy of click (`typer._click`), whose
    ParameterSource is a different class from `click.core.ParameterSource`.
    """
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return {name for name, source in sources.items() if getattr(source, "name", None) == "COMMANDLINE"}
