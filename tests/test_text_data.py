"""The offline SpamAssassin data set and `load_text_classification`, the one
loader the examples and the benchmark use for every text data set."""

import collections
import pathlib
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
# The examples import their helpers as top-level modules, as when running
# `python examples/quickstart.py`.
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import spam_assassin  # noqa: E402
import text_data  # noqa: E402
from spam_assassin import make_data  # noqa: E402

# (train, test) per source folder, as in examples/spam_assassin/README.md.
COUNTS = {
    "easy-ham-1": (2000, 500),
    "easy-ham-2": (1120, 280),
    "hard-ham-1": (200, 50),
    "spam-1": (400, 100),
    "spam-2": (1117, 279),
}
SPLITS = ("train", "test")


def expected_count(split, sources):
    return sum(COUNTS[s][SPLITS.index(split)] for s in sources)


@pytest.fixture(scope="module")
def records():
    return spam_assassin.read_records()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tfds data_dir with both configs built (once per test module)."""
    path = tmp_path_factory.mktemp("tfds")
    for dataset in ("spam_assassin", "spam_assassin/source"):
        text_data.load_text_classification(dataset, data_dir=str(path))
    return str(path)


def as_lists(ds):
    pairs = list(ds.as_numpy_iterator())
    return [t for t, _ in pairs], [int(label) for _, label in pairs]


def test_the_shipped_file_is_the_one_the_builder_version_records():
    # Rebuilding the file means a new builder VERSION (see builder.py).
    assert spam_assassin.file_sha256() == spam_assassin.DATA_SHA256


def test_the_shipped_copy_has_every_message_once_with_its_folder_and_label(records):
    assert len(records) == 6046
    ids = [r["id"] for r in records]
    assert ids == sorted(set(ids))
    assert collections.Counter(r["source"] for r in records) == {
        source: sum(n) for source, n in COUNTS.items()
    }
    for r in records:
        assert r["id"].split("/")[0] == r["source"]
        assert r["label"] == ("spam" if r["source"].startswith("spam") else "ham")
        assert r["text"].strip()
        assert len(r["text"]) <= make_data.MAX_CHARS
    assert sum(r["label"] == "spam" for r in records) == 1896


def test_the_split_is_stratified_disjoint_and_follows_the_fixed_rule(records):
    counts = collections.Counter((r["source"], r["split"]) for r in records)
    for source, (train, test) in COUNTS.items():
        assert (counts[source, "train"], counts[source, "test"]) == (train, test)
    # The rule recomputed from the data alone gives the stored split.
    assert make_data.assign_splits({r["id"]: r["text"] for r in records}) == {
        r["id"]: r["split"] for r in records
    }
    # Duplicate messages (a mail sent to two lists) never straddle the split.
    splits_of_text = collections.defaultdict(set)
    for r in records:
        splits_of_text[r["text"]].add(r["split"])
    assert all(len(s) == 1 for s in splits_of_text.values())


def test_spam_config_gives_binary_text_label_pairs(data_dir):
    train_ds, test_ds, class_names = text_data.load_text_classification(
        "spam_assassin", data_dir=data_dir
    )
    assert class_names == ["ham", "spam"]
    assert train_ds.element_spec == (
        tf.TensorSpec((), tf.string),
        tf.TensorSpec((), tf.int64),
    )
    for split, ds in zip(SPLITS, (train_ds, test_ds)):
        texts, labels = as_lists(ds)
        assert collections.Counter(labels) == {
            0: expected_count(split, ["easy-ham-1", "easy-ham-2", "hard-ham-1"]),
            1: expected_count(split, ["spam-1", "spam-2"]),
        }
        assert all(0 < len(t.decode("utf-8")) <= make_data.MAX_CHARS for t in texts)


def test_source_config_labels_the_five_folders(data_dir):
    train_ds, test_ds, class_names = text_data.load_text_classification(
        "spam_assassin/source", data_dir=data_dir
    )
    assert class_names == list(COUNTS)
    for split, ds in zip(SPLITS, (train_ds, test_ds)):
        _, labels = as_lists(ds)
        assert collections.Counter(labels) == {
            i: COUNTS[source][SPLITS.index(split)] for i, source in enumerate(COUNTS)
        }


def test_built_splits_hold_the_shipped_examples_with_their_ids(data_dir, records):
    by_id = {r["id"]: r for r in records}
    for split in SPLITS:
        ds = tfds.load("spam_assassin/source", split=split, data_dir=data_dir)
        seen = set()
        for example in ds.as_numpy_iterator():
            record = by_id[example["id"].decode("utf-8")]
            assert record["split"] == split
            assert example["text"].decode("utf-8") == record["text"]
            assert example["label"] == example["source"]
            assert example["source"] == list(COUNTS).index(record["source"])
            seen.add(record["id"])
        assert len(seen) == expected_count(split, COUNTS)


def test_a_cap_keeps_the_class_proportions_and_the_same_examples(data_dir, records):
    loads = [
        text_data.load_text_classification(
            "spam_assassin", data_dir=data_dir, max_examples_per_split=50
        )
        for _ in range(2)
    ]
    (train_a, test_a, _), (train_b, test_b, _) = loads
    for split, a, b in (("train", train_a, train_b), ("test", test_a, test_b)):
        texts, labels = as_lists(a)
        assert (texts, labels) == as_lists(b)
        assert len(texts) == 50
        assert {t.decode("utf-8") for t in texts} <= {
            r["text"] for r in records if r["split"] == split
        }
    texts, labels = as_lists(train_a)
    # 1,517 of 4,837 training messages are spam: 15.7 of 50.
    assert collections.Counter(labels) == {0: 34, 1: 16}


def test_quotas_are_proportional_and_sum_to_the_cap():
    np.testing.assert_array_equal(text_data._proportional_quotas([3320, 1517], 50), [34, 16])
    np.testing.assert_array_equal(text_data._proportional_quotas([1, 1, 1], 2), [1, 1, 0])
    np.testing.assert_array_equal(text_data._proportional_quotas([5, 0, 5], 3), [2, 0, 1])


@pytest.mark.parametrize(
    "dataset, message",
    [
        ("spam_asassin", "Did you mean 'spam_assassin'"),
        ("spam_assassin/binary", "the configs of 'spam_assassin' are ['spam', 'source']"),
        ("mnist", "not a text classification set"),
        ("", "must be a TFDS name"),
    ],
)
def test_a_bad_dataset_name_fails_before_any_work(dataset, message, tmp_path):
    with pytest.raises(ValueError, match="dataset") as error:
        text_data.load_text_classification(dataset, data_dir=str(tmp_path / "never"))
    assert message in str(error.value)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("cap", [0, -3, 2.5, True])
def test_a_bad_cap_fails_with_the_argument_name(cap):
    with pytest.raises(ValueError, match="max_examples_per_split"):
        text_data.load_text_classification(max_examples_per_split=cap)


def test_tfds_text_sets_go_through_the_same_function(tmp_path):
    # What users with a network get from `--dataset imdb_reviews`, with tfds'
    # mock data in place of the download.
    with tfds.testing.mock_data(num_examples=8):
        train_ds, test_ds, class_names = text_data.load_text_classification(
            "imdb_reviews", data_dir=str(tmp_path)
        )
        capped, _, _ = text_data.load_text_classification(
            "imdb_reviews", data_dir=str(tmp_path), max_examples_per_split=5
        )
        assert class_names == ["neg", "pos"]
        assert train_ds.element_spec == (
            tf.TensorSpec((), tf.string),
            tf.TensorSpec((), tf.int64),
        )
        for ds in (train_ds, test_ds):
            texts, labels = as_lists(ds)
            assert len(texts) == 8
            assert all(isinstance(t, bytes) for t in texts)
            assert set(labels) <= {0, 1}
        assert len(as_lists(capped)[0]) == 5
