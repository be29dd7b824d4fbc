"""Artifact files: atomic writes (a reader never sees a half-written file under its final name), and
JSON records read back with one sentence when they are not what they should be."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mdt.errors import UserError


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; artifacts are shared between users of a cluster.
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def merge_json(path: str | os.PathLike[str], updates: dict[str, Any]) -> dict[str, Any]:
    """Add `updates` to the JSON object in `path` (created if missing), atomically; returns the result.
    Lets several commands report into one metrics file without knowing of each other."""
    path = Path(path)
    current = json.loads(path.read_text()) if path.is_file() else {}
    current.update(updates)
    write_json(path, current)
    return current


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; unreadable, invalid or not an object: one sentence ending in `fix`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} could not be read as JSON ({err}); {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object; {fix}")
    return data
