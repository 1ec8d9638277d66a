"""Horizontal bar chart of the measured speedups, with the 1.0 line (no change) and the IQR as error bars."""

from __future__ import annotations

from pathlib import Path


def plot_speedups(results: dict, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG of results["cases"] (name, ratio, q1, q3) to `path`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt
    import matplotlib.ticker

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
    # Bars grow from 1.0 (no change) to the ratio: right for speedups, left for slowdowns.
    ax.barh(y, [r - 1.0 for r in ratios], left=1.0, color=colors, alpha=0.8)
    ax.errorbar(ratios, list(y), xerr=[lower, upper], fmt="none", ecolor="black", capsize=3, linewidth=1)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()  # registration order top to bottom, like the table
    # Ratios span 0.3x to 50x: on a log axis a 2x gain and a 2x loss look the same size.
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("speedup = original time / fxfuse time (median of pairs; whiskers: IQR)")
    for i, (r, up) in enumerate(zip(ratios, upper, strict=True)):
        ax.text(max(r + up, 1.0) * 1.05, i, f"{r:.2f}x", va="center", fontsize=8)
    machine = results.get("machine", {})
    ax.set_title(
        title
        or f"fxfuse {results.get('suite', 'cpu')} suite: {machine.get('cpu_count', '?')} CPUs, "
        f"{machine.get('torch_threads', '?')} torch thread(s), torch {results.get('versions', {}).get('torch', '?')}",
        fontsize=10,
    )
    ax.set_xlim(min(ratios + [1.0]) / 1.5, max(r + u for r, u in zip(ratios, upper, strict=True)) * 2.5)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
