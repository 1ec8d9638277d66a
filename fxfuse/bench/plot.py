"""Horizontal bar chart of the measured speedups, with the 1.0 line (no change) and the IQR as error bars."""

from __future__ import annotations

from pathlib import Path


def plot_speedups(results: dict, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG of results["cases"] (name, ratio, q1, q3) to `path`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    cases = results["cases"]
    if not cases:
        raise ValueError("no measured cases to plot")
    names = [c["name"] for c in cases]
    ratios = [c["ratio"] for c in cases]
    lower = [max(0.0, c["ratio"] - c.get("q1", c["ratio"])) for c in cases]
    upper = [max(0.0, c.get("q3", c["ratio"]) - c["ratio"]) for c in cases]
    colors = ["tab:green" if r >= 1.0 else "tab:red" for r in ratios]

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(cases) + 1.4))
    y = range(len(cases))
    ax.barh(y, ratios, xerr=[lower, upper], color=colors, alpha=0.8, capsize=3)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()  # registration order top to bottom, like the table
    ax.set_xlabel("speedup (original time / fxfuse time), median of paired runs; bars: IQR")
    for i, r in enumerate(ratios):
        ax.text(r, i, f" {r:.2f}x", va="center", fontsize=8)
    machine = results.get("machine", {})
    ax.set_title(
        title
        or f"fxfuse {results.get('suite', 'cpu')} suite, {machine.get('cpu_count', '?')} CPUs, "
        f"torch {results.get('versions', {}).get('torch', '?')}",
        fontsize=10,
    )
    ax.set_xlim(0, max(ratios + [1.0]) * 1.2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
