"""What `optimize` did: one `Rewrite` per candidate site, applied or rejected, with the reason."""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from dataclasses import dataclass, field

from fxfuse import families


@dataclass
class Rewrite:
    """One candidate site. `status` is "applied" or "rejected"; `reason` says why it was rejected."""

    pattern: str
    variant: str
    location: str
    status: str
    reason: str = ""
    max_rel_err: float | None = None  # the fused result's error against the original run in float64
    original_rel_err: float | None = None  # the original's own error against its float64 run
    tolerance: float | None = None  # the dtype's relative tolerance the site was held to
    backend: str = ""
    graph: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Report:
    """Everything `optimize` captured and rewrote. Graphs are numbered in capture order."""

    rewrites: list[Rewrite] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    graphs: int = 0
    verified: bool = True

    def count(self, pattern: str | None = None) -> int:
        """Sites of `pattern` (all patterns when None) with an applied rewrite.

        A site is counted once however often it was captured: dynamo captures the same code again for a
        new shape, dtype or grad mode, and each capture reports its rewrites (see `rewrites[i].graph`)."""
        if pattern is not None:
            families.family(pattern)  # raises for an unknown name, listing the known ones
        return len({key for key, r in self._keyed() if r.status == "applied" and pattern in (None, r.pattern)})

    def _keyed(self) -> list[tuple[tuple, Rewrite]]:
        """(site key, rewrite): the key is the location plus the occurrence number at that location within
        its graph, so a module called twice in one forward is two sites, a re-capture is the same ones."""
        seen: dict[tuple, int] = {}
        keyed = []
        for r in self.rewrites:
            n = seen[(r.graph, r.pattern, r.location)] = seen.get((r.graph, r.pattern, r.location), -1) + 1
            keyed.append(((r.pattern, r.location, n), r))
        return keyed

    def rejected(self, pattern: str | None = None) -> list[Rewrite]:
        return [r for r in self.rewrites if r.status == "rejected" and (pattern is None or r.pattern == pattern)]

    def to_dict(self) -> dict:
        return {
            "graphs": self.graphs,
            "verified": self.verified,
            "applied": self.count(),
            "rejected": len(self.rejected()),
            "rewrites": [r.to_dict() for r in self.rewrites],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        if not self.graphs and not self.rewrites:
            return "\n".join(
                ["fxfuse report: not captured yet (capture, rewrite and verification happen at the first call)"]
                + _wrap_all("note: ", self.notes)
            )
        rejected = len({key for key, r in self._keyed() if r.status == "rejected"})
        head = (
            f"fxfuse report: {self.graphs} graph(s) captured, {self.count()} rewrite(s) applied, "
            f"{rejected} rejected" + ("" if self.verified else " (verification OFF: verify=False)")
        )
        lines = [head]
        if self.rewrites:
            lines += _site_table(self._keyed())
        elif self.graphs:
            searched = " / ".join(sorted(f.title for f in families.FAMILIES.values()))
            lines.append(f"no {searched} sites found")
        lines += _wrap_all("note: ", self.notes)
        return "\n".join(lines)

    __repr__ = __str__


WIDTH = 100  # the report fits a terminal of this many columns

# `module.path (file.py:12 `code`)`, `file.py:12 `code``: see `fxfuse.passes.capture.location`
_LOCATION = re.compile(r"^(?:(?P<path>.*?) \()?(?P<line>[^\s()`]+:\d+) `(?P<code>.*)`\)?$")


def fit(text: str, width: int = WIDTH) -> str:
    """`text` cut to `width` columns, with an ellipsis when cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _wrap_all(first: str, texts: list[str]) -> list[str]:
    indent = " " * len(first)
    return [w for t in texts for w in textwrap.wrap(t, WIDTH, initial_indent=first, subsequent_indent=indent)]


def location_parts(location: str) -> tuple[str, str | None]:
    """`Rewrite.location` -> ("module.path, file.py:12", the source line or None)."""
    m = _LOCATION.match(location)
    if m is None:
        return location, None
    return (f"{m['path']}, {m['line']}" if m["path"] else m["line"]), m["code"]


def _where(location: str) -> list[str]:
    """The site's module path and file:line on one line, the source line on its own."""
    where, code = location_parts(location)
    # no source text (a model defined at the Python prompt): no line of blanks under it
    return [fit(f"  at {where}")] + ([] if not code else [fit(f"      {code}")])


def _figure(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{max(known):.1e}" if known else "-"


def _graph_list(ids: list[int]) -> str:
    """[1, 2, 3, 5, 6] -> "1-3,5,6", at most 10 columns: a site captured for many shapes stays one short cell."""
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    cells = (str(a) if a == b else f"{a},{b}" if b == a + 1 else f"{a}-{b}" for a, b in runs)
    return fit(",".join(cells), 10)


def _site_table(keyed: list[tuple[tuple, Rewrite]]) -> list[str]:
    """One row per site and outcome (a re-capture for a new shape or grad mode lists its graph in the
    same row), then where the site is and, for a rejection, why."""
    groups: dict[tuple, list[Rewrite]] = {}
    for key, r in keyed:
        groups.setdefault((key, r.status, r.variant, r.backend, r.reason), []).append(r)
    rewrites = [r for _, r in keyed]
    cols = ["pattern", "status", "backend", "error"]
    if any(r.original_rel_err is not None for r in rewrites):
        cols.append("original")
    if any(r.tolerance is not None for r in rewrites):
        cols.append("tolerance")
    cols += ["graphs", "variant"]
    rows = []
    for group in groups.values():
        r = group[0]
        cells = {
            "pattern": r.pattern, "status": r.status, "backend": r.backend or "-",
            "error": _figure([g.max_rel_err for g in group]),
            "original": _figure([g.original_rel_err for g in group]),
            "tolerance": _figure([g.tolerance for g in group]),
            "graphs": _graph_list([g.graph for g in group]), "variant": r.variant,
        }  # fmt: skip
        rows.append(([cells[c] for c in cols], r))
    widths = [max(len(c), *(len(cells[i]) for cells, _ in rows)) for i, c in enumerate(cols[:-1])]
    start = sum(widths) + 2 * len(widths)
    variant_width = max(WIDTH - start, 12)
    fmt = lambda cells: "  ".join(v.ljust(w) for v, w in zip(cells, widths))
    lines = [(fmt(cols[:-1]) + "  " + cols[-1]).rstrip()]
    for cells, r in rows:
        variant = textwrap.wrap(cells[-1], variant_width) or [""]
        lines.append((fmt(cells[:-1]) + "  " + variant[0]).rstrip())
        lines += [" " * start + more for more in variant[1:]]
        lines += _where(r.location)
        if r.reason:
            lines += textwrap.wrap(r.reason, WIDTH, initial_indent="  reason: ", subsequent_indent=" " * 10)
    return lines + _legend(cols)


def _legend(cols: list[str]) -> list[str]:
    """What the figures are: per site against float64, and the separate whole-graph check."""
    text = "error: fused site vs the original region run in float64, worst over random inputs"
    if "original" in cols:
        text += "; original: that region's own error vs float64"
    if "tolerance" in cols:
        text += "; applied when error <= max(tolerance, 2 x original)"
    whole = (
        "whole model: each rewritten graph also runs on the real inputs against the graph as captured "
        "(relative 1e-4, fp16/bf16 2e-2); a failure withdraws its rewrites"
    )
    return textwrap.wrap(text, WIDTH) + textwrap.wrap(whole, WIDTH)
