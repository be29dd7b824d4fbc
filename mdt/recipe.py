"""Recipes: one YAML file per experiment (pipelines/*.yaml), a section per stage.

    shapes:  / encode:  / train:  / sample:  / fid:  / classifier:

Each command reads its own section; a flag given on the command line wins over the recipe, and
the recipe wins over the command's default (mdt.settings). Keys are the command's option names with
underscores (`cfg_scale`, `num_samples`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mdt.errors import UserError


def load_recipe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist; pass a YAML file from pipelines/")
    try:
        recipe = yaml.safe_load(path.read_bytes())
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path} is not valid YAML ({_yaml_problem(err)}); fix the file or pass one from "
                        "pipelines/") from None
    if recipe is None:  # an empty file would silently run every stage with its defaults
        raise UserError(f"recipe {path} is empty; pass a YAML file from pipelines/")
    if not isinstance(recipe, dict):
        raise UserError(f"recipe {path} must be a YAML mapping of sections (encode:, train:, sample:, ...)")
    return recipe


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's complaint in one line (its own text spans several, with a caret under the spot)."""
    if isinstance(err, yaml.reader.ReaderError):
        return f"not UTF-8 text at byte {err.position}"
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(err, 'problem', None) or str(err).splitlines()[0]}{where}"


def recipe_section(path: str | Path, name: str) -> dict[str, Any]:
    section = load_recipe(path).get(name) or {}
    if not isinstance(section, dict):
        raise UserError(f"recipe {path}: {name}: must be a mapping of settings")
    return section

