"""Wall-clock time and peak memory: one definition for runs and benchmarks alike.

Peak resident memory is read from the kernel (``VmHWM``), which counts every page the process
touched, rather than sampled from a thread, which misses short peaks. A multirun runs all its
jobs in one process, so :func:`reset_peak_memory` starts the count afresh for each job.
"""

from __future__ import annotations

import re
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")
PROC_SELF = Path("/proc/self")
Stage = Callable[[str], AbstractContextManager[object]]  # e.g. Timer().stage


def untimed(_name: str) -> AbstractContextManager[object]:
    """A ``Stage`` that times nothing."""
    return nullcontext()


class Timer:
    """Wall-clock seconds of each stage, recorded in metrics.json."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self._start, 3)}


def reset_peak_memory() -> None:
    """Start the peak-memory count afresh (CPU resident set and the GPU's allocator)."""
    with suppress(OSError):  # elsewhere the process-wide peak stands
        (PROC_SELF / "clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float]:
    """Peak resident memory since :func:`reset_peak_memory` (and of the GPU), in GiB."""
    match = None
    with suppress(OSError):
        match = re.search(r"VmHWM:\s+(\d+) kB", (PROC_SELF / "status").read_text())
    kib = int(match.group(1)) if match else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"cpu_rss": kib / 2**20}  # ru_maxrss is in KiB on Linux too
    if torch.cuda.is_available():
        peak["cuda"] = torch.cuda.max_memory_allocated() / 2**30
    return {k: round(v, 3) for k, v in peak.items()}


def resource_use(timer: Timer) -> dict[str, object]:
    """What a run or search record says of its cost: the seconds of each stage, the peak
    memory and torch's CPU threads (the context both figures were measured in)."""
    return {"timings": timer.total(), "peak_memory_gib": peak_memory(),
            "threads": torch.get_num_threads()}  # fmt: skip


def _current_rss_gib() -> float:
    match = None
    with suppress(OSError):
        match = re.search(r"VmRSS:\s+(\d+) kB", (PROC_SELF / "status").read_text())
    return int(match.group(1)) / 2**20 if match else 0.0


def measure(fn: Callable[[], T], device: torch.device) -> tuple[T, float, float]:
    """``fn()``'s result, its seconds and its peak memory in GiB above the starting point
    (resident memory on CPU, the allocator's on GPU), counted from a reset before the call."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**30
    else:
        base = _current_rss_gib()
    reset_peak_memory()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = peak_memory()["cuda" if device.type == "cuda" else "cpu_rss"]
    return result, seconds, max(peak - base, 0.0)
