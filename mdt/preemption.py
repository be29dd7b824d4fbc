"""What SIGTERM and SIGINT do in every `mdt` command: preemption is a normal way for a job to end.

Clusters deliver the signal in different ways: to the trainer only (`kill PID`), to the launcher
(Kubernetes, `kill` of torchrun, which forwards it to its ranks) or to the whole process group or
job step (SLURM's `--signal`, `timeout`, Ctrl-C). Whoever receives it:

- `mdt train` finishes its step, every rank agrees to stop at that step, writes a checkpoint
  there and exits 143 (`StopRequest`, read by the training loop).
- Every other command stops where it is, cleans up its partial files (nothing half-written under a
  final name) and exits 128 + the signal (`interrupt_on_stop_signals` raising `Interrupted`); a
  re-run completes the work.
- DataLoader workers drop the signal (`leave_stop_signals_to_the_parent`, `start_workers`): a worker
  killed by a signal meant for its parent turns the shutdown into a crash. They still end on their
  parent's own SIGTERM, which is how a DataLoader stops them at exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
T = TypeVar("T")


class Interrupted(BaseException):
    """A stop signal arrived; the command cleans up and exits 128 + its number.

    A BaseException, as KeyboardInterrupt is: library code's `except Exception` (PIL's, say) must
    not swallow it half-way through a file, which would then be renamed into place.
    """

    def __init__(self, signum: int):
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {self.signal_name}")


@contextlib.contextmanager
def interrupt_on_stop_signals() -> Iterator[None]:
    """Turn SIGTERM/SIGINT into `Interrupted` raised in the main thread, for the block's duration."""
    def handle(signum, frame) -> None:
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handle) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag the training loop reads after each step (then checkpoints).

    A second signal, e.g. during the checkpoint, only sets the flag again.
    """

    def __init__(self):
        self.signum = 0  # 0 until a signal arrives
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def leave_stop_signals_to_the_parent(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: SIGTERM/SIGINT from anyone but the worker's parent are dropped;
    the parent's own SIGTERM (the DataLoader's terminate() at exit) still ends the worker."""
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # already so from the start, under fork

    def filter_stop_signals() -> None:
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=filter_stop_signals, name="stop-signal-filter", daemon=True).start()



def start_workers(start: Callable[[], T]) -> T:
    """Call `start` (e.g. `iter(data_loader)`, which forks the workers) with SIGTERM/SIGINT blocked:
    each worker starts with them blocked until its init hands them to the filter thread, and a
    signal sent in this instant waits for the parent's handler instead of killing a worker."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
