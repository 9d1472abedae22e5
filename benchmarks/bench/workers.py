"""One benchmark run, in a subprocess of its own (one backend per process).

`python benchmarks/compare.py --worker SPEC.json` calls `run(spec_path)`:
it reads the spec the runner wrote, trains, and writes the record next to
it. `quality` trains one method on one task with one seed and learning
rate and evaluates on validation (and on test when the spec says so);
`speed` times AdaLoRA with the callback against Keras LoRA in one process.
"""

import json
import pathlib
import time

from . import data as bench_data
from .protocol import ADALORA_LAYER_METHODS, PEFT_METHODS, PROJECTIONS, TASKS


def count(weights):
    """Number of scalars in a list of weights."""
    total = 0
    for weight in weights:
        size = 1
        for dim in weight.shape:
            size *= int(dim)
        total += size
    return total


def load_data(spec):
    return bench_data.load(
        spec["settings"],
        TASKS[spec["task"]],
        spec["preset"],
        spec["cache_dir"],
        data_dir=spec.get("data_dir"),
    )


def majority_share(labels):
    """The accuracy of always answering the most frequent label.

    >>> majority_share([0, 1, 1, 2])
    0.5
    """
    import numpy as np

    return float(np.bincount(np.asarray(labels)).max() / len(labels))


def classifier(spec, num_classes):
    import keras_hub

    return keras_hub.models.BertTextClassifier.from_preset(
        spec["preset"], num_classes=num_classes, preprocessor=None
    )


def lora_layers(model):
    """The projections Keras's LoRA adapts, by the names it matches."""
    return [
        layer
        for layer in model.backbone._flatten_layers(include_self=False)
        if layer.name in PROJECTIONS and hasattr(layer, "kernel")
    ]


def enable_lora(model, rank):
    """Keras's built-in LoRA on the 36 projections; returns their paths.

    `Backbone.enable_lora` freezes the whole backbone and gives LoRA
    factors to the layers of these names; the head stays trainable. Their
    biases are frozen too: AdaLoRA freezes them, so both methods train
    their adapter factors and the head, nothing else.
    """
    model.backbone.enable_lora(rank, target_layer_names=list(PROJECTIONS))
    layers = [l for l in lora_layers(model) if getattr(l, "lora_enabled", False)]
    for layer in layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.trainable = False
    return sorted(layer.path for layer in layers)


def lora_params_per_rank(model):
    """Parameters Keras's LoRA adds per unit of rank on the 36 projections
    (`A: kernel.shape[:-1] + (r,)`, `B: (r, kernel.shape[-1])`)."""
    total = 0
    for layer in lora_layers(model):
        shape = [int(d) for d in layer.kernel.shape]
        lead = 1
        for dim in shape[:-1]:
            lead *= dim
        total += lead + shape[-1]
    return total


def set_scale(model, rule, target_rank=None):
    """Gives every adapted layer the `alpha` of a scale rule, explicitly,
    so that the records keep their meaning if the library's default moves.

    - `"sqrt"`: `alpha = sqrt(d_in * d_out)`, a scale of
      `sqrt(d_in * d_out) / init_rank` (the library's default before this benchmark);
    - `"rank-free"`: `alpha = init_rank * sqrt(d_in * d_out) / 12`, the
      scale `sqrt(d_in * d_out) / 12` whatever the rank (what `"sqrt"`
      gives at init_rank 12; the library's default now);
    - `"target"`: `alpha = target_rank * sqrt(d_in * d_out) / 12`, the
      `alpha` that `"rank-free"` gives an adapter of the budget's rank, so
      AdaLoRA and the uniform control share one `alpha` and AdaLoRA's
      `init_rank` components start at `target_rank / init_rank` of the
      control's scale (the paper's and PEFT's convention: one `lora_alpha`,
      divided by the initial rank);
    - `"unit"`: `alpha = init_rank`, a scale of 1 on every layer (PEFT's
      `lora_alpha = init_r`);
    - a number: that `alpha` on every layer.
    """
    import math

    import keras_adalora
    from keras_adalora.adapter import REFERENCE_RANK

    kinds = (keras_adalora.AdaLoRADense, keras_adalora.AdaLoRAEinsumDense)
    if rule == "target" and not target_rank:
        raise ValueError("The scale rule 'target' needs the budget's `target_rank`.")
    for layer in model._flatten_layers(include_self=False):
        if not isinstance(layer, kinds):
            continue
        d_in, d_out = layer._adapter_matrix_shape()
        root = math.sqrt(float(d_in) * float(d_out))
        if rule == "sqrt":
            layer.alpha = root
        elif rule == "rank-free":
            layer.alpha = layer.init_rank * root / REFERENCE_RANK
        elif rule == "target":
            layer.alpha = target_rank * root / REFERENCE_RANK
        elif rule == "unit":
            layer.alpha = float(layer.init_rank)
        else:
            layer.alpha = float(rule)


