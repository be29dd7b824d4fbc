"""Shared by the scripts that make golden fixtures from official code (tools/make_*_fixtures.py)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


def check_checkout(directory: Path, commit: str) -> bool:
    """Fail if ``directory`` is a git work tree at another commit; warn if that cannot be checked."""
    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else ""

    top, head, dirty = git("rev-parse", "--show-toplevel"), git("rev-parse", "HEAD"), git("status", "-s")
    if not top or Path(top).resolve() != directory.resolve():
        warnings.warn(f"{directory} is not a git work tree: cannot check it is at {commit}", stacklevel=2)
        return False
    if head != commit:
        raise SystemExit(f"{directory} is at {head}, expected {commit}")
    if dirty:
        warnings.warn(f"{directory} has local changes:\n{dirty}", stacklevel=2)
    return not dirty


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def save_fixture(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Finite float32/float64, int64 and bool tensors, with `meta` as JSON under the metadata key "fixture"."""
    tensors = {k: v.detach().clone().contiguous() for k, v in tensors.items()}
    for key, value in tensors.items():
        assert value.dtype in (torch.float32, torch.float64, torch.int64, torch.bool), f"{key}: {value.dtype}"
        assert not value.is_floating_point() or torch.isfinite(value).all(), f"{key} is not finite"
    text = json.dumps(meta, sort_keys=True, default=str)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"fixture": text}))
