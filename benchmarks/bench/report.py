"""`RESULTS.md` from `results/<backend>.json`.

The prose lives in two templates next to this file, `report.md` (the
page) and `backend.md` (one section per backend); this module computes the
tables and fills them in. Text between the notes markers of an existing
`RESULTS.md` is kept.
"""

import json
import pathlib
import string

from . import selection
from . import stats
from .protocol import BUDGETS, METHODS, TASKS, VARIANTS, cell_name, cells, init_rank_of

HERE = pathlib.Path(__file__).resolve().parent
BACKENDS = ("jax", "tensorflow", "torch")
NOTES_BEGIN, NOTES_END = "<!-- notes -->", "<!-- /notes -->"
BASELINES = ("uniform", "uniform-up", "peft-adalora", "peft-lora", "lora", "full", "head")


def _template(name):
    return string.Template((HERE / name).read_text())


def _fmt_params(values):
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def _signed(x):
    return f"{x:+.3f}"


def _budget_text(budget):
    return "-" if budget is None else f"{budget} (avg rank {BUDGETS[budget]})"


def _method_text(method, budget, runs):
    if method == "adalora":
        target = BUDGETS[budget]
        return f"AdaLoRA, rank {init_rank_of(target)} → {target} on average"
    if method == "uniform":
        return f"uniform rank {BUDGETS[budget]}, no callback"
    if method == "uniform-up":
        return f"uniform rank {BUDGETS[budget] + 1} (one up), no callback"
    if method == "lora":
        return f"Keras LoRA r={runs[0]['lora_rank']}"
    if method == "peft-adalora":
        target = BUDGETS[budget]
        return f"PEFT AdaLoRA, rank {init_rank_of(target)} → {target} on average"
    if method == "peft-lora":
        return f"PEFT LoRA r={runs[0]['lora_rank']}"
    return METHODS[method]["label"]


def _group(records):
    out = {}
    for r in records:
        out.setdefault((r["task"], r["method"], r.get("budget")), []).append(r)
    return out


def _config(record):
    return (record.get("variant") or "sqrt", record["learning_rate"])


def chosen_configs(data):
    """`{(task, method, budget): (variant, learning rate)}`: the choice the
    runner stored for each cell, or, for results from before it stored
    them, the configuration of the cell's latest test run."""
    out = {}
    for r in data.get("runs", []):
        out[(r["task"], r["method"], r.get("budget"))] = _config(r)
    stored = data.get("choices", {})
    for cell in cells(TASKS, METHODS, BUDGETS):
        if cell_name(*cell) in stored:
            c = stored[cell_name(*cell)]
            out[cell] = (c["variant"], c["learning_rate"])
    return out


def current_runs(data):
    """`(groups, superseded)`: the test runs at each cell's chosen
    configuration, grouped by cell, and those made at an earlier choice
    (kept in the results file, left out of the tables).

    >>> runs = [{"task": "spam", "method": "uniform", "budget": "low", "seed": 0,
    ...          "variant": "rank-free", "learning_rate": rate} for rate in (8e-3, 4e-3)]
    >>> data = {"runs": runs, "choices": {"spam-uniform-low": {
    ...     "variant": "rank-free", "learning_rate": 4e-3}}}
    >>> groups, old = current_runs(data)
    >>> [r["learning_rate"] for r in groups[("spam", "uniform", "low")]], len(old)
    ([0.004], 1)
    """
    chosen = chosen_configs(data)
    kept, superseded = [], []
    for r in data.get("runs", []):
        cell = (r["task"], r["method"], r.get("budget"))
        (kept if chosen.get(cell) == _config(r) else superseded).append(r)
    return _group(kept), superseded


def _superseded_text(superseded):
    if not superseded:
        return ""
    parts = []
    for (task, method, budget), rs in sorted(_group(superseded).items(), key=lambda kv: str(kv[0])):
        for config in sorted({_config(r) for r in rs}):
            n = sum(1 for r in rs if _config(r) == config)
            parts.append(f"{cell_name(task, method, budget)} at {config[1]:g} ({config[0]}), "
                         f"{n} seed{'s' if n != 1 else ''}")
    return ("Test runs made at an earlier choice, before more selection seeds changed it, are "
            "kept in the results file and left out of these tables: " + "; ".join(parts) + ".\n")


