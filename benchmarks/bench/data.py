"""The benchmark's data: fit, validation and test splits, tokenized once.

The fit and validation e-mails are carved from the data set's `train`
split (a stratified subset, then the first e-mails of each class to fit
and the rest to validation, in TFDS's fixed stored order), so every seed
and every method sees the same e-mails; the test e-mails are the `test`
split (all 1,209 by default). The tokenized arrays are cached as `.npz`
next to the results, keyed by everything they depend on.
"""

import hashlib
import json
import pathlib
import sys

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def _tokenize(ds, preprocessor):
    features, labels = [], []
    batches = ds.batch(256).map(lambda text, label: (preprocessor(text), label))
    for x, y in batches.as_numpy_iterator():
        features.append(x)
        labels.append(y)
    x = {key: np.concatenate([f[key] for f in features]) for key in features[0]}
    return x, np.concatenate(labels).astype("int32")


def _take(x, y, index):
    return {k: v[index] for k, v in x.items()}, y[index]


def fit_validation_index(labels, fit_examples):
    """Indices `(fit, validation)` of a labelled pool: the first examples
    of each class go to fit, in proportion to the classes, the rest to
    validation.

    >>> fit, val = fit_validation_index(np.array([0, 1, 0, 0, 1, 0]), 3)
    >>> fit.tolist(), val.tolist()
    ([0, 1, 2], [3, 4, 5])
    """
    sys.path.insert(0, str(EXAMPLES))
    from text_data import _proportional_quotas

    counts = np.bincount(labels)
    quotas = _proportional_quotas(counts, fit_examples)
    fit = np.zeros(len(labels), dtype=bool)
    for label, quota in enumerate(quotas):
        fit[np.flatnonzero(labels == label)[:quota]] = True
    return np.flatnonzero(fit), np.flatnonzero(~fit)


def load(settings, dataset, preset, cache_dir, data_dir=None):
    """`{"fit": (x, y), "validation": (x, y), "test": (x, y), "classes": [...]}`.

    Args:
        settings: the benchmark settings (`fit_examples`,
            `validation_examples`, `test_examples` (None: all),
            `sequence_length`).
        dataset: the TFDS name (`spam_assassin`, `spam_assassin/source`).
        preset: the MiniLM preset folder (its tokenizer).
        cache_dir: where the tokenized arrays are kept.
        data_dir: the TFDS data folder (None: TFDS's).
    """
    key = json.dumps(
        [dataset, settings["fit_examples"], settings["validation_examples"],
         settings["test_examples"], settings["sequence_length"], preset],
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache = pathlib.Path(cache_dir) / f"data-{digest}.npz"
    if cache.exists():
        stored = np.load(cache, allow_pickle=False)
        out = {}
        for split in ("fit", "validation", "test"):
            names = [n for n in stored.files if n.startswith(split + "/")]
            x = {n.split("/", 1)[1]: stored[n] for n in names if n != split + "/y"}
            out[split] = (x, stored[split + "/y"])
        out["classes"] = [str(c) for c in stored["classes"]]
        return out

    import keras_hub

    sys.path.insert(0, str(EXAMPLES))
    from text_data import load_text_classification, stratified_subset

    pool = settings["fit_examples"] + settings["validation_examples"]
    train_ds, test_ds, classes = load_text_classification(dataset, data_dir=data_dir)
    train_ds = stratified_subset(train_ds, pool, len(classes))
    if settings["test_examples"] is not None:
        test_ds = stratified_subset(test_ds, settings["test_examples"], len(classes))
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        preset, sequence_length=settings["sequence_length"]
    )
    x_pool, y_pool = _tokenize(train_ds, preprocessor)
    fit, val = fit_validation_index(y_pool, settings["fit_examples"])
    out = {
        "fit": _take(x_pool, y_pool, fit),
        "validation": _take(x_pool, y_pool, val),
        "test": _tokenize(test_ds, preprocessor),
        "classes": list(classes),
    }
    arrays = {"classes": np.array(classes)}
    for split in ("fit", "validation", "test"):
        x, y = out[split]
        arrays.update({f"{split}/{k}": v for k, v in x.items()})
        arrays[f"{split}/y"] = y
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(cache)
    return out
