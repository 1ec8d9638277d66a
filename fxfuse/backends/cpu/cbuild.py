"""Build and load a small plain-C kernel library (no torch headers) on first use, cached per source.

The library is compiled with the system C compiler (~0.3 s) and cached under the user cache directory,
keyed by the source, the flags and the CPU, so a changed kernel or another machine rebuilds it. Where no
compiler works, `load` returns a sentence saying why, and the op runs its reference instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fxfuse"


def _cpu_key() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def _compile(compiler: str, source: Path, target: Path) -> str | None:
    """Build the library at `target`; None, or why it could not be built."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        # without an OpenMP runtime (Apple clang): one thread, the `omp simd` vectorization hints kept
        for flags in (FLAGS, [f if f != "-fopenmp" else "-fopenmp-simd" for f in FLAGS]):
            try:
                run = subprocess.run([compiler, *flags, "-o", str(built), str(source), "-lm"],
                                     capture_output=True, text=True, timeout=120)  # fmt: skip
            except (OSError, subprocess.SubprocessError) as exc:
                return f"the C compiler {compiler} did not run ({exc}); the reference runs instead"
            if run.returncode == 0:
                os.replace(built, target)  # atomic: concurrent processes see a whole library or none
                return None
    return f"the C kernel {source.name} did not compile ({run.stderr.strip()[:200]}); the reference runs instead"


def build(source: Path) -> ctypes.CDLL | str:
    """The library built from `source` (or found in the cache), or a sentence saying why there is none."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return f"no C compiler found (set CC); {source.stem} runs its reference on CPU"
    if not source.exists():
        return f"the kernel source {source.name} is not installed; the reference runs instead"
    key = hashlib.sha256(source.read_bytes() + " ".join([compiler, *FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        problem = _compile(compiler, source, target)
        if problem is not None:
            return problem
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        return f"the C kernel {source.name} did not load ({exc}); the reference runs instead"


load = functools.cache(build)  # one build and load per source and process
