"""Text classification data for the examples and the benchmark.

One function, `load_text_classification`, serves every data set through
`tfds.load`: the offline copies shipped in `examples/`, SpamAssassin
(`examples/spam_assassin/`, the default) and WordNet 3.0 nouns
(`examples/wordnet_nouns/`), and any TensorFlow Datasets text
classification set, such as `imdb_reviews`, for users with a network.
"""

import importlib

import numpy as np

DEFAULT_DATASET = "spam_assassin"
EXAMPLE_DATASETS = (
    "spam_assassin",
    "spam_assassin/source",
    "wordnet_nouns",
    "imdb_reviews",
)
# The packages in examples/ whose import registers an offline tfds builder
# of the same name.
OFFLINE_DATASETS = ("spam_assassin", "wordnet_nouns")


def _register_offline_datasets():
    # Importing a package registers its offline builder: `spam_assassin`
    # with examples/ on sys.path, else `examples.spam_assassin`; the same for
    # `wordnet_nouns`.
    for name in OFFLINE_DATASETS:
        importlib.import_module(f"{__package__}.{name}" if __package__ else name)


def _check_dataset(dataset, data_dir):
    """Returns the tfds builder for `dataset`, or raises a ValueError that
    says what to pass instead. Needs no network and builds nothing."""
    import tensorflow_datasets as tfds

    if not isinstance(dataset, str) or not dataset:
        raise ValueError(
            f"`dataset` must be a TFDS name such as {EXAMPLE_DATASETS}; "
            f"got {dataset!r}."
        )
    name = dataset.split("/", 1)[0].split(":", 1)[0]
    known = tfds.list_builders(with_community_datasets=False)
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown dataset={dataset!r}: no TensorFlow Datasets builder is "
            f"called {name!r}.{hint} Pass 'spam_assassin' (offline, the "
            "default), 'spam_assassin/source' (its 5-way variant), "
            "'wordnet_nouns' (offline, WordNet nouns in 26 classes) or a TFDS "
            "text classification set such as 'imdb_reviews' "
            "(`tfds.list_builders()` lists them all)."
        )
    configs = [c.name for c in tfds.builder_cls(name).BUILDER_CONFIGS]
    config = dataset.split(":", 1)[0].split("/", 1)[1] if "/" in dataset else None
    if config is not None and config not in configs:
        raise ValueError(
            f"Unknown config {config!r} in dataset={dataset!r}: the configs "
            f"of {name!r} are {configs}"
            + (f", e.g. '{name}/{configs[0]}'." if configs else ".")
        )
    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except Exception as error:  # e.g. an unknown version
        raise ValueError(f"Cannot use dataset={dataset!r}: {error}") from error
    keys = builder.info.supervised_keys
    features = builder.info.features
    if not (
        isinstance(keys, (tuple, list))
        and len(keys) == 2
        and all(isinstance(key, str) for key in keys)
        and isinstance(features[keys[0]], tfds.features.Text)
        and isinstance(features[keys[1]], tfds.features.ClassLabel)
    ):
        raise ValueError(
            f"dataset={dataset!r} is not a text classification set: its "
            f"supervised keys are {keys!r}, and they must name a Text feature "
            "and a ClassLabel. Pass a set such as 'spam_assassin' or "
            "'imdb_reviews'."
        )
    return builder


def _proportional_quotas(counts, total):
    """Splits `total` among classes in proportion to `counts` (largest
    remainders first, ties to the smaller class index); sums to `total`."""
    counts = np.asarray(counts, dtype=np.int64)
    exact = counts * total / counts.sum()
    quotas = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[: total - quotas.sum()]] += 1
    return quotas


