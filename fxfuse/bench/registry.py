"""The case registry: adding a benchmark is one decorated function returning (baseline_fn, optimized_fn).

    @case("op/my-op[4x256]", quick=True, compile=True)
    def my_op():
        x = torch.randn(4, 256)
        return lambda: eager_version(x), lambda: fused_version(x)

Setup runs only when the case is selected. A selected case that cannot run (its module does not import,
its model fails to optimize, it raises `SkipCase`) is reported with its error and fails the run: a
benchmark that silently does not run guards nothing.

`floor=` gives a case an absolute minimum ratio (checked whatever the baseline says); `note=` says what a
case really compares when its name cannot (printed under the table).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

Fn = Callable[[], object]
Setup = Callable[[], tuple[Fn, Fn]]

REPO_ROOT = Path(__file__).resolve().parents[2]


class SkipCase(Exception):
    """Raised by a case's setup when it cannot run here; the run reports this reason and fails."""


@dataclass(frozen=True)
class Case:
    """One benchmark. `compile=True` adds "<name> vs compile" (torch.compile'd original) in full runs;
    `floor`: the least ratio accepted whatever the baseline says; `note`: what the two sides are."""

    name: str
    setup: Setup
    suite: str = "cpu"
    quick: bool = True
    compile: bool = False
    group: str = "op"
    floor: float | None = None
    note: str = ""


@dataclass
class Registry:
    cases: list[Case] = field(default_factory=list)
    families: list[tuple[str, Callable[[], list[Case]]]] = field(default_factory=list)

    def case(
        self,
        name: str,
        *,
        suite: str = "cpu",
        quick: bool = True,
        compile: bool = False,
        group: str = "",
        floor: float | None = None,
        note: str = "",
    ) -> Callable[[Setup], Setup]:
        """Register `setup` (no arguments, returns (baseline_fn, optimized_fn)) as one case."""

        def register(setup: Setup) -> Setup:
            if any(c.name == name for c in self.cases):
                raise ValueError(f"benchmark case {name!r} is registered twice")
            self.cases.append(Case(name, setup, suite, quick, compile, group or name.split("/")[0], floor, note))
            return setup

        return register

    def family(self, label: str) -> Callable[[Callable[[], list[Case]]], Callable[[], list[Case]]]:
        """Register a function that lists cases only known at run time (one per model in a module)."""

        def register(fn: Callable[[], list[Case]]) -> Callable[[], list[Case]]:
            self.families.append((label, fn))
            return fn

        return register

    def select(self, suite: str, *, quick: bool, contains: str | None = None) -> Iterator[Case | tuple[str, Exception]]:
        """Cases of `suite` in order; a family that cannot list its cases gives (label, error) instead."""
        listed: list[Case] = list(self.cases)
        for label, fn in self.families:
            try:
                listed += fn()
            except Exception as e:  # reported (and failing the run) by the runner, with the family's label
                if contains is None or contains in label:
                    yield label, e
        listed.sort(key=lambda c: c.group != "op")  # ops first, then models; otherwise registration order
        for c in listed:
            if c.suite != suite or (quick and not c.quick):
                continue
            if contains is not None and contains not in c.name:
                continue
            yield c


REGISTRY = Registry()
case = REGISTRY.case
family = REGISTRY.family


def load_repo_module(relpath: str) -> ModuleType:
    """Import a file of the repository that is not part of the package (examples/, benchmarks/)."""
    path = REPO_ROOT / relpath
    if not path.exists():
        raise FileNotFoundError(f"{relpath} does not exist")
    name = "_fxfuse_bench_" + relpath.replace("/", "_").removesuffix(".py")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
