"""The timing loop the benchmark scripts share (`from timing import median_seconds`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(
    fn: Callable[[], Any], repeats: int, *, sync: Callable[[], None] = lambda: None, warmup: int = 0
) -> tuple[float, Any]:
    """Median wall time of `fn` over `repeats` calls after `warmup` untimed calls, each timed between two calls of
    `sync` (a device synchronisation on a GPU), and the last call's result."""
    result = None
    for _ in range(warmup):
        result = fn()
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), result
