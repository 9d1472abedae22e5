"""keras-adalora example: AdaLoRA on the convolutions of a small CNN.

Runs offline in under a minute on a laptop CPU:

1. "pretrains" a small CNN on the handwritten digits 0-4 (scikit-learn's
   bundled 8x8 digits, 1,797 real images, no download);
2. adapts it to the other digits, 5-9: a fresh 5-way head stays fully
   trainable, every Conv2D (a grouped one included) and the hidden Dense
   layer get a frozen kernel and an AdaLoRA adapter of rank 8;
3. fine-tunes with `model.fit` and `RankBudgetCallback`, which prunes the
   adapters to an average rank of 3, and compares with the same pretrained
   body frozen under a trained head alone (no adapter);
4. saves the adapter alone, compacts, merges the adapters into plain Conv2D
   and Dense kernels and checks the merged model predicts the same.

    python examples/digits_cnn.py                 # JAX backend by default
    python examples/digits_cnn.py --backend torch
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
    parser.add_argument(
        "--init-rank", type=int, default=8, help="starting rank per layer"
    )
    parser.add_argument(
        "--target-rank", type=int, default=3, help="average final rank per layer"
    )
    parser.add_argument("--out", default="digits_cnn_out", help="output folder")
    parser.add_argument("--smoke", action="store_true", help="tiny settings, for CI")
    return parser.parse_args(argv)


def pretrained_cnn(keras):
    """The body every model here starts from, with the 0-4 head."""
    images = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_1")(
        images
    )
    h = keras.layers.Conv2D(
        32, 3, padding="same", groups=2, activation="relu", name="conv_2"
    )(h)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv_3")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(64, activation="relu", name="hidden")(h)
    old_head = keras.layers.Dense(5, activation="softmax", name="old_head")(h)
    return keras.Model(images, old_head, name="pretrained")


def new_task_model(keras, pretrained, name):
    """The pretrained body (weights copied) under a fresh 5-way head."""
    body = keras.Model(pretrained.input, pretrained.get_layer("hidden").output)
    copy = keras.models.clone_model(body)
    copy.set_weights(body.get_weights())
    head = keras.layers.Dense(5, activation="softmax", name="head")
    return keras.Model(copy.input, head(copy.output), name=name)


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
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )
    old_train, new_train = y_train < 5, y_train >= 5
    new_test = y_test >= 5

    # 1. Pretraining on digits 0-4 only.
    pretrained = pretrained_cnn(keras)
    pretrained.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    pretrained.fit(x_train[old_train], y_train[old_train], epochs=2 * epochs, verbose=0)
    xs, ys = x_train[new_train], y_train[new_train] - 5
    xt, yt = x_test[new_test], y_test[new_test] - 5

    def fit(model, callbacks=()):
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        model.fit(
            xs, ys, epochs=epochs, batch_size=32, verbose=0, callbacks=list(callbacks)
        )
        return model.evaluate(xt, yt, verbose=0)[1]

    # The control: the pretrained body frozen, a new head trained alone.
    head_only = new_task_model(keras, pretrained, "head_only")
    for layer in head_only.layers[:-1]:
        layer.trainable = False
    head_accuracy = fit(head_only)

    # 2. AdaLoRA on every convolution and the hidden layer; the head is new,
    # so it trains fully.
    model = new_task_model(keras, pretrained, "digits_cnn")
    keras_adalora.apply_adalora(
        model,
        init_rank=args.init_rank,
        target=["conv_", "hidden"],
        keep_trainable=["head"],
    )
    print(f"Backend: {keras.backend.backend()}")
    print(
        f"Trainable parameters: {count(model.trainable_weights):,} of "
        f"{count(model.weights):,}"
    )
    # 3. Pruning runs from 10% to 70% of the steps; the rest trains the
    # final ranks.
    budget = keras_adalora.RankBudgetCallback(
        target_rank=args.target_rank, tinit=0.1, tfinal=0.7, delta_t=5
    )
    accuracy = fit(model, [budget])
    print(
        f"Test accuracy on digits 5-9: AdaLoRA {accuracy:.3f}, "
        f"frozen body with a trained head {head_accuracy:.3f}"
    )
    keras_adalora.summary(model)

    # 4. The adapter alone, then compact and merge for deployment.
    keras_adalora.save_adapter(model, out / "digits_cnn.adalora.h5")
    predictions = model.predict(xt, verbose=0)
    keras_adalora.compact_adalora(model)
    keras_adalora.merge_adalora(model)
    merged_path = out / "merged.keras"
    model.save(merged_path)
    merged = keras.saving.load_model(merged_path)
    gap = float(np.max(np.abs(merged.predict(xt, verbose=0) - predictions)))
    kinds = sorted({type(layer).__name__ for layer in merged.layers if layer.weights})
    print(
        f"Merged model saved to {merged_path} ({', '.join(kinds)} layers); "
        f"largest prediction change after merging: {gap:.2e}"
    )
    if gap > 1e-4:
        sys.exit("merging changed the predictions")
    return accuracy, head_accuracy


def count(weights):
    return sum(math.prod(w.shape) for w in weights)


if __name__ == "__main__":
    main()
