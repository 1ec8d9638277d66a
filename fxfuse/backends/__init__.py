"""Backend choice for fused ops: CUDA -> Triton, CPU -> ATen fast path, anything else -> reference."""

from __future__ import annotations

import contextlib
import functools
import os
from collections import Counter
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("auto", "triton", "cpu", "reference")

# Calls of fused ops by (op, implementation that ran), e.g. ("attention", "cpu"): what actually executed,
# which a report or a test can hold against what was chosen. Read a block's calls with `counting_calls`.
CALLS: Counter[tuple[str, str]] = Counter()
_OPEN: list[Counter] = []


def count_call(op: str, backend: str) -> None:
    """Called by each fused op's dispatch with the implementation about to run."""
    CALLS[(op, backend)] += 1
    for counter in _OPEN:
        counter[(op, backend)] += 1


@contextlib.contextmanager
def counting_calls() -> Iterator[Counter[tuple[str, str]]]:
    """`with counting_calls() as calls: ...`: `calls[("attention", "cpu")]` counts the block's calls."""
    counter: Counter[tuple[str, str]] = Counter()
    _OPEN.append(counter)
    try:
        yield counter
    finally:
        _OPEN.remove(counter)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton kernels run on CPU tensors (`TRITON_INTERPRET=1`, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str, device: torch.device | str) -> str:
    """The backend that will run for tensors on `device`: "triton", "cpu" or "reference".

    "triton" asked for on CPU tensors runs only under the Triton interpreter; otherwise the op uses its
    reference implementation (the report shows which one ran).
    """
    device = torch.device(device)
    if backend == "reference":
        return "reference"
    if backend == "triton":
        if triton_available() and (device.type == "cuda" or triton_interpreting()):
            return "triton"
        return "reference"
    if backend == "cpu":
        return "cpu" if device.type == "cpu" else "reference"
    if device.type == "cuda":
        return "triton" if triton_available() else "reference"
    if device.type == "cpu":
        return "cpu"
    return "reference"


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the compiled scan kernels take


def kernel_backend(backend: str, tensors: list[torch.Tensor | None], cpu_problem: Callable[[], str | None]) -> str:
    """Which implementation of an op with a compiled CPU kernel runs for these inputs ("triton", "cpu" or
    "reference"): the reference for other dtypes, empty inputs, or where `cpu_problem()` says the CPU
    kernel cannot be built."""
    check_backend(backend)
    real = [t for t in tensors if t is not None]
    name = resolve(backend, real[0].device)
    if name == "reference" or any(t.dtype not in KERNEL_DTYPES for t in real) or real[0].numel() == 0:
        return "reference"
    if name == "cpu" and cpu_problem() is not None:
        return "reference"
    return name


def kernel_backend_label(backend: str, device: torch.device | str, cpu_problem: Callable[[], str | None]) -> str:
    """The report's backend column for such an op: "reference (why)" where the CPU kernel cannot be built."""
    name = resolve(backend, device)
    problem = cpu_problem() if name == "cpu" else None
    return name if problem is None else f"reference ({problem})"
