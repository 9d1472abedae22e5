"""Step-time overhead of RankBudgetCallback, per Keras backend.

Trains the same small transformer (two KerasHub `TransformerEncoder` blocks,
every projection adapted at init_rank 12) with and without the callback and
prints the ratio of step times, measured in one run. Each backend runs in its
own process; the two variants alternate, round after round, so machine noise
hits both alike, and the reported ratio is the median of the per-round
ratios. Two ratios are printed: of the median step (the steady state: score
updates inside the train step) and of the mean step without each round's
two slowest (which keeps the mask updates every `delta_t` steps but drops
compilation: the first step, and the one retrace when ranks freeze).
Target: ratio <= 1.10.

    python benchmarks/callback_overhead.py
    python benchmarks/callback_overhead.py --backends jax --steps 300
"""

import argparse
import json
import os
import subprocess
import sys
import time


def worker(steps, rounds):
    import keras
    import keras_hub
    import numpy as np

    import keras_adalora

    keras.utils.set_random_seed(0)
    batch, length, hidden = 16, 64, 128
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, length, hidden)).astype("float32")
    y = rng.integers(0, 2, size=(batch * steps,))

    def build():
        inputs = keras.Input((length, hidden))
        h = inputs
        for i in range(2):
            h = keras_hub.layers.TransformerEncoder(
                intermediate_dim=4 * hidden, num_heads=4, name=f"block_{i}"
            )(h)
        outputs = keras.layers.Dense(2, name="head")(h[:, 0])
        model = keras.Model(inputs, outputs)
        keras_adalora.apply_adalora(model, init_rank=12, keep_trainable=["head"])
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_begin(self, batch, logs=None):
            self._start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self._start)

    models = {"plain": build(), "callback": build()}
    ratios = {"median": [], "mean": []}
    step_ms = {"plain": [], "callback": []}
    for round_index in range(rounds + 1):
        times = {}
        for name, model in models.items():
            timer = StepTimer()
            callbacks = [timer]
            if name == "callback":
                # The whole pruning phase falls inside each timed round.
                start = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
                callbacks.insert(
                    0,
                    keras_adalora.RankBudgetCallback(
                        target_rank=4,
                        tinit=start + 5,
                        tfinal=start + steps - 5,
                        delta_t=10,
                        total_steps=start + steps,
                    ),
                )
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=callbacks)
            times[name] = np.sort(np.array(timer.times))
        if round_index == 0:  # compiles
            continue
        for name in models:
            step_ms[name].append(1000 * float(np.median(times[name])))
        ratios["median"].append(
            float(np.median(times["callback"]) / np.median(times["plain"]))
        )
        ratios["mean"].append(
            float(times["callback"][:-2].mean() / times["plain"][:-2].mean())
        )
    return {
        "backend": keras.backend.backend(),
        "plain_ms": float(np.median(step_ms["plain"])),
        "callback_ms": float(np.median(step_ms["callback"])),
        "median_ratio": float(np.median(ratios["median"])),
        "mean_ratio": float(np.median(ratios["mean"])),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    parser.add_argument("--steps", type=int, default=100, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.steps, args.rounds)))
        return
    rows = []
    for backend in args.backends:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        result = subprocess.run(
            [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--rounds", str(args.rounds)],
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            sys.exit(f"{backend} failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(
        f"{'backend':<12}{'plain ms/step':>15}{'callback ms/step':>18}"
        f"{'median ratio':>14}{'mean ratio':>12}"
    )
    for row in rows:
        print(
            f"{row['backend']:<12}{row['plain_ms']:>15.2f}"
            f"{row['callback_ms']:>18.2f}{row['median_ratio']:>14.3f}"
            f"{row['mean_ratio']:>12.3f}"
        )


if __name__ == "__main__":
    main()