def lr_schedule_text(schedule):
    """How the learning rate moves during a run, in words.

    >>> lr_schedule_text(None)
    'the learning rate constant'
    >>> lr_schedule_text({"name": "cosine", "warmup_fraction": 0.1})
    'the learning rate warmed up linearly from 0 over the first 10% of the steps, then decayed to 0 on a cosine'
    """
    if not schedule or schedule["name"] == "constant":
        return "the learning rate constant"
    return ("the learning rate warmed up linearly from 0 over the first "
            f"{schedule['warmup_fraction']:.0%} of the steps, then decayed to 0 on a cosine")


def _protocol(settings):
    test = ("the whole test split (1,209 e-mails)" if settings["test_examples"] is None
            else f"{settings['test_examples']} test e-mails")
    grids = "; ".join(
        f"{m} {', '.join(f'{g:g}' for g in grid)}" for m, grid in settings["grids"].items()
    )
    return (
        f"{settings['fit_examples']} fit and {settings['validation_examples']} "
        "validation e-mails carved from the `train` split (class proportions kept, "
        f"the same e-mails for every seed and method), {test} read once per run "
        f"for the tables; sequence length {settings['sequence_length']}, batch "
        f"{settings['batch_size']}, {settings['epochs']} epochs, "
        f"{settings['optimizer']}, {lr_schedule_text(settings.get('lr_schedule'))}. "
        f"Peak learning rates tried on validation: {grids}. "
        "Seeds change the head and adapter initialisation, the shuffling and "
        "dropout; the seeds of different methods are paired."
    )


def _methods_text():
    return "\n".join([
        "- **AdaLoRA**: `apply_adalora(target=\"all\", init_rank=1.5 x budget)`, "
        "`RankBudgetCallback(target_rank=budget)` with the library's schedule "
        "(or the variant chosen on validation).",
        "- **uniform** (the control that isolates allocation): the same "
        "`apply_adalora` layers at `init_rank=budget`, no callback, so no "
        "scoring and no pruning; its adapter is the budget spread evenly.",
        "- **uniform-up** (the control at equal parameters): the same at "
        "`init_rank=budget + 1`. AdaLoRA's budget counts components and it "
        "gives them to the larger feed-forward layers, so it ends larger than "
        "the uniform control; one rank up, the control is about AdaLoRA's final "
        "size or larger.",
        "- **Keras LoRA**: `backbone.enable_lora(r)` on the same layers, biases "
        "frozen, `r` the rank whose real size is nearest the uniform control's "
        "(111,168 parameters per rank: Keras factors the query/key/value kernels "
        "`(384, 12, 32)` over their first two axes).",
        "- **PEFT AdaLoRA** and **PEFT LoRA** (the peers): Hugging Face PEFT "
        "on `transformers`' BERT read from the same MiniLM checkpoint, in PyTorch, "
        "the same 36 projections and a new classifier trained in full, the same "
        "tokens, batches, steps, AdamW settings and learning-rate schedule; AdaLoRA "
        "with the callback's schedule (`tinit`, `tfinal` and `delta_t` translated "
        "to PEFT's), LoRA at the budget's rank; PEFT's defaults elsewhere "
        "(`lora_alpha` 8, `orth_reg_weight` 0.5). `bench/hf_peft.py`.",
        "- **full fine-tuning**: every weight trains.",
        "- **head**: the backbone frozen, the new head alone trains.",
    ])


def _settings_text(settings):
    return (f"schedule {settings['schedule'] or 'the callback defaults (tinit 0.1, tfinal 0.7, delta_t 10)'}, "
            f"{lr_schedule_text(settings.get('lr_schedule'))}, "
            f"smoke run: {settings['smoke']}.")


def _machine_text(m):
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return (f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {m['os']}; load "
            f"average {m['load_average_at_start']} at the start (shared machine). {versions}.")


def _main_rows(groups):
    rows = []
    for (task, method, budget), rs in sorted(
        groups.items(),
        key=lambda kv: (list(TASKS).index(kv[0][0]), str(kv[0][2]),
                        list(METHODS).index(kv[0][1])),
    ):
        rs = sorted(rs, key=lambda r: r["seed"])
        acc = [r["test_accuracy"] for r in rs]
        mean, std = stats.mean_std(acc)
        steps = [r["median_step_seconds"] for r in rs if r["median_step_seconds"]]
        rows.append(
            f"| {task} | {_budget_text(budget)} | {_method_text(method, budget, rs)} | "
            f"{rs[0]['learning_rate']:g} ({rs[0].get('variant') or 'sqrt'}) | "
            f"{_fmt_params([r['trainable_params_final'] for r in rs])} | "
            f"{mean:.3f} ± {std:.3f} ({len(rs)}) | "
            f"{', '.join(f'{a:.3f}' for a in acc)} | "
            f"{max(r['peak_rss_mb'] for r in rs):,.0f} | "
            f"{(sum(steps) / len(steps)) if steps else float('nan'):.2f} |"
        )
    return rows


