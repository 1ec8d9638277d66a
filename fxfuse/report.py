"""What `optimize` did: one `Rewrite` per candidate site, applied or rejected, with the reason."""

from __future__ import annotations

import dataclasses
import json
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
    backend: str = ""
    graph: int = 0
    original_rel_err: float | None = None  # the original's own error against its float64 run
    tolerance: float | None = None  # the dtype's relative tolerance the site was held to

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
        rejected = len({key for key, r in self._keyed() if r.status == "rejected"})
        head = (
            f"fxfuse report: {self.graphs} graph(s) captured, {self.count()} rewrite(s) applied, "
            f"{rejected} rejected" + ("" if self.verified else " (verification OFF: verify=False)")
        )
        lines = [head]
        if self.rewrites:
            # one row per site and outcome: a re-capture (new shape, grad mode) repeats its rows
            groups: dict[tuple, list[Rewrite]] = {}
            for key, r in self._keyed():
                groups.setdefault((key, r.status, r.variant, r.backend, r.reason), []).append(r)
            cols = ("pattern", "status", "variant", "location", "backend", "max_rel_err", "graphs", "reason")
            rows = []
            for group in groups.values():
                r, errs = group[0], [g.max_rel_err for g in group if g.max_rel_err is not None]
                graphs = ",".join(str(g.graph) for g in group)
                err = f"{max(errs):.1e}" if errs else "-"
                rows.append((r.pattern, r.status, r.variant, r.location, r.backend, err, graphs, r.reason))
            widths = [min(60, max(len(c), *(len(row[i]) for row in rows))) for i, c in enumerate(cols)]
            widths[-1] = max(len(r[-1]) for r in rows)  # the reason is never cut
            fmt = lambda row: "  ".join(str(v)[:w].ljust(w) for v, w in zip(row, widths)).rstrip()
            lines += [fmt(cols), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows]
        elif self.graphs:
            searched = " / ".join(sorted(f.title for f in families.FAMILIES.values()))
            lines.append(f"no {searched} sites found")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __repr__ = __str__
