"""SIGTERM and SIGINT (Ctrl-C) as a request to stop at the next safe point; standard library only."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Set by SIGTERM/SIGINT; the loop saves at the next step boundary and returns."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name


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
