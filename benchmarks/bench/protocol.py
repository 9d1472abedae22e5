"""What the benchmark compares, as data: tasks, methods, budgets, grids.

Nothing here imports Keras; the runner and the report read these tables.
"""

TASKS = {"spam": "spam_assassin", "source": "spam_assassin/source", "nouns": "wordnet_nouns"}

# Per method: its label in the report, whether it has a rank budget, and
# the learning rates the validation split chooses from (the three adapter
# methods share one grid). A grid may grow without losing the runs made at
# its earlier rates (`runner.load_results`): full fine-tuning and the head
# chose the top of their first grids (2e-4, 5e-2) on both tasks, so each
# got the next rate up, and the head on spam chose 2e-1 in turn. PEFT's
# AdaLoRA chose 8e-3, the top of the adapters' grid, on source at the budget
# of 8, so the adapter methods got 1.6e-2; it chose that too, and they got
# 3.2e-2. AdaLoRA with PEFT's parametrisation (`peft-init-peft-penalty`)
# chose 3.2e-2 there, and they got 6.4e-2.
ADAPTER_GRID = (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2)
METHODS = {
    "adalora": ("AdaLoRA (`RankBudgetCallback`)", True, ADAPTER_GRID),
    "uniform": ("same AdaLoRA layers, uniform rank, no callback", True, ADAPTER_GRID),
    "uniform-up": ("same AdaLoRA layers, uniform rank one above the budget, no callback",
                   True, ADAPTER_GRID),
    "lora": ("Keras LoRA (`enable_lora`)", True, ADAPTER_GRID),
    "peft-adalora": ("PEFT AdaLoRA (PyTorch, `transformers`)", True, ADAPTER_GRID),
    "peft-lora": ("PEFT LoRA (PyTorch, `transformers`)", True, ADAPTER_GRID),
    "full": ("full fine-tuning", False, (5e-5, 1e-4, 2e-4, 4e-4)),
    "head": ("frozen backbone, trained head", False, (2e-3, 1e-2, 5e-2, 2e-1, 1.0)),
}
METHODS = {
    name: {"label": label, "budgeted": budgeted, "grid": grid}
    for name, (label, budgeted, grid) in METHODS.items()
}

# Budgets as the average final rank per adapted layer; AdaLoRA starts at
# 1.5x it (the paper's b(0) = 1.5 b(T)).
BUDGETS = {"low": 2, "mid": 8}

# The projections `apply_adalora(target="all")` adapts in every block of a
# KerasHub BERT, by layer name (what `Backbone.enable_lora` matches).
PROJECTIONS = (
    "query",
    "key",
    "value",
    "attention_output",
    "feedforward_intermediate_dense",
    "feedforward_output_dense",
)


# The methods whose adapters `apply_adalora` makes (the others: Keras LoRA,
# full fine-tuning, the head).
ADALORA_LAYER_METHODS = ("adalora", "uniform", "uniform-up")

# The peers: Hugging Face PEFT on the same MiniLM in PyTorch, whatever the
# Keras backend of the other runs (`bench/hf_peft.py`).
PEFT_METHODS = ("peft-adalora", "peft-lora")


def init_rank_of(target_rank):
    """AdaLoRA's initial rank for a final average `target_rank`.

    >>> init_rank_of(2), init_rank_of(8)
    (3, 12)
    """
    return int(round(1.5 * target_rank))


def adapter_rank_of(method, target_rank):
    """The rank `apply_adalora` gives a method's adapters at a budget's
    average final rank: AdaLoRA starts at 1.5x it and prunes down to it;
    the uniform control holds it; `uniform-up` holds one more, a control of
    about AdaLoRA's final size in parameters or larger (AdaLoRA ends above
    the uniform control's, giving its components to the larger layers).

    >>> [adapter_rank_of(m, 8) for m in ("adalora", "uniform", "uniform-up")]
    [12, 8, 9]
    """
    if method == "adalora":
        return init_rank_of(target_rank)
    if method == "uniform":
        return target_rank
    if method == "uniform-up":
        return target_rank + 1
    raise ValueError(f"{method!r} makes no `apply_adalora` adapters")


def cells(tasks, methods, budgets):
    """Every `(task, method, budget)` to measure; `budget` is `None` for the
    methods without one (full fine-tuning, the head).

    >>> cells(["spam"], ["adalora", "head"], ["low", "mid"])
    [('spam', 'adalora', 'low'), ('spam', 'adalora', 'mid'), ('spam', 'head', None)]
    """
    out = []
    for task in tasks:
        for method in methods:
            if METHODS[method]["budgeted"]:
                out.extend((task, method, budget) for budget in budgets)
            else:
                out.append((task, method, None))
    return out


def cell_name(task, method, budget):
    """A file-name-safe name of one cell.

    >>> cell_name("spam", "head", None), cell_name("spam", "lora", "low")
    ('spam-head', 'spam-lora-low')
    """
    return "-".join(p for p in (task, method, budget) if p)


