"""keras-adalora example: AdaLoRA on a plain Keras functional model, images.

Runs offline in well under a minute on a laptop CPU:

1. "pretrains" a small MLP on the handwritten digits 0-4 (scikit-learn's
   bundled 8x8 digits, 1,797 real images, no download);
2. adapts it to all ten digits: a fresh 10-way head stays fully trainable,
   every hidden Dense layer gets a frozen kernel and an AdaLoRA adapter of
   rank 8;
3. fine-tunes with `model.fit` and `RankBudgetCallback`, which prunes the
   adapters to an average rank of 4 (the progress log shows
   `adalora_budget` and `adalora_rank`), and prints accuracy before and
   after and where the rank went;
4. saves the adapted model, compacts the adapters to their alive
   components, merges them into plain Dense kernels for deployment and
   checks the merged model computes the same predictions.

    python examples/digits_mlp.py                 # JAX backend by default
    python examples/digits_mlp.py --backend torch
"""

import argparse
import math
import os
import pathlib
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend",
        choices=["jax", "tensorflow", "torch"],
        default=os.environ.get("KERAS_BACKEND", "jax"),
        help="Keras backend (default: $KERAS_BACKEND, else jax).",
    )
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs")
    parser.add_argument("--init-rank", type=int, default=8, help="starting rank per layer")
    parser.add_argument("--target-rank", type=int, default=4, help="average final rank per layer")
    parser.add_argument("--out", default="digits_out", help="output folder")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny settings, for CI"
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Keras reads the backend once, at import.
    os.environ["KERAS_BACKEND"] = args.backend
    import keras
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import keras_adalora

    keras.utils.set_random_seed(0)
    epochs = 2 if args.smoke else args.epochs
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )

    # 1. A "pretrained" model: an MLP that has only ever seen digits 0-4.
    inputs = keras.Input((64,), name="pixels")
    h = keras.layers.Dense(128, activation="relu", name="hidden_1")(inputs)
    h = keras.layers.Dense(128, activation="relu", name="hidden_2")(h)
    pretrained = keras.Model(
        inputs, keras.layers.Dense(5, activation="softmax", name="old_head")(h)
    )
    seen = y_train < 5
    pretrained.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    pretrained.fit(x_train[seen], y_train[seen], epochs=epochs, verbose=0)

    # 2. The new task, all ten digits: the pretrained body plus a new head,
    # adapted in place. The head is new, so it trains fully (keep_trainable);
    # the hidden layers keep their kernels frozen and learn adapters.
    head = keras.layers.Dense(10, activation="softmax", name="head")
    model = keras.Model(inputs, head(h), name="digits")
    keras_adalora.apply_adalora(
        model, init_rank=args.init_rank, keep_trainable=["head"]
    )
    print(f"Backend: {keras.backend.backend()}")
    print(
        f"Trainable parameters: {count(model.trainable_weights):,} of "
        f"{count(model.weights):,}"
    )

    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    _, before = model.evaluate(x_test, y_test, verbose=0)
    # 3. Fine-tune. Pruning runs from 10% to 70% of the steps; the last 30%
    # train the final ranks.
    budget = keras_adalora.RankBudgetCallback(
        target_rank=args.target_rank, tinit=0.1, tfinal=0.7, delta_t=5
    )
    model.fit(
        x_train,
        y_train,
        validation_data=(x_test, y_test),
        epochs=epochs,
        batch_size=32,
        verbose=2,
        callbacks=[budget],
    )
    _, after = model.evaluate(x_test, y_test, verbose=0)
    print(f"Test accuracy: {before:.3f} before fine-tuning, {after:.3f} after")
    print("Rank per adapted layer:", keras_adalora.get_rank_pattern(model))

    # 4. Save, compact, merge.
    model.save(out / "adapted.keras")
    predictions = model.predict(x_test, verbose=0)
    adapter_size = count(model.trainable_weights)
    keras_adalora.compact_adalora(model)
    print(
        f"Trainable parameters after compaction: "
        f"{count(model.trainable_weights):,} (was {adapter_size:,})"
    )
    keras_adalora.merge_adalora(model)
    merged_path = out / "merged.keras"
    model.save(merged_path)
    merged = keras.saving.load_model(merged_path)
    gap = float(np.max(np.abs(merged.predict(x_test, verbose=0) - predictions)))
    print(
        f"Merged model saved to {merged_path} (plain Dense layers only); "
        f"largest prediction change after merging: {gap:.2e}"
    )
    if gap > 1e-4:
        sys.exit("merging changed the predictions")
    return after


def count(weights):
    return sum(math.prod(w.shape) for w in weights)


if __name__ == "__main__":
    main()
