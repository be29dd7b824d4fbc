"""`mdt recipe PIPELINE`: every stage's settings as a run would use them, as JSON, starting nothing.

Each stage command's defaults come from the command itself (its typer options, read through click),
so what this prints cannot drift from what `mdt encode/train/sample/fid --config PIPELINE` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from mdt.errors import UserError

# The recipe sections that stage commands read; `train` is resolved by the trainer's own function.
STAGES = ("shapes", "encode", "train", "sample", "fid", "classifier")
_NOT_SETTINGS = {"config", "local_rank", "set_", "resume", "deepspeed"}


def command_defaults(command: Any) -> dict[str, Any]:
    """The values a command uses for options nobody gave (typer keeps them on its click parameters)."""
    return {p.name: p.default for p in command.params if p.name not in _NOT_SETTINGS}


def _sample_fill_ins(values: dict[str, Any]) -> dict[str, Any]:
    """The steps, spacing and eta the sampler picks when the recipe leaves them out."""
    from mdt.sample.run import DEFAULT_STEPS
    from mdt.sample.samplers import ETA_SAMPLERS

    sampler = values.get("sampler")
    if sampler not in DEFAULT_STEPS:
        raise UserError(f"sample: sampler {sampler!r} is unknown; use one of {', '.join(DEFAULT_STEPS)}")
    filled = dict(values)
    filled["steps"] = values.get("steps") or DEFAULT_STEPS[sampler]
    filled["spacing"] = values.get("spacing") or ("linspace" if sampler == "maskdm-ddim" else "even")
    if values.get("eta") is None:
        filled["eta"] = ETA_SAMPLERS.get(sampler)
    return filled


def resolve_recipe(path: Path, commands: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{stage: settings} for every stage section the recipe has."""
    from mdt.recipe import load_recipe, merge_section
    from mdt.train.config import resolve_config

    recipe = load_recipe(path)
    unknown = sorted(set(recipe) - set(STAGES))
    if unknown:
        raise UserError(f"recipe {path} has unknown section(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
    resolved: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        if stage not in recipe:
            continue
        if stage == "train":
            resolved[stage] = resolve_config(path, {}).to_dict()
            continue
        command = commands[stage]
        if hasattr(command, "commands"):  # a group: `mdt classifier train` reads the classifier: section
            command = command.commands["train"]
        values = merge_section(path, stage, command_defaults(command), given=set())
        resolved[stage] = _sample_fill_ins(values) if stage == "sample" else values
    return resolved


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def recipe_command(
    ctx: typer.Context,
    pipeline: Path = typer.Argument(..., help="recipe YAML (pipelines/*.yaml)"),
) -> None:
    """Print every stage's resolved settings (defaults filled in) as JSON; starts nothing."""
    commands = ctx.find_root().command.commands  # the stage commands of the `mdt` group
    typer.echo(json.dumps(_jsonable(resolve_recipe(pipeline, commands)), indent=2))
