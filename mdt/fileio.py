"""Artifact files: atomic writes (a reader never sees a half-written file under its final name), and
JSON records, safetensors weights and npz archives read back with one sentence when they are not what
they should be."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

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
    current = read_json_object(path, MERGE_FIX) if path.is_file() else {}
    current.update(updates)
    write_json(path, current)
    return current


MERGE_FIX = "repair or delete it (the command adds its results to it), or pass another file"


def check_mergeable(path: str | os.PathLike[str]) -> None:
    """Refuse before any work a file merge_json could not add to (a damaged metrics.json)."""
    if Path(path).is_file():
        read_json_object(Path(path), MERGE_FIX)


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; unreadable, empty, cut, not JSON or not an object: one sentence ending in `fix`."""
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except OSError as err:
        raise UserError(f"{path} could not be read ({err.strerror}); {fix}") from None
    except ValueError as err:  # JSONDecodeError, and UnicodeDecodeError for binary bytes
        what = "is empty" if not raw.strip() else f"is not valid JSON, truncated or of another format ({err})"
        raise UserError(f"{path} {what}; {fix}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object; {fix}")
    return data


def check_npz(path: Path, what: str, fix: str) -> None:
    """Refuse a file that is no zip archive (empty, cut, another format) before np.load sees it: np.load
    takes such bytes for a pickle and speaks of allow_pickle, advice that must not reach a user."""
    if not zipfile.is_zipfile(path):
        raise UserError(f"{what} {path} is not a readable npz (empty, truncated or another format); {fix}")


def _not_safetensors(path: Path, fix: str) -> UserError:
    return UserError(f"{path} is not a readable safetensors file (truncated or another format); {fix}")


def read_safetensors(path: Path, fix: str) -> dict[str, Any]:
    """The tensors of a .safetensors file; a cut, empty or foreign file is one sentence ending in `fix`."""
    from safetensors.torch import load_file  # imports torch: only here

    try:
        return load_file(str(path))
    except (SafetensorError, OSError):  # the header's length or JSON, or the data's size, is not what it promises
        raise _not_safetensors(path, fix) from None


def check_safetensors(path: Path, fix: str) -> None:
    """Refuse a cut, empty or foreign .safetensors file from its header alone (which must cover the whole
    file), before a library that reads it says something less clear."""
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError):
        raise _not_safetensors(path, fix) from None
