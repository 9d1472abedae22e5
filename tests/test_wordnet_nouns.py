"""The offline WordNet 3.0 nouns set: the shipped data, `make_data.py` that
rebuilds it, its tfds builder and `load_text_classification`."""

import collections
import glob
import gzip
import importlib
import io
import os
import pathlib
import sys
import tarfile

import pytest

tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# The examples import their helpers as top-level modules, as when running
# `python examples/quickstart.py`.
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import text_data  # noqa: E402
import wordnet_nouns  # noqa: E402
from wordnet_nouns import make_data  # noqa: E402

SPLITS = ("train", "test")
DOG = (
    "dog, domestic dog, Canis familiaris: a member of the genus Canis (probably "
    "descended from the common wolf) that has been domesticated by man since "
    'prehistoric times; occurs in many breeds; "the dog barked all night"'
)

# A hand-written data.noun: two licence lines, then five synsets of four
# lexicographer files (3 noun.Tops, 5 noun.animal, 14 noun.group, 18
# noun.person). One has ten lemmas (w_cnt "0a" is hexadecimal), one a gloss
# with " | " in it, one an adjective marker that must go, one no gloss.
FRAGMENT_LINES = [
    "  1 This software and database is being provided to you, the LICENSEE, by",
    "  2 Princeton University under the following license.",
    "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 "
    "~ 04424418 n 0000 | that which is perceived",
    "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 001 "
    "@ 02083346 n 0000 | a member of the genus Canis | not a pointer",
    "10001001 18 n 02 leader(p) 0 head_honcho 1 000 | a person who leads",
    "09999999 18 n 01 ghost 0 000 |",
    "00010000 14 n 0a a 0 b 0 c 0 d 0 e 0 f 0 g 0 h 0 i 0 j 0 000 | ten letters",
]
# Data lines end in two spaces, as in WordNet's files.
FRAGMENT = "".join(line + "  \n" for line in FRAGMENT_LINES)
FRAGMENT_RECORDS = [
    ("00001740", "noun.Tops", "entity: that which is perceived"),
    ("00010000", "noun.group", "a, b, c, d, e, f, g, h, i, j: ten letters"),
    ("02084071", "noun.animal", "dog, domestic dog, Canis familiaris: a member of the genus Canis | not a pointer"),
    ("09999999", "noun.person", "ghost"),
    ("10001001", "noun.person", "leader, head honcho: a person who leads"),
]  # fmt: skip


