"""What the `mdt` command modules share: options that stand for a settings field, and the settings of a
command resolved through mdt.settings. It imports none of the command modules."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import typer

from mdt.settings import resolve_settings

RECIPE_HELP = "recipe YAML (pipelines/*.yaml); flags override its section for this command"
# Command-line parameters that steer the command rather than being settings of it.
NOT_SETTINGS = frozenset({"config", "set_", "resume", "deepspeed", "local_rank"})
Settings = TypeVar("Settings")


def field_default(settings_cls: type, name: str) -> Any:
    for f in dataclasses.fields(settings_cls):
        if f.name == name:
            return f.default
    raise KeyError(f"{settings_cls.__name__} has no field {name}")


def setting(settings_cls: type, name: str, help: str, *decls: str, argument: bool = False) -> Any:
    """The option (or argument) for field `name` of `settings_cls`, with the field's default as its own (one
    source for both). Only a value the user typed counts as given (`command_flags`), so a recipe fills the rest."""
    default = field_default(settings_cls, name)
    shown = default not in (None, "")
    if argument:
        return typer.Argument(default, help=help, show_default=shown)
    return typer.Option(default, *decls, help=help, show_default=shown)


def command_flags(ctx: typer.Context) -> dict[str, Any]:
    """The settings the user typed on the command line (or set through an environment variable)."""
    given = {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        # By name: typer may carry its own copy of click, whose enum is not click.core's.
        if name not in NOT_SETTINGS and source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            given[name] = value
    return given


def command_settings(ctx: typer.Context, settings_cls: type[Settings], section: str) -> Settings:
    """The command's settings: defaults < the recipe's `section:` < typed flags (mdt.settings.resolve_settings)."""
    return resolve_settings(settings_cls, section, recipe=ctx.params.get("config"), flags=command_flags(ctx))
