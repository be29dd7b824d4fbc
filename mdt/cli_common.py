"""What the `mdt` command modules share: a recipe's section filling the options the user did not type,
and the refusal of a missing required value. It imports none of the command modules."""

from __future__ import annotations

from pathlib import Path

import typer

from mdt.errors import UserError

RECIPE_HELP = "recipe YAML (pipelines/*.yaml); flags override its section for this command"


def given_options(ctx: typer.Context) -> set[str]:
    """The options the user typed (a recipe fills in only the others)."""
    # By name: typer may carry its own copy of click, whose enum is not click.core's.
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return {name for name, source in sources.items()
            if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")}


def with_recipe(ctx: typer.Context, config: Path | None, section: str) -> dict:
    """This command's options, with the recipe's `section:` filling every one the user did not type."""
    from mdt.recipe import merge_section

    return merge_section(config, section, {k: v for k, v in ctx.params.items() if k != "config"},
                         given_options(ctx))


def require(values: dict, name: str, flag: str, what: str) -> None:
    """Refuse a required option that neither the command line nor the recipe gave."""
    if values.get(name) in (None, ""):
        raise UserError(f"no {what} given; pass {flag} or set {name}: in the recipe's section")
