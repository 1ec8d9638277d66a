"""Peak memory of one call on the CPU: the resident-set high-water mark the call adds (Linux).

Writing "5" to /proc/self/clear_refs resets the kernel's peak-RSS counter (VmHWM) to the current RSS,
so VmHWM after the call minus VmRSS before it is the most memory the call held at once, whichever
allocator served it. Large tensors are mmap'ed and returned to the system when freed, so the figure
tracks tensors; small ones that a cached allocator keeps are within a few MiB of noise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"{key} is missing from {_STATUS}")


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Bytes of resident memory `fn()` added at its peak (its result included, freed before return)."""
    if not _CLEAR_REFS.exists():
        raise RuntimeError("peak memory is measured through /proc/self/clear_refs (Linux 4.0 or newer)")
    _CLEAR_REFS.write_text("5")
    before = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - before)
