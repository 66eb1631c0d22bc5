"""The V-NIAH heatmap as the paper draws it: frames across, depth down, red -> yellow -> green.

matplotlib and seaborn are optional (`pip install 'longva[niah]'`) and imported only here.
"""

from __future__ import annotations

from pathlib import Path

from longva_cli.errors import LongVAError
from longva_cli.niah.settings import size_label

COLOURS = ["#F0496E", "#EBB839", "#9ad5b3"]  # score 0 -> 0.5 -> 1
FIGURE_INCHES = (17.5, 8)
X_TITLES = {"Num. Frame": "Number of frames", "Context Length": "Context length (tokens)"}
INSTALL_HINT = "drawing the heatmap needs matplotlib and seaborn: `pip install 'longva[niah]'`, then `longva niah plot FOLDER`."


def plotting_available() -> bool:
    try:
        import matplotlib  # noqa: F401
        import seaborn  # noqa: F401
    except ImportError:
        return False
    return True


def draw_heatmap(rows: list[dict], path: Path, title: str | None = None) -> Path:
    """all_accuracies.json rows -> a PNG heatmap at `path` (17.5 x 8 inches)."""
    if not plotting_available():
        raise LongVAError(INSTALL_HINT)
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt
    import numpy as np
    import seaborn as sns
    from matplotlib.colors import LinearSegmentedColormap

    size_key, depth_key = list(rows[0])[:2]
    sizes = sorted({row[size_key] for row in rows})
    depths = sorted({row[depth_key] for row in rows})
    scores = np.full((len(depths), len(sizes)), np.nan)  # [depth, size]; missing cells stay blank
    for row in rows:
        scores[depths.index(row[depth_key]), sizes.index(row[size_key])] = row["Score"]

    figure, axes = plt.subplots(figsize=FIGURE_INCHES)
    sns.heatmap(
        scores,
        ax=axes,
        vmin=0,
        vmax=1,
        cmap=LinearSegmentedColormap.from_list("niah", COLOURS),
        linewidths=1.5,
        linecolor="white",
        cbar_kws={"label": "Score"},
        xticklabels=[size_label(size) for size in sizes],
        yticklabels=[f"{depth:g}" for depth in depths],
    )
    axes.set_xlabel(X_TITLES.get(size_key, size_key))
    axes.set_ylabel("Depth Percent")
    axes.tick_params(axis="y", rotation=0)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