@pytest.fixture(scope="module")
def records():
    return wordnet_nouns.read_records()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tfds data_dir with the full set built (about 10 s, once per module)."""
    path = tmp_path_factory.mktemp("tfds")
    text_data.load_text_classification("wordnet_nouns", data_dir=str(path))
    return str(path)


def batches(ds):
    """The examples of `ds` in numpy batches (much faster than one by one)."""
    return ds.batch(8192).as_numpy_iterator()


def test_the_shipped_file_is_the_one_the_builder_version_records():
    # Rebuilding the file means a new builder VERSION (see builder.py).
    assert wordnet_nouns.file_sha256() == wordnet_nouns.DATA_SHA256


def test_builder_and_make_data_name_the_same_classes_in_file_order():
    assert wordnet_nouns.LABELS == make_data.LEXNAMES
    assert len(wordnet_nouns.LABELS) == 26
    assert wordnet_nouns.LABELS[0] == "noun.Tops"  # file 3
    assert wordnet_nouns.LABELS[-1] == "noun.time"  # file 28


def test_the_shipped_copy_has_every_noun_synset_once(records):
    assert len(records) == 82115
    ids = [r["id"] for r in records]
    assert ids == sorted(set(ids))
    assert all(len(i) == 8 and i.isdigit() for i in ids)
    counts = collections.Counter(r["label"] for r in records)
    assert set(counts) == set(wordnet_nouns.LABELS)
    assert counts["noun.artifact"] == 11587
    assert counts["noun.person"] == 11087
    assert counts.most_common(1)[0][0] == "noun.artifact"
    assert all(0 < len(r["text"]) <= make_data.MAX_CHARS for r in records)
    by_id = {r["id"]: r for r in records}
    assert by_id["02084071"] == {
        "id": "02084071",
        "label": "noun.animal",
        "split": by_id["02084071"]["split"],
        "text": DOG,
    }


def test_the_split_is_stratified_disjoint_and_follows_the_fixed_rule(records):
    counts = collections.Counter((r["label"], r["split"]) for r in records)
    for label in wordnet_nouns.LABELS:
        n = counts[label, "train"] + counts[label, "test"]
        assert counts[label, "test"] == round(make_data.TEST_FRACTION * n) > 0
        assert counts[label, "train"] > 0
    assert {r["split"] for r in records} == set(SPLITS)
    assert sum(r["split"] == "test" for r in records) == 16423
    # The rule recomputed from the data alone gives the stored split.
    assert make_data.assign_splits({r["id"]: r["label"] for r in records}) == {
        r["id"]: r["split"] for r in records
    }


def write_fragment(folder):
    path = folder / "data.noun"
    path.write_text(FRAGMENT, encoding="utf-8")
    return path


def test_make_data_rebuilds_a_fragment_with_the_same_bytes_twice(tmp_path, capsys):
    source = write_fragment(tmp_path)
    outs = [tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"]
    for out in outs:
        assert make_data.main(["--data-noun", str(source), "--out", str(out)]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert "wrote 5 synsets" in capsys.readouterr().out
    rebuilt = wordnet_nouns.read_records(outs[0])
    assert [(r["id"], r["label"], r["text"]) for r in rebuilt] == FRAGMENT_RECORDS
    # At most two synsets a class: round(0.2 * 2) = 0, so all are train.
    assert {r["split"] for r in rebuilt} == {"train"}
    # No time stamp or file name in the gzip header: flags 0, mtime 0.
    assert outs[0].read_bytes()[3:8] == bytes(5)


def make_deb(folder, data_noun):
    """A minimal .deb (ar archive) holding data.tar.xz with `data_noun`."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        info = tarfile.TarInfo("./" + make_data.DATA_NOUN)
        info.size = len(data_noun)
        tar.addfile(info, io.BytesIO(data_noun))
    members = [("debian-binary", b"2.0\n"), ("data.tar.xz", tar_bytes.getvalue())]
    blob = b"!<arch>\n"
    for name, content in members:
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(content):<10}`\n"
        blob += header.encode("ascii") + content + b"\n" * (len(content) % 2)
    path = folder / "wordnet-base_1%3a3.0-37_all.deb"
    path.write_bytes(blob)
    return path


def test_make_data_reads_data_noun_from_a_deb(tmp_path):
    deb = make_deb(tmp_path, FRAGMENT.encode("utf-8"))
    assert make_data.data_noun_from_deb(deb) == FRAGMENT.encode("utf-8")
    out = tmp_path / "deb.jsonl.gz"
    make_data.main(["--deb", str(deb), "--out", str(out)])
    assert [r["id"] for r in wordnet_nouns.read_records(out)] == [r[0] for r in FRAGMENT_RECORDS]
    with pytest.raises(ValueError, match="--deb .* not a Debian package"):
        make_data.data_noun_from_deb(write_fragment(tmp_path))


@pytest.mark.parametrize(
    "line, message",
    [
        ("01234567 29 v 01 run 0 000 | move fast", "not a noun synset"),
        ("01234567 02 n 01 run 0 000 | move fast", "lexicographer file 2"),
    ],
)
def test_make_data_refuses_lines_that_are_not_noun_synsets(line, message):
    with pytest.raises(ValueError, match=message):
        make_data.parse_synset(line)


def test_lemmas_lose_underscores_and_adjective_markers():
    assert make_data.lemma_text("Canis_familiaris") == "Canis familiaris"
    assert [make_data.lemma_text(w) for w in ("big(a)", "galore(ip)", "ablaze(p)")] == [
        "big",
        "galore",
        "ablaze",
    ]


def debian_data_noun():
    """`data.noun` from an installed wordnet-base, a cached .deb or the .deb
    that $WORDNET_BASE_DEB names; None when there is none."""
    installed = pathlib.Path("/usr/share/wordnet/data.noun")
    if installed.exists():
        return ["--data-noun", str(installed)]
    debs = glob.glob("/var/cache/apt/archives/wordnet-base_*.deb")
    debs = [os.environ["WORDNET_BASE_DEB"]] if "WORDNET_BASE_DEB" in os.environ else debs
    return ["--deb", debs[0]] if debs else None


def test_make_data_reproduces_the_shipped_file_from_debian(tmp_path):
    source = debian_data_noun()
    if source is None:
        pytest.skip(
            "no WordNet 3.0 data.noun here: `apt-get install wordnet-base`, or "
            "`apt-get download wordnet-base` and set WORDNET_BASE_DEB to the .deb"
        )
    out = tmp_path / "wordnet_nouns.jsonl.gz"
    make_data.main(source + ["--out", str(out)])
    assert wordnet_nouns.file_sha256(out) == wordnet_nouns.DATA_SHA256


def test_load_text_classification_serves_both_splits_with_the_class_names(
    data_dir, records
):
    train_ds, test_ds, class_names = text_data.load_text_classification(
        "wordnet_nouns", data_dir=data_dir
    )
    assert class_names == list(wordnet_nouns.LABELS)
    assert train_ds.element_spec == (
        tf.TensorSpec((), tf.string),
        tf.TensorSpec((), tf.int64),
    )
    expected = collections.Counter(
        (r["split"], wordnet_nouns.LABELS.index(r["label"])) for r in records
    )
    for split, ds in zip(SPLITS, (train_ds, test_ds)):
        labels = collections.Counter()
        for batch in batches(ds.map(lambda text, label: label)):
            labels.update(batch.tolist())
        assert labels == {
            label: n for (s, label), n in expected.items() if s == split
        }


def test_the_built_test_split_holds_the_shipped_examples_with_their_ids(
    data_dir, records
):
    by_id = {r["id"]: r for r in records}
    ds = tfds.load("wordnet_nouns", split="test", data_dir=data_dir)
    seen = set()
    for batch in batches(ds):
        for synset_id, text, label in zip(batch["id"], batch["text"], batch["label"]):
            record = by_id[synset_id.decode("utf-8")]
            assert record["split"] == "test"
            assert text.decode("utf-8") == record["text"]
            assert wordnet_nouns.LABELS[label] == record["label"]
            seen.add(record["id"])
    assert len(seen) == 16423


def test_a_misspelt_name_suggests_the_offline_set(tmp_path):
    with pytest.raises(ValueError, match="Did you mean 'wordnet_nouns'") as error:
        text_data.load_text_classification("wordnet_noun", data_dir=str(tmp_path / "never"))
    assert "'wordnet_nouns' (offline" in str(error.value)
    assert not (tmp_path / "never").exists()


def test_importing_the_package_under_a_second_name_registers_nothing_twice():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module = importlib.import_module("examples.wordnet_nouns")
    assert module.DATA_SHA256 == wordnet_nouns.DATA_SHA256
    assert "wordnet_nouns" in tfds.list_builders(with_community_datasets=False)


def test_the_shipped_file_is_small_and_plain_gzip():
    data = wordnet_nouns.DATA_FILE.read_bytes()
    assert len(data) < 4_000_000
    assert data[3:8] == bytes(5)  # no file name, mtime 0
    assert len(gzip.decompress(data).splitlines()) == 82115
