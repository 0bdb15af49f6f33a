"""Progress of long stages (images written of planned, epochs, sweep trials), for the console. Stages call
``update``; the command line shows it as bars on a terminal (``set_sink``). Elsewhere nothing is shown
beyond the stages' own log lines, so CI logs and ``ray job logs`` stay plain."""

from __future__ import annotations

from typing import Callable, Optional

_sink: Optional[Callable[[str, int, int], None]] = None


def set_sink(fn: Optional[Callable[[str, int, int], None]]) -> None:
    """Where updates go: ``fn(task, done, total)``, or None (nowhere)."""
    global _sink
    _sink = fn


def update(task: str, done: int, total: int) -> None:
    """``done`` of ``total`` for ``task`` (a name shown beside the bar, e.g. 'images balanced')."""
    if _sink is not None and total > 0:
        _sink(task, min(done, total), total)
