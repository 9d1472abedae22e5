"""`plot_rank_allocation`: where the rank went, as in the AdaLoRA paper;
`plot_rank_history`: when it went."""

import os

import numpy as np

from keras_adalora.history import rank_history
from keras_adalora.summary import adapter_table
from keras_adalora.summary import block_grid


def _matplotlib(caller):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            f"`{caller}` needs matplotlib. Install it with "
            "`pip install matplotlib` (or `pip install keras-adalora[examples]`)."
        ) from None
    return FigureCanvasAgg, Figure


def _save(figure, path):
    if path is not None:
        folder = os.path.dirname(os.fspath(path))
        if folder:
            os.makedirs(folder, exist_ok=True)
        figure.savefig(path, dpi=150, bbox_inches="tight")

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
    FigureCanvasAgg, Figure = _matplotlib("plot_rank_allocation")
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
    _save(figure, path)
    return figure


def plot_rank_history(model, path=None, title=None):
    """Draws how the budget and every layer's rank fell during training.

    Two panels over optimizer steps (from `rank_history`): above, the
    schedule's budget `b(t)` with the total the layers held; below, one
    step line per adapted layer, its active rank, coloured by role
    (attention, feed-forward, embeddings, other). Needs matplotlib; it draws
    on its own figure and leaves pyplot's state alone.

    Args:
        model: as in `rank_history`.
        path: where to write the PNG (its folder is created if missing);
            `None` writes nothing.
        title: the figure's title; defaults to the model's name.

    Returns:
        The `matplotlib.figure.Figure`.

    Raises:
        ValueError: as `rank_history`.

    Example:

    >>> keras_adalora.plot_rank_history(model, "history.png")  # doctest: +SKIP
    """
    FigureCanvasAgg, Figure = _matplotlib("plot_rank_history")
    history = rank_history(model)
    steps = history["steps"]
    roles = {r["path"]: r["role"] for r in adapter_table(model, "plot_rank_history")}
    figure = Figure(figsize=(7.0, 5.0))
    top, bottom = figure.subplots(
        2, 1, sharex=True, gridspec_kw={"height_ratios": [1, 2]}
    )
    unit = history["budget_unit"]
    top.step(steps, history["budget"], where="post", color="black", label="budget b(t)")
    if unit == "components":
        held = [sum(r[i] for r in history["ranks"].values()) for i in range(len(steps))]
        top.step(steps, held, where="post", color="#2a7f62", linestyle="--",
                 label="components alive")
    top.set_ylabel(unit)
    top.legend(fontsize=8)
    colours = {"attention": "#1f77b4", "ffn": "#d62728", "embeddings": "#9467bd",
               "position_embeddings": "#8c564b"}
    by_layer = len(roles) <= 10 and not any(roles.values())
    shown = set()
    for path_, ranks in history["ranks"].items():
        if by_layer:
            # A few layers without roles: one colour and label each.
            bottom.step(steps, ranks, where="post", label=path_)
            continue
        role = roles.get(path_) or "other"
        bottom.step(steps, ranks, where="post", linewidth=0.9, alpha=0.7,
                    color=colours.get(role, "#7f7f7f"),
                    label=None if role in shown else role)
        shown.add(role)
    bottom.yaxis.get_major_locator().set_params(integer=True)
    bottom.set_ylabel("active rank per layer")
    bottom.set_xlabel("optimizer step")
    bottom.legend(fontsize=8)
    figure.suptitle(title or f"AdaLoRA rank history of '{model.name}'", fontsize=10)
    FigureCanvasAgg(figure)
    _save(figure, path)
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
