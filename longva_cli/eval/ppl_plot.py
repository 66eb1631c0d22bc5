"""ppl.png: perplexity against context length, one line per model, as the original's plot.

matplotlib is optional (the `niah` extra) and imported only here.
"""

from __future__ import annotations

from pathlib import Path

from longva_cli.errors import LongVAError

FIGURE_INCHES = (10, 5)
INSTALL_HINT = "drawing ppl.png needs matplotlib: `pip install 'longva[niah]'`, then `longva eval ppl plot RUN`."


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def length_label(tokens: int) -> str:
    """Tick labels: 4096 -> 4K, 32000 -> 32K, 1000 -> 1K, 300 -> 300."""
    for unit in (1024, 1000):
        if tokens >= unit and tokens % unit == 0:
            return f"{tokens // unit}K"
    return str(tokens)


def draw_curves(lengths: list[int], rows: dict[str, list[float | None]], path: Path, title: str | None = None) -> Path:
    """Context length across, perplexity up the side, a line per model; gaps where not measured.

    A doubling grid is drawn on a log2 axis, so 4K..256K spread evenly as the grid does.
    """
    if not plotting_available():
        raise LongVAError(INSTALL_HINT)
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=FIGURE_INCHES)
    for model, values in rows.items():
        points = [(length, value) for length, value in zip(lengths, values) if value is not None]
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
    doubling = len(lengths) > 2 and all(b == 2 * a for a, b in zip(lengths, lengths[1:]))
    if doubling:
        axes.set_xscale("log", base=2)
    axes.set_xticks(lengths, [length_label(length) for length in lengths])
    axes.minorticks_off()
    axes.set_xlabel("Context window (tokens)")
    axes.set_ylabel("Perplexity (lower is better)")
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    if title:
        axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