def adapt(model, init_rank, adalora, target_rank=None, seed=0):
    """Swaps every projection of `model` for its AdaLoRA layer at
    `init_rank`, with a variant's `apply_adalora` arguments (`adalora`:
    `scale`, `factors`, `penalty`, `orth_reg_weight`) applied explicitly,
    or the library's defaults as they are (`adalora["defaults"]`); the
    adapted layers. `target_rank`: the budget's average rank (the
    `"target"` scale rule's); `seed`: the run's (the `"normal-S"` factor
    rule's).

    What AdaLoRA and the uniform control share, in the benchmark's runs
    and in `pruning_probe.py`.
    """
    import keras_adalora
    from keras_adalora.targets import adapted_layers

    if adalora.get("defaults"):
        keras_adalora.apply_adalora(model, init_rank=init_rank, target="all")
        return adapted_layers(model)
    # The penalty explicitly: ours (squared norms, summed, 0.1 per layer) or
    # PEFT's (`"peft"`: the norms averaged over the 2n factors, 0.5).
    peft = adalora.get("penalty") == "peft"
    keras_adalora.apply_adalora(
        model,
        init_rank=init_rank,
        target="all",
        orth_reg_weight=adalora.get("orth_reg_weight", 0.5 if peft else 0.1),
        orth_penalty="norm" if peft else "squared",
        factor_init="orthogonal",
    )
    set_scale(model, adalora.get("scale", "sqrt"), target_rank)
    layers = adapted_layers(model)
    set_factors(layers, adalora.get("factors", "orthogonal"), seed)
    return layers


def set_factors(layers, rule, seed):
    """Draws every adapter's `A` and `B` anew by a rule, explicitly:
    `"orthogonal"` keeps what `apply_adalora(factor_init="orthogonal")`
    drew (random orthonormal factors); `"normal-S"` draws each entry from N(0, S) (PEFT's
    `N(0, 0.02)`), from a NumPy generator seeded with `seed`."""
    import numpy as np

    if rule == "orthogonal":
        return
    if not rule.startswith("normal-"):
        raise ValueError(f"Unknown factor rule {rule!r}: use 'orthogonal' or 'normal-STD'.")
    std = float(rule.split("-", 1)[1])
    rng = np.random.default_rng(seed)
    for layer in layers:
        for variable in (layer.adalora_a, layer.adalora_b):
            variable.assign(rng.normal(0.0, std, tuple(variable.shape)).astype("float32"))


def step_timer():
    """A Keras callback recording the wall time between batch starts."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epochs = []
            self._last = None

        def on_epoch_begin(self, epoch, logs=None):
            self.epochs.append([])
            self._last = None

        def on_train_batch_begin(self, batch, logs=None):
            now = time.perf_counter()
            if self._last is not None:
                self.epochs[-1].append(now - self._last)
            self._last = now

        def on_train_batch_end(self, batch, logs=None):
            # Defined so that Keras waits for each step before the next, as
            # it does for RankBudgetCallback (JAX dispatches asynchronously).
            pass

        def on_epoch_end(self, epoch, logs=None):
            if self._last is not None:
                self.epochs[-1].append(time.perf_counter() - self._last)

        def steady(self):
            """Step times without each epoch's first and last step."""
            steady = [t for epoch in self.epochs for t in epoch[1:-1]]
            return steady or [t for epoch in self.epochs for t in epoch[1:]]

    return StepTimer()


def fit_steps(settings, fit_examples):
    """Optimizer steps of one run: `epochs` passes over the fit split.

    >>> fit_steps({"epochs": 4, "batch_size": 16}, 640), fit_steps({"epochs": 1, "batch_size": 8}, 17)
    (160, 3)
    """
    return settings["epochs"] * -(-fit_examples // settings["batch_size"])


def learning_rate_of(peak, schedule, total_steps):
    """The optimizer's learning rate: `peak` throughout (`constant`), or a
    linear warm-up from 0 over `warmup_fraction` of `total_steps` to `peak`
    and a cosine decay to 0 over the rest (`cosine`)."""
    import keras

    name = (schedule or {"name": "constant"})["name"]
    if name == "constant":
        return peak
    if name != "cosine":
        raise ValueError(f"Unknown learning-rate schedule {name!r}: use 'constant' or 'cosine'.")
    warmup = max(1, int(round(schedule["warmup_fraction"] * total_steps)))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(1, total_steps - warmup),
        alpha=0.0,
        warmup_target=peak,
        warmup_steps=warmup,
    )


