"""`mdt recipe PIPELINE`: every stage's settings as a run would use them, as JSON, starting nothing.

Each stage is resolved by the function its command uses (mdt.settings, and the trainer's resolve_config),
from the same settings dataclass, so what this prints cannot drift from what `mdt STAGE --config PIPELINE` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from mdt.errors import UserError


def _settings_classes() -> dict[str, type]:
    """The settings dataclass of each stage command, the one the command itself resolves."""
    from mdt.data.encode import EncodeConfig
    from mdt.data.shapes import ShapesConfig
    from mdt.eval.fid import FidConfig
    from mdt.sample.config import SampleConfig

    return {"shapes": ShapesConfig, "encode": EncodeConfig, "sample": SampleConfig, "fid": FidConfig}


STAGES = ("shapes", "encode", "train", "sample", "fid")


def resolve_recipe(path: Path) -> dict[str, dict[str, Any]]:
    """{stage: settings} for every stage section the recipe has, resolved as `mdt STAGE --config PATH` does."""
    from mdt.recipe import load_recipe
    from mdt.settings import resolve_settings, settings_dict
    from mdt.train.config import resolve_config

    recipe = load_recipe(path)
    unknown = sorted(set(recipe) - set(STAGES))
    if unknown:
        raise UserError(f"recipe {path} has unknown section(s) {', '.join(unknown)}; known: {', '.join(STAGES)}")
    classes = _settings_classes()
    resolved: dict[str, dict[str, Any]] = {}
    for stage in (s for s in STAGES if s in recipe):
        if stage == "train":
            resolved[stage] = resolve_config(path, {}).to_dict()
            continue
        settings = resolve_settings(classes[stage], stage, recipe=path)
        resolved[stage] = settings.to_dict() if hasattr(settings, "to_dict") else settings_dict(settings)
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
    pipeline: Path = typer.Argument(..., help="recipe YAML (pipelines/*.yaml)"),
) -> None:
    """Print every stage's resolved settings (defaults filled in) as JSON; starts nothing."""
    typer.echo(json.dumps(_jsonable(resolve_recipe(pipeline)), indent=2))