def paired_rows(groups, metric="test_accuracy"):
    """`(rows, differences)`: AdaLoRA minus each baseline per task and
    budget, paired by seed."""
    rows, diffs = [], []
    for (task, method, budget), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if method != "adalora":
            continue
        ours = {r["seed"]: r[metric] for r in rs}
        for baseline in BASELINES:
            key = (task, baseline, budget if METHODS[baseline]["budgeted"] else None)
            if key not in groups:
                continue
            theirs = {r["seed"]: r[metric] for r in groups[key]}
            d = stats.paired_difference(ours, theirs)
            if not d["n"]:
                continue
            interval = "-" if d["low"] is None else f"[{_signed(d['low'])}, {_signed(d['high'])}]"
            reading = {"higher": "**higher**", "lower": "**lower**", "tie": "tie",
                       None: "one pair: no interval"}[d["verdict"]]
            rows.append(f"| {task} | {_budget_text(budget)} | {baseline} | {d['n']} | "
                        f"{_signed(d['mean'])} | {interval} | {reading} |")
            diffs.append(dict(d, task=task, budget=budget, baseline=baseline))
    return rows, diffs


def _missing(data, groups):
    """Cells of the full protocol with fewer than the seeds asked for."""
    seeds = max([len(rs) for rs in groups.values()] + [5])
    lines = []
    for task, method, budget in cells(TASKS, METHODS, BUDGETS):
        n = len(groups.get((task, method, budget), []))
        if n < seeds:
            command = (f"python benchmarks/compare.py --backend {data['backend']} "
                       f"--tasks {task} --methods {method}"
                       + (f" --budgets {budget}" if budget else "") + f" --seeds {seeds}")
            lines.append(f"- **Not measured**: {cell_name(task, method, budget)} "
                         f"({n} of {seeds} seeds): `{command}`")
    if not lines:
        return ""
    return "### Not measured yet\n\n" + "\n".join(lines) + "\n"


def _selection_rows(data):
    chosen = chosen_configs(data)
    cand = {}
    for r in data.get("selection", []):
        key = (r["task"], r["method"], r.get("budget"), r.get("variant") or "sqrt",
               r["learning_rate"])
        cand.setdefault(key, []).append(r)
    rows = []
    for key in sorted(cand, key=lambda k: (k[0], str(k[2]), list(METHODS).index(k[1]),
                                           k[3], k[4])):
        task, method, budget, variant, rate = key
        rs = sorted(cand[key], key=lambda r: r["seed"])
        acc = stats.mean_std([r["val_accuracy"] for r in rs])[0]
        loss = stats.mean_std([r["val_loss"] for r in rs])[0]
        fell = [r["seed"] for r in rs if "val_majority_accuracy" in r and selection.collapsed(r)]
        bold = chosen.get((task, method, budget)) == (variant, rate)
        b = "**" if bold else ""
        rows.append(f"| {task} | {_budget_text(budget)} | {method} | {variant} | "
                    f"{b}{rate:g}{b} | {len(rs)} | {b}{acc:.3f}{b} | "
                    f"{min(r['val_accuracy'] for r in rs):.3f} | {loss:.3f} | "
                    f"{'seed ' + ', '.join(map(str, fell)) if fell else '-'} |")
    return rows


def _variants(data):
    used = sorted({r.get("variant") or "sqrt" for r in data.get("selection", [])})
    if not used:
        return ""
    lines = ["Variants (AdaLoRA; the uniform control takes their `apply_adalora` arguments):", ""]
    lines += [f"- `{v}`: {VARIANTS[v]['doc']}" for v in used if v in VARIANTS]
    return "\n".join(lines) + "\n"


def _speed(data):
    sp = data.get("speed")
    if not sp:
        return ""
    return (
        "### Speed, in one process\n\n"
        f"AdaLoRA rank {sp['rank']} with `RankBudgetCallback` over Keras LoRA at the "
        f"same rank, median training step: {sp['adalora_step_ms']:.0f} ms against "
        f"{sp['lora_step_ms']:.0f} ms, ratio **{sp['step_ratio']:.2f}** (per round "
        f"{', '.join(f'{r:.2f}' for r in sp['step_ratio_per_round'])}; target ≤ 1.15). "
        f"Merged AdaLoRA over the untouched base, `predict` on "
        f"{sp['predict_examples']} e-mails: {sp['merged_batch_ms']:.1f} ms against "
        f"{sp['base_batch_ms']:.1f} ms per batch, ratio **{sp['inference_ratio']:.2f}** "
        f"(target 1.00); largest logit change from merging "
        f"{sp['merge_max_logit_change']:.1e}.\n"
    )


