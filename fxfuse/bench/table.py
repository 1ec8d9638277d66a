"""Text tables for the terminal and Markdown tables for committed results: first column left, rest right."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(head: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool = False) -> str:
    """Aligned columns; with `markdown`, a GitHub table (right-aligned number columns)."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |" if markdown else "  ".join(padded).rstrip()

    if markdown:
        rule = "|" + "|".join(("-" * (w + 1) + ("-" if i == 0 else ":")) for i, w in enumerate(widths)) + "|"
    else:
        rule = line(["-" * w for w in widths])
    return "\n".join([line(head), rule] + [line(r) for r in rows])