# AdaLoRA settings compared on the validation split (`--variants`): each
# sets the adapters' scale rule and other `apply_adalora` arguments
# (`adalora`, given to the uniform control too), the callback's schedule
# (`schedule`, fractions of the run; AdaLoRA only) or its budget's unit
# (`budget`: "parameters" gives AdaLoRA `target_params`, the parameters
# the uniform control's adapters hold; AdaLoRA only). Records keep the
# variant's name, and the rule is applied explicitly (see
# `workers.set_scale`), so they keep their meaning when defaults change;
# only `defaults` takes the library's defaults as they are.
# `control`: the variant of the uniform control with the same adapters
# (itself where it is not said).
VARIANTS = {
    "sqrt": {
        "adalora": {"scale": "sqrt"},
        "doc": "alpha = sqrt(d_in * d_out): scale sqrt(d_in * d_out) / init_rank "
        "(the library's default up to this benchmark)",
    },
    "rank-free": {
        "adalora": {"scale": "rank-free"},
        "doc": "scale sqrt(d_in * d_out) / 12 whatever the rank "
        "(alpha = init_rank * sqrt(d_in * d_out) / 12)",
    },
    "rank-free-long-final": {
        "adalora": {"scale": "rank-free"},
        "schedule": {"tinit": 0.1, "tfinal": 0.5},
        "control": "rank-free",
        "doc": "rank-free, and pruning ends at half the run, so the pruned "
        "adapter trains for the other half",
    },
    "rank-free-late-start": {
        "adalora": {"scale": "rank-free"},
        "schedule": {"tinit": 0.3, "tfinal": 0.7},
        "control": "rank-free",
        "doc": "rank-free, and pruning starts at 30% of the run instead of 10% "
        "(where the learning-rate warm-up ends), so the first masks read scores "
        "of a trained adapter; it ends where the default's does",
    },
    "target-alpha": {
        "adalora": {"scale": "target"},
        "control": "rank-free",
        "doc": "AdaLoRA gets the uniform control's alpha (rank-free at the budget's "
        "rank, alpha = target_rank * sqrt(d_in * d_out) / 12), so its init_rank "
        "components start at target_rank / init_rank of the control's scale and the "
        "two adapters start with the same total scale (the paper's convention: one "
        "lora_alpha divided by the initial rank)",
    },
    "rank-free-no-orth": {
        "adalora": {"scale": "rank-free", "orth_reg_weight": 0.0},
        "control": "rank-free-no-orth",
        "doc": "rank-free, without the orthogonality penalty",
    },
    "peft-init": {
        "adalora": {"scale": "unit", "factors": "normal-0.02"},
        "doc": "PEFT's parametrisation: `A` and `B` drawn from N(0, 0.02) instead of "
        "random orthonormal factors, and a scale of 1 on every layer "
        "(alpha = init_rank); the penalty, scores and schedule unchanged",
    },
    "peft-init-peft-penalty": {
        "adalora": {"scale": "unit", "factors": "normal-0.02", "penalty": "peft"},
        "doc": "peft-init, and PEFT's orthogonality penalty: the unsquared Frobenius "
        "norms averaged over the 2n factors, weight 0.5 (ours: squared, summed, 0.1 "
        "per layer)",
    },
    "rank-free-params": {
        "adalora": {"scale": "rank-free"},
        "budget": "parameters",
        "control": "rank-free",
        "doc": "rank-free, with the budget in parameters: AdaLoRA ends holding "
        "at most the parameters of the uniform control's adapters "
        "(`target_params`), where a budget in components lets it keep more",
    },
    "peft-init-peft-penalty-params": {
        "adalora": {"scale": "unit", "factors": "normal-0.02", "penalty": "peft"},
        "budget": "parameters",
        "control": "peft-init-peft-penalty",
        "doc": "peft-init-peft-penalty, with the budget in parameters (as "
        "rank-free-params)",
    },
    "defaults": {
        "adalora": {"defaults": True},
        "doc": "the library's defaults since 0.2: `apply_adalora(model, "
        "init_rank, target=\"all\")` and nothing else (`A`, `B` from N(0, 0.02), "
        "a scale of 1, PEFT's penalty form and weight); peft-init-peft-penalty "
        "up to the random draws, with the sensitivity taking out the norm "
        "penalty's own gradient (peft-init-peft-penalty's runs took out the "
        "squared form's)",
    },
    "defaults-params": {
        "adalora": {"defaults": True},
        "budget": "parameters",
        "control": "defaults",
        "doc": "defaults, with the budget in parameters (as rank-free-params)",
    },
    "peft-init-no-orth": {
        "adalora": {"scale": "unit", "factors": "normal-0.02", "orth_reg_weight": 0.0},
        "doc": "peft-init without the orthogonality penalty",
    },
}


def variants_for(method, variants):
    """The variants that change `method`: all of them for AdaLoRA; their
    controls (same adapters, no schedule) for the uniform controls; for
    the others none, `["sqrt"]` being a name only.

    >>> variants_for("uniform", ["sqrt", "rank-free-long-final", "rank-free"])
    ['sqrt', 'rank-free']
    >>> variants_for("uniform-up", ["target-alpha"])
    ['rank-free']
    >>> variants_for("lora", ["rank-free"])
    ['sqrt']
    """
    if method == "adalora":
        return list(variants)
    if method not in ADALORA_LAYER_METHODS:
        return ["sqrt"]
    out = []
    for name in variants:
        control = VARIANTS[name].get("control", name)
        if control not in out:
            out.append(control)
    return out


def schedule_of(schedule, variant):
    """The callback's schedule arguments of one run: the settings'
    (`schedule`) with the variant's on top.

    >>> schedule_of({}, "rank-free-late-start")
    {'tinit': 0.3, 'tfinal': 0.7}
    >>> schedule_of({"delta_t": 5}, "rank-free")
    {'delta_t': 5}
    """
    return dict(schedule, **VARIANTS[variant].get("schedule", {}))
