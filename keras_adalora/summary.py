"""`summary`: a table of where a model's rank budget went."""

import math
import re

from keras_adalora.allocator import component_cost
from keras_adalora.targets import model_path
from keras_adalora.targets import layer_roles
from keras_adalora.targets import require_adapted_layers

# Roles in the order `summary` reports them.
_ROLES = ("embeddings", "position_embeddings", "attention", "ffn")

# The projections of a transformer block in the order data flows through
# them (query, key, value, attention output, then the feed-forward layers):
# the order of `summary`'s rows and of the heatmap's; names not listed keep
# their model order.
_KIND_ORDER = (
    r"(^|_)(query|q)(_|$)|q_proj",
    r"(^|_)(key|k)(_|$)|k_proj",
    r"(^|_)(value|v)(_|$)|v_proj",
    r"attention_output|attn_output|o_proj|out_proj",
    r"gate|gating|intermediate|up_proj|fc1|(^|_)wi(_|$)",
    r"feedforward_output|ffw_linear|down_proj|fc2|(^|_)wo(_|$)|output",
)
_BLOCK = re.compile(r"(.*?)_?(\d+)")


def _kind_rank(kind):
    last = kind.split("/")[-1]
    for i, pattern in enumerate(_KIND_ORDER):
        if re.search(pattern, last):
            return i
    return len(_KIND_ORDER)


def block_grid(paths):
    """Splits layer paths into (transformer block, projection kind).

    The block is the path component `<name>_<number>` (such as
    `transformer_layer_3`, `decoder_block_3`) at the position and with the
    name where the numbers vary most across `paths`; the kind is what
    follows it in the path, shortened to its last component when that is
    unambiguous.

    Args:
        paths: layer paths.

    Returns:
        `(blocks, kinds, cells, others)`: the sorted block numbers, the kind
        labels in data-flow order, a dict `{path: (block index, kind index)}`
        and the paths outside any block. `None` when no component numbers
        two or more blocks (a model without repeated blocks).
    """
    numbered = {}
    for path in paths:
        parts = path.split("/")
        for i, part in enumerate(parts[:-1]):
            match = _BLOCK.fullmatch(part)
            if match:
                key = (i, match.group(1))
                numbered.setdefault(key, set()).add(int(match.group(2)))
    if not numbered:
        return None
    key, numbers = max(numbered.items(), key=lambda item: (len(item[1]), item[0][0]))
    if len(numbers) < 2:
        return None
    position, prefix = key
    located, others = {}, []
    for path in paths:
        parts = path.split("/")
        match = (
            _BLOCK.fullmatch(parts[position])
            if len(parts) > position + 1
            else None
        )
        if match and match.group(1) == prefix:
            located[path] = (int(match.group(2)), "/".join(parts[position + 1 :]))
        else:
            others.append(path)
    kinds = []
    for _, kind in located.values():
        if kind not in kinds:
            kinds.append(kind)
    kinds.sort(key=_kind_rank)  # stable: unknown kinds keep model order
    short = [kind.split("/")[-1] for kind in kinds]
    labels = short if len(set(short)) == len(short) else kinds
    blocks = sorted(numbers)
    cells = {
        path: (blocks.index(block), kinds.index(kind))
        for path, (block, kind) in located.items()
    }
    return blocks, labels, cells, others


def adapter_table(model, caller="summary"):
    """One record per adapted layer of `model`.

    Layers of transformer blocks come block by block, each block's
    projections in data-flow order (see `block_grid`), then the others in
    model order.

    Each record is a dict with `path`, `kind` (the class adapted: `Dense`,
    `EinsumDense`, `Embedding`, `PositionEmbedding`, ...), `shape` (`(d_in, d_out)`, the
    kernel read as a matrix), `init_rank`, `stored_rank` (components the
    adapter holds: `init_rank`, or fewer once compacted), `active_rank`,
    `params` (parameters of the alive components: `active_rank *
    (d_in + d_out + 1)`, what a compacted adapter stores) and `role` (the
    named target the layer belongs to: `"embeddings"`,
    `"position_embeddings"`, `"attention"`, `"ffn"`, or None).
    """
    records = []
    roles = layer_roles(model)
    for layer in require_adapted_layers(model, caller):
        d_in, d_out = layer._adapter_matrix_shape()
        active = layer.active_rank
        records.append(
            {
                "path": model_path(model, layer),
                "kind": layer.wrapped_class.__name__,
                "shape": (int(d_in), int(d_out)),
                "init_rank": layer.init_rank,
                "stored_rank": layer.adapter_rank,
                "active_rank": active,
                "params": active * component_cost(layer),
                "role": roles.get(id(layer)),
            }
        )
    grid = block_grid([r["path"] for r in records])
    if grid is not None:
        cells = grid[2]
        last = (len(grid[0]), 0)
        records.sort(key=lambda r: cells.get(r["path"], last))
    return records


