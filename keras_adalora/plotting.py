"""`plot_rank_allocation`: where the rank went, as in the AdaLoRA paper."""

import os

import numpy as np

from keras_adalora.summary import adapter_table
from keras_adalora.summary import block_grid

def plot_rank_allocation(model, path=None, title=None):
    """Draws the active rank of every adapted layer, to a PNG.

    For a transformer, a heatmap as in the AdaLoRA paper: one column per
    block, one row per projection kind (query, key, value, attention
    output, feed-forward), each cell the layer's final rank; adapted layers
    outside the blocks are listed below it. For other models, one bar per
    layer (active rank over initial rank). Needs matplotlib
    (`pip install matplotlib`, or the `examples` extra); it draws on its own
    figure and leaves pyplot's state alone.

    Args:
        model: a model adapted with `apply_adalora` (trained or not).
        path: where to write the PNG (its folder is created if missing);
            `None` writes nothing.
        title: the figure's title; defaults to the model's name and its
            total rank.

    Returns:
        The `matplotlib.figure.Figure`.

    Example:

    >>> import os, tempfile
    >>> model = keras.Sequential([
    ...     keras.Input((8,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    >>> model = apply_adalora(model, init_rank=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "ranks.png")
    >>> figure = keras_adalora.plot_rank_allocation(model, path)
    >>> os.path.getsize(path) > 0
    True
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "`plot_rank_allocation` needs matplotlib. Install it with "
            "`pip install matplotlib` (or `pip install keras-adalora[examples]`)."
        ) from None
    records = adapter_table(model, caller="plot_rank_allocation")
    by_path = {r["path"]: r for r in records}
    alive = sum(r["active_rank"] for r in records)
    initial = sum(r["init_rank"] for r in records)
    if title is None:
        title = (
            f"AdaLoRA ranks of '{model.name}': {alive} of {initial} "
            f"components in {len(records)} layers"
        )
    grid = block_grid(list(by_path))
    if grid is None:
        figure = _bars(Figure, records)
    else:
        figure = _heatmap(Figure, by_path, grid)
    figure.suptitle(title, fontsize=10)
    FigureCanvasAgg(figure)
    if path is not None:
        folder = os.path.dirname(os.fspath(path))
        if folder:
            os.makedirs(folder, exist_ok=True)
        figure.savefig(path, dpi=150, bbox_inches="tight")
    return figure


def _heatmap(Figure, by_path, grid):
    blocks, kinds, cells, others = grid
    ranks = np.full((len(kinds), len(blocks)), np.nan)
    top = 1
    for path, (column, row) in cells.items():
        ranks[row, column] = by_path[path]["active_rank"]
        top = max(top, by_path[path]["init_rank"])
    figure = Figure(figsize=(1.0 + 0.55 * len(blocks) + 1.5, 1.2 + 0.45 * len(kinds)))
    axes = figure.add_subplot()
    image = axes.imshow(
        np.ma.masked_invalid(ranks), cmap="YlGn", vmin=0, vmax=top, aspect="auto"
    )
    for row in range(len(kinds)):
        for column in range(len(blocks)):
            value = ranks[row, column]
            if not np.isnan(value):
                axes.text(
                    column,
                    row,
                    f"{int(value)}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if value > 0.6 * top else "black",
                )
    axes.set_xticks(range(len(blocks)), [str(b) for b in blocks])
    axes.set_yticks(range(len(kinds)), kinds)
    axes.set_xlabel("transformer block")
    step = max(1, top // 8)
    figure.colorbar(
        image,
        ax=axes,
        label="active rank",
        fraction=0.04,
        ticks=range(0, top + 1, step),
    )
    if others:
        listed = ", ".join(
            f"{p} {by_path[p]['active_rank']}/{by_path[p]['init_rank']}"
            for p in others[:6]
        )
        more = f", and {len(others) - 6} more" if len(others) > 6 else ""
        axes.set_title(f"outside the blocks: {listed}{more}", fontsize=7)
    return figure


def _bars(Figure, records):
    figure = Figure(figsize=(6.0, 1.0 + 0.3 * len(records)))
    axes = figure.add_subplot()
    positions = np.arange(len(records))
    axes.barh(
        positions,
        [r["init_rank"] for r in records],
        color="#dddddd",
        label="initial rank",
    )
    axes.barh(
        positions,
        [r["active_rank"] for r in records],
        color="#2a7f62",
        label="active rank",
    )
    axes.set_yticks(positions, [r["path"] for r in records], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("rank-1 components")
    axes.legend(loc="lower right", fontsize=8)
    return figure
