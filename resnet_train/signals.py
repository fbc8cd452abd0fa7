"""SIGTERM and SIGINT (Ctrl-C) as a request to stop at the next safe point; standard library only."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Set by SIGTERM/SIGINT; the loop saves at the next step boundary and returns.

    In a multi-process run (after ``agree``) SIGTERM belongs to JAX's preemption notifier, which
    tells every process; SIGINT is passed on to it as SIGTERM, and every process stops at the step
    they agree on.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.agreed: Callable[[int], bool] | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.agreed is not None and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.signal_name = signal.Signals(signum).name

    def agree(self, agreed: Callable[[int], bool]) -> None:
        """From now on stop when ``agreed(step)`` says all processes have reached the step to stop at."""
        self.agreed = agreed

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after ``step`` steps (call once per step, on every process)."""
        if self.agreed is not None and self.agreed(step):
            self.signal_name = signal.SIGTERM.name
        return self.signal_name is not None


@contextlib.contextmanager
def catch_stop_signals() -> Iterator[StopRequest]:
    """Turn SIGTERM/SIGINT into a StopRequest while inside; a nested use shares the outer request."""
    current = signal.getsignal(STOP_SIGNALS[0])
    if isinstance(current, StopRequest):
        yield current
        return
    request = StopRequest()
    previous = {s: signal.signal(s, request) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
