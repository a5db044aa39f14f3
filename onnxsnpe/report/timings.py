"""Wall-clock time per stage of one command run (report.json's ``timings``, the --debug log)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class StageTimer:
    """Wall seconds per stage of one run: report.json's ``timings``, and the --debug log."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage ``name`` (added to earlier time of the same name)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        log.debug("stage %s: %.3f s", name, seconds)

    def to_dict(self) -> dict[str, float]:
        """Seconds per stage in the order they ran, and the total so far (the command's, less its last writes)."""
        return {**{name: round(value, 3) for name, value in self.seconds.items()},
                "total": round(time.perf_counter() - self.start, 3)}
