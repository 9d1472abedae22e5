"""WordNet 3.0 noun synsets as an offline TensorFlow Datasets set.

Importing this package registers the `wordnet_nouns` builder, so that

    import wordnet_nouns  # with examples/ on sys.path
    tfds.load("wordnet_nouns", split=["train", "test"], as_supervised=True)

builds it (once per `data_dir`) from the copy shipped here, without a
network: 82,115 synsets, text "lemmas: gloss", label one of 26
lexicographer files. See README.md in this folder for where the data
comes from and its licence.
"""

from .builder import DATA_FILE
from .builder import DATA_SHA256
from .builder import LABELS
from .builder import WordNetNouns
from .builder import file_sha256
from .builder import read_records

__all__ = [
    "DATA_FILE",
    "DATA_SHA256",
    "LABELS",
    "WordNetNouns",
    "file_sha256",
    "read_records",
]
