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
        recipe = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"recipe {path} is not valid YAML: {err}") from err
    if not isinstance(recipe, dict):
        raise UserError(f"recipe {path} must be a YAML mapping of sections (encode:, train:, sample:, ...)")
    return recipe


def recipe_section(path: str | Path, name: str) -> dict[str, Any]:
    section = load_recipe(path).get(name) or {}
    if not isinstance(section, dict):
        raise UserError(f"recipe {path}: {name}: must be a mapping of settings")
    return section

