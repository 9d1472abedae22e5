"""TensorFlow Datasets builder for the shipped WordNet 3.0 noun synsets."""

import gzip
import hashlib
import json
import pathlib

import tensorflow_datasets as tfds

DATA_FILE = pathlib.Path(__file__).resolve().parent / "wordnet_nouns.jsonl.gz"
# Built tfds data is cached under `data_dir` by version: when `make_data.py`
# changes the shipped file, bump `WordNetNouns.VERSION` and this digest
# together (a test checks the digest).
DATA_SHA256 = "dcfbe1694e7e866df83a94bff7f84a6ec41d483de34fe0c2e10708214a4ad004"
# The 26 noun lexicographer files, numbers 3 to 28 in this order; label `i`
# is file `i + 3`. The same tuple as `make_data.LEXNAMES` (a test checks).
LABELS = (
    "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time",
)  # fmt: skip


def read_records(path=DATA_FILE):
    """The shipped records as dicts (`id`, `label`, `split`, `text`), in
    file order (sorted by id)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def file_sha256(path=DATA_FILE):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


# Importing this module twice under two names (`wordnet_nouns` and
# `examples.wordnet_nouns`) must not register the name twice: tfds raises.
_REGISTERED = "wordnet_nouns" in tfds.list_builders(with_community_datasets=False)


class WordNetNouns(tfds.core.GeneratorBasedBuilder, skip_registration=_REGISTERED):
    """The 82,115 noun synsets of WordNet 3.0 in 26 classes, offline.

    Each example is one synset: its lemmas, then its gloss ("dog, domestic
    dog, Canis familiaris: a member of the genus Canis ..."), at most 400
    characters; its label is the synset's lexicographer file (noun.animal,
    noun.artifact, ...). Read from the copy shipped next to this module;
    building needs no network.
    """

    name = "wordnet_nouns"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: data.noun of Debian wordnet-base 1:3.0-37."}

    def _info(self):
        # `DatasetInfo(builder=self, ...)` rather than
        # `dataset_info_from_configs`, which looks for metadata files next to
        # the module and fails for a builder outside the tfds package.
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "WordNet 3.0 noun synsets (lemmas and gloss) labelled with "
                "their lexicographer file, 26 classes."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=LABELS),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("text", "label"),
            homepage="https://wordnet.princeton.edu/",
            license="WordNet 3.0 license (Princeton University)",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is in the shipped file
        records = read_records()
        return {
            split: self._generate_examples([r for r in records if r["split"] == split])
            for split in ("train", "test")
        }

    def _generate_examples(self, records):
        for record in records:
            yield record["id"], {
                "text": record["text"],
                "label": record["label"],
                "id": record["id"],
            }