def compile_model(model, learning_rate, schedule=None, total_steps=None):
    import keras

    model.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate_of(learning_rate, schedule, total_steps)
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def _batches(x, y, batch_size, seed):
    import tensorflow as tf

    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
    )


def quality(spec):
    """Trains `spec["method"]` on one task with one seed and learning rate;
    returns its record (validation, and test if `spec["evaluate_test"]`)."""
    import keras
    import numpy as np

    import keras_adalora
    from keras_adalora.summary import adapter_table

    s = spec["settings"]
    seed, method, rate = spec["seed"], spec["method"], spec["learning_rate"]
    started = time.perf_counter()
    keras.utils.set_random_seed(seed)
    splits = load_data(spec)
    classes = splits["classes"]
    y_test = splits["test"][1]
    record = {
        "task": spec["task"],
        "method": method,
        "budget": spec.get("budget"),
        "seed": seed,
        "learning_rate": rate,
        "variant": spec.get("variant"),
        "classes": classes,
        "majority_accuracy": majority_share(y_test),
        "val_majority_accuracy": majority_share(splits["validation"][1]),
    }
    if method in PEFT_METHODS:
        from . import hf_peft

        record = hf_peft.quality(spec, splits, record)
        record["worker_seconds"] = time.perf_counter() - started
        return record
    model = classifier(spec, len(classes))
    head_params = count(model.get_layer("logits").weights)
    record["head_params"] = head_params
    timer = step_timer()
    callbacks = [timer]
    target = spec.get("target_rank")
    adalora = spec.get("adalora") or {}
    if method in ADALORA_LAYER_METHODS:
        init = spec["init_rank"]
        adapt(model, init, adalora, target, seed)
        record["init_rank"] = init
        if method == "adalora":
            if spec.get("budget_unit") == "parameters":
                # What the uniform control's adapters hold: `target`
                # components of every adapted layer.
                goal = target * sum(
                    d_in + d_out + 1
                    for d_in, d_out in (r["shape"] for r in adapter_table(model))
                )
                record["budget_params"] = goal
                budget = keras_adalora.RankBudgetCallback(
                    target_params=goal, **spec["schedule"]
                )
            else:
                budget = keras_adalora.RankBudgetCallback(
                    target_rank=target, **spec["schedule"]
                )
            callbacks.insert(0, budget)
    elif method == "lora":
        rank = max(1, round(spec["lora_goal_params"] / lora_params_per_rank(model)))
        record["lora_rank"] = rank
        enable_lora(model, rank)
    elif method == "head":
        model.backbone.trainable = False
    record["trainable_params_training"] = count(model.trainable_weights)

    x_fit, y_fit = splits["fit"]
    compile_model(model, rate, s.get("lr_schedule"), fit_steps(s, len(y_fit)))
    fit_started = time.perf_counter()
    history = model.fit(
        _batches(x_fit, y_fit, s["batch_size"], seed),
        epochs=s["epochs"],
        verbose=0,
        callbacks=callbacks,
    )
    record["train_seconds"] = time.perf_counter() - fit_started
    steady = timer.steady()
    record["median_step_seconds"] = float(np.median(steady)) if steady else None
    record["steps"] = sum(len(epoch) for epoch in timer.epochs)
    record["final_train_loss"] = float(history.history["loss"][-1])
    for split in ("validation", "test") if spec["evaluate_test"] else ("validation",):
        x, y = splits[split]
        loss, accuracy = model.evaluate(x, y, batch_size=64, verbose=0)
        prefix = "val" if split == "validation" else "test"
        record[f"{prefix}_loss"] = float(loss)
        record[f"{prefix}_accuracy"] = float(accuracy)

    if method == "adalora":
        record["rank_pattern"] = keras_adalora.get_rank_pattern(model)
        if budget.budget_unit == "components":
            record["budget_components"] = budget.target_budget
        if spec.get("plot"):
            plot = pathlib.Path(spec["plot"])
            keras_adalora.plot_rank_allocation(
                model,
                plot,
                title=f"AdaLoRA ranks, {spec['task']}, budget {spec['budget']}, "
                f"seed {seed} ({keras.backend.backend()}): init "
                f"{spec['init_rank']}, average {target} after pruning",
            )
            record["plot"] = plot.name
        keras_adalora.compact_adalora(model)
    if method in ADALORA_LAYER_METHODS:
        table = adapter_table(model)
        record["adapter_params"] = int(sum(r["params"] for r in table))
        record["trainable_params_final"] = count(model.trainable_weights)
    elif method == "lora":
        record["adapter_params"] = record["trainable_params_training"] - head_params
        record["trainable_params_final"] = record["trainable_params_training"]
    else:
        record["adapter_params"] = 0
        record["trainable_params_final"] = record["trainable_params_training"]
    record["worker_seconds"] = time.perf_counter() - started
    return record