def _plots(data, runs):
    names = sorted({r["plot"] for r in runs if r.get("plot")})
    if not names:
        return ""
    folder = data.get("archived", {}).get("plots", "plots")
    links = ", ".join(f"[{n[:-4]}]({folder}/{n})" for n in names)
    return f"Where AdaLoRA's rank went, per seed (`plot_rank_allocation`): {links}.\n"


def _grids_added_text(added):
    """What a command added to the learning-rate grids, for its line.

    >>> _grids_added_text({"full": [0.0004], "head": [0.2]})
    '; learning rates added to the grids: full 0.0004, head 0.2'
    >>> _grids_added_text(None)
    ''
    """
    if not added:
        return ""
    return "; learning rates added to the grids: " + ", ".join(
        f"{m} {', '.join(f'{r:g}' for r in rates)}" for m, rates in added.items())


def backend_section(data):
    """One backend's section; an archived results file (its `archived`
    entry says why and where its plots went) gets its own heading, its
    protocol and no list of cells still to run."""
    groups, superseded = current_runs(data)
    archived = data.get("archived")
    rows, _ = paired_rows(groups)
    commands = "\n".join(
        f"- `{c['command']}` ({c['date']}"
        + (f", {c['wall_seconds'] / 60:.1f} min" if c.get("wall_seconds") else "")
        + _grids_added_text(c.get("grids_added")) + ")"
        for c in data["commands"]
    )
    seeds = sorted({r["seed"] for rs in groups.values() for r in rs})
    majority = ", ".join(
        f"{task} {rs[0]['majority_accuracy']:.3f}"
        for task in TASKS
        for rs in [[r for r in data.get("runs", []) if r["task"] == task]] if rs
    ) or "-"
    heading = data["backend"]
    if archived:
        heading = (f"{data['backend']}, archived: {archived['title']}\n\n"
                   f"{archived['reason']} Protocol: {_protocol(data['settings'])}")
    return _template("backend.md").substitute(
        backend=heading,
        smoke=("**SMOKE RUN: tiny settings, its numbers mean nothing.**\n\n"
               if data["settings"]["smoke"] else ""),
        plots=_plots(data, [r for rs in groups.values() for r in rs])
        + _superseded_text(superseded),
        commands=commands or "- none yet",
        machine=_machine_text(data["machine"]) if "machine" in data else "-",
        settings=_settings_text(data["settings"]),
        seeds_text=f"seeds {', '.join(map(str, seeds))}" if seeds else "no seeds yet",
        main_rows="\n".join(_main_rows(groups)) or "| - | | | | | | | | |",
        majority=majority,
        paired_rows="\n".join(rows) or "| - | | | | | | |",
        missing="" if archived else _missing(data, groups),
        selection_rows="\n".join(_selection_rows(data)) or "| - | | | | | | | | | |",
        variants=_variants(data),
        speed=_speed(data),
    )


def _missing_backends(datas):
    have = {d["backend"] for d in datas}
    lines = [f"- **{b}**: nothing yet: `python benchmarks/compare.py --backend {b}`"
             for b in BACKENDS if b not in have]
    return ("## Backends not measured\n\n" + "\n".join(lines) + "\n") if lines else ""


def write(out):
    """Regenerates `<out>/RESULTS.md` from `<out>/results/<backend>.json`
    and, after them, the archived `<out>/results/archive/*.json`."""
    out = pathlib.Path(out)
    page = out / "RESULTS.md"
    notes = ""
    if page.exists():
        text = page.read_text()
        if NOTES_BEGIN in text and NOTES_END in text:
            notes = text[text.index(NOTES_BEGIN) + len(NOTES_BEGIN):text.index(NOTES_END)]
    datas = [json.loads((out / "results" / f"{b}.json").read_text())
             for b in BACKENDS if (out / "results" / f"{b}.json").exists()]
    archives = [json.loads(path.read_text())
                for path in sorted((out / "results" / "archive").glob("*.json"))]
    settings = datas[0]["settings"] if datas else None
    text = _template("report.md").substitute(
        protocol=_protocol(settings) if settings else "no runs yet.",
        methods=_methods_text(),
        backends="\n".join(backend_section(d) for d in datas) + _missing_backends(datas)
        + "".join("\n" + backend_section(d) for d in archives),
        notes_begin=NOTES_BEGIN,
        notes=notes.strip(),
        notes_end=NOTES_END,
    )
    page.write_text(text)
