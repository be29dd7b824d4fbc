"""The class index: which integer label each class name gets.

Rules, in order:
1. `--class-list FILE` (one class per line; the first word counts, so ImageNet's
   `synset_mapping.txt` works as is) fixes the names and their order.
2. Class folders that are all ImageNet-1k synsets (`n01440764` ...) get their standard ImageNet-1k
   index, so that a subset of the classes keeps the labels a model trained on all of ImageNet
   expects; the index then covers all 1000 classes.
3. Otherwise the sorted folder names, as torchvision's ImageFolder does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from mdt.errors import UserError

SYNSET_PATTERN = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class ClassIndex:
    """Class names in label order and the rule that chose them."""

    names: tuple[str, ...]
    rule: str  # "class-list", "imagenet-1k", "sorted-folders" or "numeric-labels"

    def __len__(self) -> int:
        return len(self.names)

    def label(self, name: str) -> int:
        return self._lookup()[name]

    def _lookup(self) -> dict[str, int]:
        return _lookup_table(self.names)


@cache
def _lookup_table(names: tuple[str, ...]) -> dict[str, int]:
    return {name: i for i, name in enumerate(names)}


def _parse_class_lines(lines: Iterable[str]) -> list[str]:
    return [line.split()[0] for line in lines if line.strip() and not line.lstrip().startswith("#")]


@cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synsets in the standard class order."""
    text = resources.files("mdt.data").joinpath("imagenet_synsets.txt").read_text()
    return tuple(_parse_class_lines(text.splitlines()))


def imagenet_class_names() -> dict[str, str]:
    """Synset -> human-readable name (e.g. 'n01440764' -> 'tench, Tinca tinca')."""
    text = resources.files("mdt.data").joinpath("imagenet_synsets.txt").read_text()
    pairs = (line.split(maxsplit=1) for line in text.splitlines() if line.strip())
    return {p[0]: (p[1] if len(p) > 1 else p[0]) for p in pairs}


def read_class_list(path: str | Path) -> tuple[str, ...]:
    """Class names in label order from a text file: one per line, first word, '#' comments."""
    path = Path(path)
    try:
        names = _parse_class_lines(path.read_text().splitlines())
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--class-list {path}: cannot read it ({err}); pass a UTF-8 text file.") from err
    if not names:
        raise UserError(f"--class-list {path}: the file lists no classes; write one class name per line.")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UserError(f"--class-list {path}: class '{name}' is listed twice; list each class once.")
        seen.add(name)
    return tuple(names)


def index_for_folders(folder_names: Iterable[str], class_list: str | Path | None = None) -> ClassIndex:
    """The class index for an ImageFolder tree whose class folders are `folder_names`."""
    folders = sorted(set(folder_names))
    if class_list is not None:
        names = read_class_list(class_list)
        known = set(names)
        missing = [f for f in folders if f not in known]
        if missing:
            raise UserError(
                f"--class-list {class_list}: class folder '{missing[0]}' "
                f"({len(missing)} folder(s) in all) is not in the list; add it or remove the folder."
            )
        return ClassIndex(names, "class-list")
    synsets = imagenet_synsets()
    if folders and all(SYNSET_PATTERN.match(f) for f in folders) and set(folders) <= set(synsets):
        return ClassIndex(synsets, "imagenet-1k")
    return ClassIndex(tuple(folders), "sorted-folders")


def index_for_labels(labels: Iterable[int], class_list: str | Path | None = None) -> ClassIndex:
    """The class index for inputs that carry integer labels (WebDataset `cls`)."""
    top = max(labels, default=-1)
    if class_list is not None:
        names = read_class_list(class_list)
        if top >= len(names):
            raise UserError(
                f"--class-list {class_list}: the inputs use label {top} but the list has only "
                f"{len(names)} classes; pass the full class list."
            )
        return ClassIndex(names, "class-list")
    return ClassIndex(tuple(str(i) for i in range(top + 1)), "numeric-labels")
