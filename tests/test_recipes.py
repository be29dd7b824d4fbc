"""Recipes in pipelines/: every section names only options its command has, and the train: section
resolves to a valid configuration of a known model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer.main
from helpers import REPO_ROOT, run_cli

from mdt.cli import app
from mdt.cli_common import NOT_SETTINGS
from mdt.data.encode import EncodeConfig
from mdt.data.shapes import ShapesConfig
from mdt.errors import UserError
from mdt.eval.fid import FidConfig
from mdt.models.registry import model_config
from mdt.recipe import load_recipe
from mdt.sample.config import SampleConfig
from mdt.settings import resolve_settings
from mdt.train.config import TrainConfig, resolve_config

RECIPES = sorted((REPO_ROOT / "pipelines").glob("*.yaml"))
SECTION_COMMANDS = {"shapes": ["shapes"], "encode": ["encode"], "sample": ["sample"], "fid": ["fid"]}


def _options(path: list[str]) -> set[str]:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {p.name for p in command.params} - {"config"}


def test_there_are_recipes_for_the_papers_and_the_demo() -> None:
    names = {p.stem for p in RECIPES}
    assert {"demo", "dit-xl2-in256", "mdt-xl2-in256", "mdtv2-xl2-in256", "maskdit-xl2-in256",
            "maskdit-xl2-in256-unmask", "maskdit-xl2-in512"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_sections_are_known_to_their_commands(recipe: Path) -> None:
    sections = load_recipe(recipe)
    assert set(sections) <= {"train", *SECTION_COMMANDS}, f"unknown section in {recipe.name}"
    for section, command in SECTION_COMMANDS.items():
        unknown = set(sections.get(section) or {}) - _options(command)
        assert not unknown, f"{recipe.name} {section}: {unknown}"
    cfg = resolve_config(recipe, {})
    model_config(cfg.model)  # a known preset
    assert cfg.data
    assert cfg.out


def test_settings_resolve_defaults_then_recipe_then_flags_then_sets(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sample:\n  cfg_scale: 4\n  steps: 10\n  seed: 5\n  classes: [1, 2]\n")
    settings = resolve_settings(SampleConfig, "sample", recipe=recipe, flags={"steps": 20, "cfg_scale": None},
                                sets=["seed=7"])
    assert settings.cfg_scale == 4.0  # the recipe's, as a float
    assert isinstance(settings.cfg_scale, float)
    assert settings.steps == 20  # the flag wins over the recipe
    assert settings.seed == 7  # --set wins over both
    assert settings.num_samples == SampleConfig().num_samples  # the default
    assert resolve_settings(SampleConfig, "sample", flags={"ckpt": "run"}).ckpt == Path("run")  # typed as a path
    recipe.write_text("sample:\n  cfg_scael: 4.0\n")
    with pytest.raises(UserError, match="cfg_scael"):
        resolve_settings(SampleConfig, "sample", recipe=recipe)


@pytest.mark.parametrize(("command", "settings_cls"), [("sample", SampleConfig), ("encode", EncodeConfig),
                                                      ("fid", FidConfig), ("shapes", ShapesConfig),
                                                      ("train", TrainConfig)])
def test_each_option_is_a_field_of_its_commands_settings(command: str, settings_cls: type) -> None:
    """A flag, a recipe key and a settings field share one name, so a setting can be followed to its use."""
    options = _options([command]) - NOT_SETTINGS
    fields = {f.name for f in dataclasses.fields(settings_cls)}
    assert options <= fields
    if command != "train":  # the trainer's sections and rarer settings are reached with --set
        assert fields == options


@pytest.mark.slow
def test_cli_reads_its_section_and_a_typed_flag_wins(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "shapes"
    recipe.write_text(f"shapes:\n  out: {out}\n  size: 12\n  train_per_class: 1\n  val_per_class: 0\n")
    result = run_cli("shapes", "--config", str(recipe), "--size", "8")
    assert result.returncode == 0, result.stderr
    from PIL import Image

    with Image.open(out / "train" / "0-red-disc" / "00000.png") as image:
        assert image.size == (8, 8)  # the flag, not the recipe's 12
    recipe.write_text("shapes:\n  size: 12\n")
    result = run_cli("shapes", "--config", str(recipe))
    assert result.returncode == 2
    assert "no output folder given" in result.stderr


@pytest.mark.slow
def test_the_deepspeed_launchers_local_rank_flag_is_accepted_before_the_subcommand() -> None:
    # `deepspeed --module mdt.cli train ...` runs `python -m mdt.cli --local_rank=N train ...`.
    result = run_cli("--local_rank=1", "models")
    assert result.returncode == 0, result.stderr
    assert "MDTv2-XL/2" in result.stdout