def _resolve_budget(budget):
    """`budget` as `(number, unit)`, the unit `"components"` or
    `"parameters"` (or `(None, None)`)."""
    if budget is None:
        return None, None
    target = getattr(budget, "target_budget", budget)
    if target is None:
        raise ValueError(
            "`budget` is a RankBudgetCallback that has not been used with a "
            "model yet, so its budget is unknown. Pass it after "
            "`model.fit(..., callbacks=[callback])`, or pass the budget as "
            "an integer number of components."
        )
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValueError(
            "`budget` must be None, a number of rank-1 components (int >= 0), "
            "or the RankBudgetCallback / RankAllocator that trained the "
            f"model. Received: budget={budget!r}"
        )
    return target, getattr(budget, "budget_unit", "components")


def summary(model, budget=None, print_fn=None):
    """Prints every adapted layer's ranks and adapter size, with totals.

    One row per adapted layer: its path, kind, kernel shape as a matrix,
    initial rank, active rank (alive components) and the parameters of its
    alive components (`active_rank * (d_in + d_out + 1)`, what the layer
    holds after `compact_adalora`). The totals compare the alive components
    with `budget` and count the model's trainable and frozen parameters; a
    last line splits the rank between token embeddings, attention and
    feed-forward layers when the model has them (see `apply_adalora`'s
    named targets).

    Args:
        model: a model adapted with `apply_adalora`.
        budget: the final budget to compare with: the `RankBudgetCallback`
            (or `RankAllocator`) that trained the model (its budget in
            components or, with `target_params`, in parameters), or a
            number of components. `None` prints the totals alone.
        print_fn: function that takes one line of text; defaults to `print`.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((8,)),
    ...     keras.layers.Dense(16, name="hidden"),
    ...     keras.layers.Dense(4, name="out"),
    ... ], name="mlp")
    >>> model = apply_adalora(model, init_rank=4)
    >>> _ = model.get_layer("out").rank_mask.assign([1.0, 1.0, 0.0, 0.0])
    >>> keras_adalora.summary(model, budget=6)
    AdaLoRA layers of model 'mlp'
    Layer   Kind   Matrix  Init rank  Rank  Parameters
    ------  -----  ------  ---------  ----  ----------
    hidden  Dense  8 x 16          4     4         100
    out     Dense  16 x 4          4     2          42
    ------  -----  ------  ---------  ----  ----------
    Total                          8     6         142
    Budget: 6 components, reached.
    Parameters: 184 trainable (the adapters store 184), 220 frozen.
    """
    print_fn = print if print_fn is None else print_fn
    budget, unit = _resolve_budget(budget)
    records = adapter_table(model)
    header = ("Layer", "Kind", "Matrix", "Init rank", "Rank", "Parameters")
    rows = [
        (
            r["path"],
            r["kind"],
            f"{r['shape'][0]} x {r['shape'][1]}",
            str(r["init_rank"]),
            str(r["active_rank"]),
            f"{r['params']:,}",
        )
        for r in records
    ]
    alive = sum(r["active_rank"] for r in records)
    total = (
        "Total",
        "",
        "",
        str(sum(r["init_rank"] for r in records)),
        str(alive),
        f"{sum(r['params'] for r in records):,}",
    )
    widths = [
        max(len(row[i]) for row in [header, total] + rows)
        for i in range(len(header))
    ]
    numeric = (False, False, False, True, True, True)

    def line(row):
        cells = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, numeric)
        ]
        return "  ".join(cells).rstrip()

    rule = line(tuple("-" * width for width in widths))
    print_fn(f"AdaLoRA layers of model '{model.name}'")
    print_fn(line(header))
    print_fn(rule)
    for row in rows:
        print_fn(line(row))
    print_fn(rule)
    print_fn(line(total))
    if unit == "parameters":
        spent = sum(r["params"] for r in records)
        if spent > budget:
            verdict = (
                f"{spent - budget:,} parameters above it (pruning has not "
                "reached tfinal yet)"
            )
        else:
            verdict = f"{spent:,} alive, {budget - spent:,} unused"
        print_fn(f"Budget: {budget:,} parameters, {verdict}.")
    elif budget is not None:
        if alive == budget:
            verdict = "reached"
        elif alive > budget:
            verdict = (
                f"{alive - budget} components above it (pruning has not "
                "reached tfinal yet)"
            )
        else:
            verdict = (
                f"{budget - alive} components below it (min/max_rank or "
                "layers too small to hold it)"
            )
        print_fn(f"Budget: {budget} components, {verdict}.")
    trainable = _count(model.trainable_weights)
    frozen = _count(model.non_trainable_weights)
    stored = sum(
        r["stored_rank"] * (r["shape"][0] + r["shape"][1] + 1) for r in records
    )
    print_fn(
        f"Parameters: {trainable:,} trainable (the adapters store "
        f"{stored:,}), {frozen:,} frozen."
    )
    by_role = [(role, [r for r in records if r["role"] == role]) for role in _ROLES]
    by_role = [(role, rs) for role, rs in by_role if rs]
    if by_role:
        shares = ", ".join(
            f"{role} {sum(r['active_rank'] for r in rs)} of "
            f"{sum(r['init_rank'] for r in rs)} ({len(rs)} "
            f"{'layer' if len(rs) == 1 else 'layers'})"
            for role, rs in by_role
        )
        print_fn(f"Rank by role: {shares}.")


def _count(weights):
    return sum(math.prod(int(dim) for dim in w.shape) for w in weights)
