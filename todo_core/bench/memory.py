"""Peak memory of one call, measured: CUDA's allocator peak on a GPU, the process's peak RSS on a CPU."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

Result = TypeVar("Result")
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Linux resets a process's peak RSS (VmHWM) when 5 is written to clear_refs."""
    with contextlib.suppress(OSError):
        _CLEAR_REFS.write_text("5")
        return True
    return False


def measure_peak(call: Callable[[], Result], device: torch.device) -> tuple[Result, int | None]:
    """Run ``call``; return its result and the peak bytes it added above what was resident before (None if unknown)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = call()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    if not _reset_peak_rss():
        return call(), None
    before = _rss_kib("VmRSS")
    result = call()
    peak = _rss_kib("VmHWM")
    if before is None or peak is None:
        return result, None
    return result, max(0, peak - before) * 1024
