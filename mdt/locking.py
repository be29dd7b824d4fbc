"""One writer per output folder: `mdt train`, `mdt encode` and `mdt sample` hold a lock on theirs.

The lock is an advisory `flock` on `FOLDER/.mdt-lock`, which the kernel releases when its holder
ends in any way (SIGKILL and crashes included), so a dead process never leaves a folder stuck. The
file records who holds it, so a refusal can name the running process. Under several ranks only
rank 0 takes it, and every rank learns the answer, so a refused launch stops on all of them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from mdt import distributed
from mdt.errors import UserError

LOCK_NAME = ".mdt-lock"


def _holder_description(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
        return f"pid {holder['pid']} on {holder['host']} (`{holder['command']}`, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _try_lock(folder: Path) -> tuple[int | None, str]:
    """(file descriptor holding the lock, "") or (None, who holds it)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None, _holder_description(path)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(["mdt", *sys.argv[1:]])[:300],
              "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd, ""


def _agree(ok: bool) -> bool:
    """True on every rank when rank 0's answer is True."""
    if not distributed.is_initialized():
        return ok
    device = distributed.default_device() if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


@contextlib.contextmanager
def exclusive_folder(folder: str | os.PathLike[str], flag: str) -> Iterator[None]:
    """Hold `folder`'s lock for the block; refuse with one sentence naming the holder if it is taken.

    `flag` names the folder the way the user gave it (e.g. "--out runs/x").
    """
    folder = Path(folder)
    created_folder, created_file = not folder.exists(), not (folder / LOCK_NAME).exists()
    fd, holder = _try_lock(folder) if distributed.is_main() else (None, "")
    if not _agree(fd is not None or not distributed.is_main()):
        raise UserError(f"{flag} {folder} is in use by {holder or 'another mdt process (see rank 0)'}; "
                        "wait for it to end or stop it, or choose another folder")
    try:
        yield
    except BaseException:
        # A command refused or failed on its first use of the folder leaves no trace of the lock.
        if fd is not None and created_file:
            (folder / LOCK_NAME).unlink(missing_ok=True)
            if created_folder and not any(folder.iterdir()):
                folder.rmdir()
        raise
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)
