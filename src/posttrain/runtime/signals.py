"""Graceful stop: SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption, `kill`) ends a run after the
current step, with a checkpoint of that step to resume from.

    with StopRequest() as stop:
        for step in range(start_step, max_steps):
            ...                                     # one whole step
            if stop.requested:
                raise stop.interrupted(step + 1, save_checkpoint(...))

While the block runs, the first signal only records itself (and says so on stderr); the loop finishes
its step, writes a checkpoint and raises `TrainingInterrupted`, which the CLI reports with the command
that resumes the run, exiting with 128 + the signal number (130 for SIGINT, 143 for SIGTERM: the run
is not complete, and a scheduler reads these codes as "stopped by a signal"). A second signal stops
at once, as if no handler were installed: KeyboardInterrupt for SIGINT, exit status 143 for SIGTERM.
The previous handlers are restored when the block exits. Python runs signal handlers in the main
thread only, so outside it `StopRequest` installs nothing and `requested` stays False.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType


class TrainingInterrupted(Exception):
    """A run stopped by a signal after `step`, whose checkpoint is `checkpoint`; resume from it."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path):
        name = signal.Signals(signal_number).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint written: {checkpoint}")
        self.signal_number, self.step, self.checkpoint = signal_number, step, checkpoint

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the shell's convention for a process ended by that signal."""
        return 128 + self.signal_number


class StopRequest:
    """Turns the first SIGINT or SIGTERM into a request the training loop honours after its step."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self.signal_number: int | None = None
        """The signal received while active, or None."""
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def interrupted(self, step: int, checkpoint: Path) -> TrainingInterrupted:
        """The exception a loop raises once it has finished `step` and written `checkpoint`."""
        if self.signal_number is None:
            raise RuntimeError("StopRequest.interrupted: no signal was received")
        return TrainingInterrupted(self.signal_number, step, checkpoint)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_number is not None:  # the second signal: stop now
            self.__exit__(None, None, None)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signal_number = signum
        # os.write, not print: a handler that writes to a buffered stream the loop is writing to raises
        # "reentrant call"; one unbuffered write is safe.
        os.write(2, f"\n{name}: finishing this step, then writing a checkpoint (send again to stop now)\n".encode())
