"""The run's one clock, and what every rank learns from the others after each step."""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass

import torch

from mdt import distributed


@dataclass(frozen=True)
class StopReasons:
    """Why the ranks must stop, as agreed by all of them after a step."""

    nonfinite_loss: bool  # the loss was NaN or infinite on at least one rank
    signum: int  # the stop signal a rank received (the largest number if several), 0 if none

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None


class RunClock:
    """The run's training time: this process's loop plus what the resumed checkpoint recorded.

    `seconds` is the run's one clock: after each step every rank reads its own clock once and all
    take the slowest rank's reading (`agree`), so the budget test, the log (wall_time_s), the
    checkpoint (train_seconds) and metrics.json read one value, and every rank stops after the same step.
    """

    def __init__(self, prior_seconds: float):
        self.prior_seconds = prior_seconds
        self.seconds = prior_seconds  # the agreed value; the checkpoint's until the first step ends
        self._start = time.perf_counter()

    def start(self) -> None:
        """Start counting this process's time (just before its first step)."""
        self._start = time.perf_counter()

    def reading(self) -> float:
        """This rank's own reading."""
        return self.prior_seconds + time.perf_counter() - self._start

    def spent(self, budget: float) -> bool:
        """Whether the run's time reached `budget` seconds (0: no budget)."""
        return budget > 0 and self.seconds >= budget

    def agree(self, loss: float, signum: int, device: torch.device) -> StopReasons:
        """One all-reduce (max) after a step of this rank's non-finite loss, stop signal number and clock
        reading; sets `seconds` to the slowest rank's reading and returns the stop reasons of all ranks."""
        flags = torch.tensor([float(not math.isfinite(loss)), float(signum), self.reading()],
                             dtype=torch.float64, device=device)
        if distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        nonfinite, signum_max, clock = flags.tolist()
        self.seconds = clock
        return StopReasons(nonfinite_loss=nonfinite > 0, signum=int(signum_max))