def stratified_subset(ds, max_examples, num_classes):
    """The first examples of each class of a `(text, label)` dataset, in its
    order, keeping the class proportions, `max_examples` in all.

    Reads the labels once. The result keeps the dataset's order (TFDS
    stores examples in a fixed, hash-shuffled order), so it is the same on
    every call.
    """
    import tensorflow as tf

    batches = ds.map(lambda text, label: label).batch(4096).as_numpy_iterator()
    labels = np.concatenate([np.zeros(0, np.int64), *batches])
    if max_examples >= len(labels):
        return ds
    quotas = _proportional_quotas(np.bincount(labels, minlength=num_classes), max_examples)
    keep = np.zeros(len(labels), dtype=bool)
    for label, quota in enumerate(quotas):
        keep[np.flatnonzero(labels == label)[:quota]] = True
    keep = tf.constant(keep)
    return (
        ds.enumerate()
        .filter(lambda index, example: tf.gather(keep, index))
        .map(lambda index, example: example)
    )


def load_text_classification(
    dataset=DEFAULT_DATASET, data_dir=None, max_examples_per_split=None
):
    """Loads a text classification data set as `(text, label)` pairs.

    Every data set goes through the same call,
    `tfds.load(dataset, split=["train", "test"], as_supervised=True)`.
    The default, `"spam_assassin"`, is built from the copy shipped in
    `examples/spam_assassin/` and needs no network (about 5 s the first
    time per `data_dir`, then it reads the prepared files);
    `"spam_assassin/source"` is its harder 5-way variant (which folder of
    the corpus a message is from). `"wordnet_nouns"` (82,115 WordNet 3.0
    noun synsets, "lemmas: gloss", in 26 lexicographer-file classes) is
    offline too, from `examples/wordnet_nouns/` (about 10 s to build the
    first time per `data_dir`). Other TFDS text sets such as
    `"imdb_reviews"` are downloaded by tfds the first time.

    Args:
        dataset: a TFDS name, optionally with a config and version
            (`"name/config:1.0.0"`), whose supervised keys are a Text
            feature and a ClassLabel, and which has `train` and `test`
            splits.
        data_dir: where tfds keeps prepared data (default: tfds' own,
            `~/tensorflow_datasets`).
        max_examples_per_split: keep at most this many examples of each
            split, with the class proportions of the split (the first
            examples of each class in the split's stored order, so the
            same ones every time). `None` keeps them all.

    Returns:
        `(train_ds, test_ds, class_names)`: two unbatched `tf.data.Dataset`s
        of `(text, label)` pairs (a scalar `tf.string` and an `int64`) and
        the list of label names, index `i` naming label `i`.

    Raises:
        ValueError: for an unknown data set or config, a set that is not
            text classification, or a `max_examples_per_split` that is not
            a positive integer; before anything is downloaded or built.

    Example:

        import text_data   # with examples/ on sys.path
        train_ds, test_ds, class_names = text_data.load_text_classification(
            "spam_assassin", max_examples_per_split=800
        )
        class_names                    # ['ham', 'spam']
        train_ds = train_ds.shuffle(800, seed=0).batch(16)
    """
    if max_examples_per_split is not None and (
        isinstance(max_examples_per_split, bool)
        or not isinstance(max_examples_per_split, (int, np.integer))
        or max_examples_per_split < 1
    ):
        raise ValueError(
            "`max_examples_per_split` must be a positive integer or None "
            f"(keep everything); got {max_examples_per_split!r}."
        )
    import tensorflow_datasets as tfds

    _register_offline_datasets()
    builder = _check_dataset(dataset, data_dir)
    label_key = builder.info.supervised_keys[1]

    (train_ds, test_ds), info = tfds.load(
        dataset,
        split=["train", "test"],
        as_supervised=True,
        data_dir=data_dir,
        with_info=True,
    )
    label_feature = info.features[label_key]
    if max_examples_per_split is not None:
        train_ds, test_ds = (
            stratified_subset(ds, int(max_examples_per_split), label_feature.num_classes)
            for ds in (train_ds, test_ds)
        )
    return train_ds, test_ds, list(label_feature.names)
