"""The Typer app factory shared by every sub-app: one-line user errors instead of tracebacks."""

from __future__ import annotations

import sys

import click
import typer
from typer.core import TyperGroup

from daamkit.infra.errors import DaamkitError


class _UserErrorGroup(TyperGroup):
    """Turns DaamkitError (and missing files) raised by any command into one line on stderr + exit 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DaamkitError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except FileNotFoundError as err:
            click.echo(f"error: file not found: {err.filename or err}", err=True)
            sys.exit(2)


def new_app(help_text: str) -> typer.Typer:
    """A Typer app with the shared error handling, no shell-completion noise and no locals in tracebacks."""
    return typer.Typer(
        cls=_UserErrorGroup,
        help=help_text,
        add_completion=False,
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
    )