def speed(spec):
    """Step time of AdaLoRA + callback over Keras LoRA at the same initial
    rank, and inference of the merged AdaLoRA model over the base model,
    in this one process; the variants alternate round by round."""
    import keras
    import numpy as np

    import keras_adalora

    s = spec["settings"]
    keras.utils.set_random_seed(0)
    splits = load_data(spec)
    (x_train, y_train), (x_test, _) = splits["fit"], splits["test"]
    classes = splits["classes"]
    steps, rounds, batch = s["speed_steps"], s["speed_rounds"], s["batch_size"]
    n = steps * batch
    reps = -(-n // len(y_train))
    x = {k: np.concatenate([v] * reps)[:n] for k, v in x_train.items()}
    y = np.concatenate([y_train] * reps)[:n]
    x_test = {k: v[: s["speed_predict_examples"]] for k, v in x_test.items()}
    init = spec["init_rank"]

    adalora = classifier(spec, len(classes))
    keras_adalora.apply_adalora(adalora, init_rank=init, target="all")
    lora = classifier(spec, len(classes))
    enable_lora(lora, init)
    for model in (adalora, lora):
        compile_model(model, 1e-3)
    budget = keras_adalora.RankBudgetCallback(
        target_rank=spec["target_rank"],
        total_steps=steps * (rounds + 1),
        **spec["schedule"],
    )
    times = {"adalora": [], "lora": []}
    ratios = []
    for round_index in range(rounds + 1):
        medians = {}
        for name, model in (("adalora", adalora), ("lora", lora)):
            timer = step_timer()
            callbacks = [budget, timer] if name == "adalora" else [timer]
            model.fit(x, y, batch_size=batch, epochs=1, shuffle=False,
                      verbose=0, callbacks=callbacks)
            if round_index:  # round 0 compiles
                times[name].extend(timer.steady())
                medians[name] = float(np.median(timer.steady()))
        if round_index:
            ratios.append(medians["adalora"] / medians["lora"])

    before = adalora.predict(x_test, batch_size=batch, verbose=0)
    keras_adalora.merge_adalora(adalora)
    after = adalora.predict(x_test, batch_size=batch, verbose=0)
    base = classifier(spec, len(classes))
    infer = {"merged": [], "base": []}
    ratios_infer = []
    for round_index in range(3 * rounds + 1):
        seconds = {}
        for name, model in (("merged", adalora), ("base", base)):
            start = time.perf_counter()
            model.predict(x_test, batch_size=batch, verbose=0)
            seconds[name] = time.perf_counter() - start
        if round_index:
            for name in infer:
                infer[name].append(seconds[name])
            ratios_infer.append(seconds["merged"] / seconds["base"])
    batches = -(-len(next(iter(x_test.values()))) // batch)
    return {
        "task": spec["task"],
        "rank": init,
        "adalora_step_ms": 1000 * float(np.median(times["adalora"])),
        "lora_step_ms": 1000 * float(np.median(times["lora"])),
        "step_ratio": float(np.median(ratios)),
        "step_ratio_per_round": ratios,
        "merged_batch_ms": 1000 * float(np.median(infer["merged"])) / batches,
        "base_batch_ms": 1000 * float(np.median(infer["base"])) / batches,
        "inference_ratio": float(np.median(ratios_infer)),
        "inference_ratio_per_round": ratios_infer,
        "merge_max_logit_change": float(np.max(np.abs(after - before))),
        "timed_train_steps_per_model": len(times["adalora"]),
        "predict_examples": int(len(next(iter(x_test.values())))),
    }


def run(spec_path):
    spec = json.loads(pathlib.Path(spec_path).read_text())
    result = quality(spec) if spec["kind"] == "quality" else speed(spec)
    pathlib.Path(spec["result"]).write_text(json.dumps(result, indent=1))
