"""Training loss, accuracy and rate summed over a span of steps, from the metrics the steps return."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass
class Tally:
    """Training loss and accuracy summed over the steps since `start` (finite ones only), and the rate."""

    start: float
    steps: int = 0
    loss: float = 0.0
    correct: int = 0
    seen: int = 0

    def add(self, metrics: Mapping[str, Any], batch: int) -> None:
        """Count one step from its fetched metrics (``loss``, ``correct``, ``finite``)."""
        self.steps += 1
        if metrics["finite"]:
            self.loss += float(metrics["loss"]) * batch
            self.correct += int(metrics["correct"])
            self.seen += batch

    def means(self) -> tuple[float, float]:
        """Mean training loss and accuracy (0, 0 before any finite step)."""
        n = max(self.seen, 1)
        return self.loss / n, self.correct / n

    def rate(self, batch: int) -> float:
        """Training images per second since start."""
        return self.steps * batch / (time.perf_counter() - self.start)
