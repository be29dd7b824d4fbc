"""Training logs: JSON lines on rank 0, and TensorBoard scalars when asked for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mdt import distributed
from mdt.errors import UserError
from mdt.fileio import atomic_path


class MetricsLog:
    def __init__(self, path: Path, *, resume_step: int | None, tensorboard_dir: Path | None):
        self.enabled = distributed.is_main()
        self.path = path
        self.writer = None
        if not self.enabled:
            return
        if resume_step is not None and path.exists():
            self._truncate_after(resume_step)
        elif path.exists():
            path.unlink()
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise UserError("--tensorboard needs the tensorboard package; pip install tensorboard") from err
            self.writer = SummaryWriter(str(tensorboard_dir))

    def _truncate_after(self, step: int) -> None:
        """Drop lines a killed run logged after its last checkpoint: the resumed run redoes them."""
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
