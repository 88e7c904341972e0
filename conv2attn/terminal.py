"""Terminal presentation: a progress line on stderr and colour in tables.

Both appear only on a terminal: progress when stderr is one (and not with ``-q``), and
only once a task has run for a second, so quick runs and pipelines see plain output;
colour when stdout is one and ``NO_COLOR`` is not set.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

RESET = "\033[0m"
BOLD = "\033[1m"
RED = "\033[31m"
GREEN = "\033[32m"


def use_colour(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    return stream.isatty() and "NO_COLOR" not in os.environ


def paint(text: str, style: str, colour: bool) -> str:
    return f"{style}{text}{RESET}" if colour and text else text


class Progress:
    """``progress(done, total, label)`` draws ``label [#####.....] done/total`` in place."""

    def __init__(
        self,
        task: str,
        stream: TextIO | None = None,
        enabled: bool = True,
        delay: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        width: int = 24,
    ):
        self.task = task
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.delay = delay
        self.clock = clock
        self.width = width
        self.start = clock()
        self.drawn = False

    def __call__(self, done: int, total: int, label: str = "") -> None:
        if not self.enabled or self.clock() - self.start < self.delay:
            return
        filled = self.width * done // max(total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{self.task} [{bar}] {done}/{total} {label}"[:120]
        self.stream.write("\r" + line.ljust(120))
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        """Erase the line, so what follows starts clean."""
        if self.drawn:
            self.stream.write("\r" + " " * 120 + "\r")
            self.stream.flush()
            self.drawn = False
