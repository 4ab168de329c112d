"""The Typer app factory shared by every sub-app: one-line user errors instead of tracebacks.

Library code names fields in backticks (`image_size`); `user_message` turns each into the option the
command really has (`--image-size`), so the CLI speaks of flags and the library of fields, in one place.
"""

from __future__ import annotations

import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any

import click
import typer
from typer.core import TyperGroup

from daamkit.infra.config_file import explicit_options, read_toml
from daamkit.infra.errors import DaamkitError
from daamkit.infra.progress import set_quiet

_FIELD = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")
# The click that Typer parses with: its own vendored copy (Typer >= 0.2x) or the click package.
_UsageError = getattr(typer.core, "_click", click).exceptions.UsageError


def flag_for(command: click.Command | None, field: str) -> str:
    """The command-line spelling of library field `field`: the command's own option for it (e.g.
    `batch_size` -> --extract-batch-size), else the usual --field-name."""
    for param in getattr(command, "params", []):
        if param.name == field and getattr(param, "opts", None):
            longest = [opt for opt in param.opts if opt.startswith("--")]
            return longest[0] if longest else param.opts[0]
    return "--" + field.replace("_", "-")


def user_message(error: BaseException, command: click.Command | None = None) -> str:
    """The message of a library error with every `field` replaced by its --flag."""
    return _FIELD.sub(lambda match: flag_for(command, match.group(1)), str(error))


def _os_error_line(err: OSError) -> str:
    where = f": {err.filename}" if err.filename else ""
    if isinstance(err, FileNotFoundError):
        return f"file not found{where}"
    return f"{err.strerror or err}{where}"


class _UserErrorGroup(TyperGroup):
    """Turns DaamkitError, file-system errors and option-parsing errors raised by any command into one line
    on stderr + exit 2, and a Ctrl-C that reaches the top (between a comparison's runs, during an
    evaluation) into one line + exit 130.

    Also resets progress output, so a quiet command does not silence the next one run in the same process.
    """

    def invoke(self, ctx: click.Context):
        set_quiet(False)  # every command starts with progress shown; one that runs quietly says so itself
        try:
            return super().invoke(ctx)
        except DaamkitError as err:
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            click.echo(f"error: {user_message(err, command)}", err=True)
            sys.exit(2)
        except OSError as err:  # permissions, a full disk, a path that vanished: still one line
            click.echo(f"error: {_os_error_line(err)}", err=True)
            sys.exit(2)
        except _UsageError as err:  # a mistyped option or value: one line instead of usage text and a box
            where = f" (see `{err.ctx.command_path} --help`)" if err.ctx is not None else ""
            click.echo(f"error: {err.format_message()}{where}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted (Ctrl-C): files already written are kept; run the same command again to "
                       "continue a comparison, or pass --resume to continue a training run", err=True)
            sys.exit(130)


def new_app(help_text: str) -> typer.Typer:
    """A Typer app with the shared error handling, no shell-completion noise and no locals in tracebacks.

    Help texts are read as Markdown: Rich markup would swallow every `[default: ...]` note as a style tag.
    """
    return typer.Typer(
        cls=_UserErrorGroup,
        help=help_text,
        add_completion=False,
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
        rich_markup_mode="markdown",
    )


def option_types(ctx: click.Context) -> dict[str, Any]:
    """Option name -> type hint of the command being run (from its Python signature)."""
    hints = typing.get_type_hints(inspect.unwrap(ctx.command.callback))
    return {name: hints.get(name, Any) for name in ctx.params}


def options_with_config(ctx: click.Context, config: Path | None, exclude: set[str] = frozenset(),
                        preset: Path | None = None,
                        file_types: dict[str, Any] | None = None) -> tuple[dict[str, Any], set[str]]:
    """This command's option values with `--config FILE.toml` filling the ones not typed (flags win), then a
    preset file filling what neither set; each file value type-checked against the option's type, or
    against `file_types[name]` where a file may write it more naturally (`lr = 1e-3` for a "number or
    auto" option). Also returns the names set by the user (flags or files)."""
    values = {key: value for key, value in ctx.params.items() if key not in exclude}
    given = explicit_options(ctx)
    hints = {**option_types(ctx), **(file_types or {})}
    for layer in (config, preset):
        if layer is not None:
            from_file = read_toml(layer, {key: hints[key] for key in values})
            values.update({key: value for key, value in from_file.items() if key not in given})
            given = given | set(from_file)
    return values, given
