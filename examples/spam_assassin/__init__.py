"""The SpamAssassin public corpus as an offline TensorFlow Datasets set.

Importing this package registers the `spam_assassin` builder, so that

    import spam_assassin  # with examples/ on sys.path
    tfds.load("spam_assassin", split=["train", "test"], as_supervised=True)

builds it (once per `data_dir`) from the copy shipped here, without a
network. `spam_assassin/source` is the 5-way source-folder task. See
README.md in this folder for where the data comes from and its licence.
"""

from .builder import DATA_FILE
from .builder import DATA_SHA256
from .builder import LABELS
from .builder import SOURCES
from .builder import SpamAssassin
from .builder import file_sha256
from .builder import read_records

__all__ = [
    "DATA_FILE",
    "DATA_SHA256",
    "LABELS",
    "SOURCES",
    "SpamAssassin",
    "file_sha256",
    "read_records",
]
