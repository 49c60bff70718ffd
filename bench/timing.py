"""What the GPU benchmarks share: timing a call (synchronised), its median and spread, the host's CPU.

The scripts in bench/ run as `python bench/<script>.py` (bench/ is then first on sys.path), on this
machine or on the GPU machine with only d2build's files, so this module imports nothing outside the
standard library.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable


def calls_ms(fn: Callable[[], Any], sync: Callable[[], None], n: int, warmup: int = 0) -> list[float]:
    """Milliseconds of `n` calls of `fn`, each followed by `sync()` (the device finished), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def spread(ms: list[float], digits: int = 2) -> dict[str, float]:
    """median, p10 and p90 of milliseconds."""
    s = sorted(ms)
    return {"median_ms": round(statistics.median(s), digits), "p10_ms": round(s[len(s) // 10], digits),
            "p90_ms": round(s[(9 * len(s)) // 10], digits)}


def host_cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
