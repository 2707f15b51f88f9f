"""One way for tests to wait for something another process or thread brings about."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout_s: float,
    interval_s: float = 0.1,
    message: str = "condition",
    still_alive: Callable[[], None] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; AssertionError after ``timeout_s``.

    ``still_alive`` is called before every poll and should raise when waiting longer is pointless (the server
    under test exited, say), so a crash fails at once with its own message instead of as a timeout.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if still_alive is not None:
            still_alive()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout_s}s")
        time.sleep(interval_s)
