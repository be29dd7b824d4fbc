"""One way in for every command's settings.

Each command's settings are one dataclass that the library receives whole (TrainConfig, SampleConfig,
EncodeConfig, FidConfig, ShapesConfig), and `resolve_settings` builds it, lowest first, from:

    the dataclass's defaults < `base` (a run's recorded settings, on resume)
    < the recipe's section for the command < the command-line flags < `--set key=value`

A recipe key, a flag and a field have the same name (`cfg_scale`, `--cfg-scale`, `SampleConfig.cfg_scale`),
so a setting can be followed from where it is given to where it is used. Strings from `--set` are read as
YAML scalars; dotted keys (`objective.mask_ratio`) reach into a dict field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mdt.errors import UserError
from mdt.recipe import recipe_section

Settings = TypeVar("Settings")


def parse_value(key: str, value: Any) -> Any:
    """A command-line string as a YAML scalar (`--set objective.mask_ratio=0.4` gives 0.4)."""
    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise UserError(f"cannot parse the value of '{key}': {value!r} ({err})") from err
    if isinstance(parsed, str):  # YAML reads "1e-4" as a string
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def _field_types(cls: type) -> dict[str, set[type]]:
    """Each field's accepted types, None left out (`Path | None` gives {Path})."""
    hints = typing.get_type_hints(cls)
    types_of = {}
    for name, hint in hints.items():
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        types_of[name] = {typing.get_origin(a) or a for a in args if a is not type(None)}
    return types_of


def _convert(key: str, value: Any, accepted: set[type]) -> Any:
    """A value for a field of the `accepted` types: a path stays text (or becomes a Path), numbers and
    booleans typed as strings are parsed."""
    if Path in accepted and isinstance(value, (str, Path)):
        return Path(value)
    if str in accepted and isinstance(value, str):
        return value  # "1e-4" stays a string where a string is wanted (a file name, say)
    value = parse_value(key, value)
    if float in accepted and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # YAML's `lr: 1` is the number 1.0, recorded as such
    return value


def apply_settings(settings: Settings, values: dict[str, Any], source: str,
                   aliases: dict[str, str] | None = None) -> Settings:
    """A copy of the dataclass `settings` with the fields named in `values` set (None: not given); dotted keys
    reach into dict fields and `aliases` maps old names to their current ones. An unknown key is refused."""
    types_of = _field_types(type(settings))
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        key = (aliases or {}).get(key, key)
        head, _, sub = key.partition(".")
        if head not in types_of:
            raise UserError(f"unknown setting '{key}' in {source}; known: {', '.join(sorted(types_of))}")
        if sub:
            section = changes.get(head, getattr(settings, head))
            if not isinstance(section, dict):
                raise UserError(f"'{head}' in {source} is not a section, so '{key}' cannot be set")
            changes[head] = {**section, sub: parse_value(key, value)}
        else:
            changes[head] = _convert(key, value, types_of[head])
    return dataclasses.replace(settings, **changes)


def resolve_settings(cls: type[Settings], section: str, *, recipe: str | Path | None = None,
                     flags: dict[str, Any] | None = None, sets: typing.Iterable[str] = (),
                     base: dict[str, Any] | None = None, aliases: dict[str, str] | None = None) -> Settings:
    """The settings of one command: defaults < base < the recipe's `section:` < flags < `--set` items."""
    settings = cls()
    if base:
        settings = apply_settings(settings, base, "the run's recorded settings", aliases)
    if recipe is not None:
        settings = apply_settings(settings, recipe_section(recipe, section), f"recipe {recipe}: {section}:", aliases)
    settings = apply_settings(settings, flags or {}, "the command line", aliases)
    return apply_settings(settings, split_sets(sets), "--set", aliases)


def split_sets(items: typing.Iterable[str]) -> dict[str, str]:
    """`--set key=value` items as {key: value}."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r} must look like key=value")
        pairs[key] = value
    return pairs


def settings_dict(settings: Any) -> dict[str, Any]:
    """Every field of a settings dataclass, paths as text (JSON- and YAML-ready)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()}
