"""Rebuilds `wordnet_nouns.jsonl.gz` from the WordNet 3.0 noun database.

WordNet 3.0 is packaged in Debian as `wordnet-base`. This script reads its
`usr/share/wordnet/data.noun` (from a file you name, from a `.deb` you
have, or from one it fetches with `apt-get download wordnet-base` into a
temporary folder) and writes one JSON object per noun synset:

    {"id": "02084071", "label": "noun.animal", "split": "train",
     "text": "dog, domestic dog, Canis familiaris: a member of the genus ..."}

`id` is the synset's byte offset in `data.noun`, `label` its lexicographer
file (the supersense) and `text` its lemmas joined by ", " (underscores as
spaces), ": " and its gloss, at most `MAX_CHARS` characters.

The output is deterministic: records sorted by id, a fixed split rule
(`assign_splits`) and a gzip stream with no timestamp or file name, so
running it twice gives the same bytes.

    python examples/wordnet_nouns/make_data.py            # needs apt-get + network
    python examples/wordnet_nouns/make_data.py --deb wordnet-base_1%3a3.0-37_all.deb
    python examples/wordnet_nouns/make_data.py --data-noun /usr/share/wordnet/data.noun
"""

import argparse
import collections
import gzip
import hashlib
import io
import json
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

DEB_PACKAGE = "wordnet-base"
DATA_NOUN = "usr/share/wordnet/data.noun"
# sha256 of `data.noun` in Debian's wordnet-base 1:3.0-37 (bookworm), the
# file the shipped copy was made from.
DATA_NOUN_SHA256 = "fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2"
# Lexicographer files 3 to 28, in number order, as in WordNet's lexnames(5).
LEXNAMES = (
    "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute",
    "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant",
    "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time",
)  # fmt: skip
FIRST_LEX_FILENUM = 3
MAX_CHARS = 400
TEST_FRACTION = 0.2
OUTPUT = pathlib.Path(__file__).resolve().parent / "wordnet_nouns.jsonl.gz"

# The syntactic markers WordNet puts after some adjectives: "(p)", "(a)", "(ip)".
_MARKER = re.compile(r"\((?:a|p|ip)\)$")


def lemma_text(word):
    """A data-file word as text: `"Canis_familiaris"` -> `"Canis familiaris"`,
    with an adjective marker such as `"(p)"` removed."""
    return _MARKER.sub("", word).replace("_", " ")


def parse_synset(line):
    """One `data.noun` line as `{"id", "label", "text"}`.

    The line reads `offset lex_filenum ss_type w_cnt word lex_id [word
    lex_id ...] p_cnt [pointers ...] | gloss`; `w_cnt` is hexadecimal.

    Raises:
        ValueError: for a line that is not a noun synset of files 3 to 28.

    Example:

    >>> parse_synset("02084071 05 n 02 dog 0 domestic_dog 0 000 | a dog  \\n")
    {'id': '02084071', 'label': 'noun.animal', 'text': 'dog, domestic dog: a dog'}
    """
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    if len(fields) < 5 or fields[2] != "n":
        raise ValueError(f"not a noun synset line of data.noun: {line[:80]!r}")
    offset, lex_filenum, n_words = fields[0], int(fields[1]), int(fields[3], 16)
    index = lex_filenum - FIRST_LEX_FILENUM
    if not 0 <= index < len(LEXNAMES):
        raise ValueError(f"lexicographer file {lex_filenum} is not a noun file: {line[:80]!r}")
    lemmas = ", ".join(lemma_text(w) for w in fields[4 : 4 + 2 * n_words : 2])
    text = f"{lemmas}: {gloss.strip()}" if gloss.strip() else lemmas
    return {"id": offset, "label": LEXNAMES[index], "text": text[:MAX_CHARS]}


def read_synsets(lines):
    """Parses every synset of a `data.noun`, skipping the licence header
    (its lines start with two spaces) and blank lines."""
    return [parse_synset(line) for line in lines if line.strip() and not line.startswith("  ")]


def assign_splits(labels):
    """Maps each id to `"train"` or `"test"`, given `{id: label}`.

    Within each class, ids are ordered by their SHA-256 and the first
    `round(TEST_FRACTION * n)` go to test: the split is stratified by class
    and depends on nothing but the data.
    """
    by_label = collections.defaultdict(list)
    for synset_id, label in labels.items():
        by_label[label].append(synset_id)
    splits = {}
    for ids in by_label.values():
        ids.sort(key=lambda i: hashlib.sha256(i.encode("utf-8")).hexdigest())
        n_test = round(TEST_FRACTION * len(ids))
        splits.update((i, "test" if rank < n_test else "train") for rank, i in enumerate(ids))
    return splits


def build_records(lines):
    """JSON-ready records (`id`, `label`, `split`, `text`), sorted by id,
    from the lines of a `data.noun`."""
    synsets = read_synsets(lines)
    splits = assign_splits({s["id"]: s["label"] for s in synsets})
    return [
        {"id": s["id"], "label": s["label"], "split": splits[s["id"]], "text": s["text"]}
        for s in sorted(synsets, key=lambda s: s["id"])
    ]


def data_noun_from_deb(path):
    """The bytes of `data.noun` inside a `wordnet-base` .deb (an ar archive
    holding `data.tar.xz`), read with the standard library alone."""
    blob = pathlib.Path(path).read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise ValueError(f"--deb {path}: not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(blob):
        name = blob[pos : pos + 16].decode("ascii").strip().rstrip("/")
        size = int(blob[pos + 48 : pos + 58])
        if name.startswith("data.tar"):
            member = io.BytesIO(blob[pos + 60 : pos + 60 + size])
            with tarfile.open(fileobj=member, mode="r:*") as tar:
                for info in tar.getmembers():
                    if info.name.removeprefix("./") == DATA_NOUN:
                        return tar.extractfile(info).read()
            break
        pos += 60 + size + size % 2
    raise ValueError(f"--deb {path}: no {DATA_NOUN} in it; is it {DEB_PACKAGE}?")


def apt_download(folder):
    """Downloads the `wordnet-base` .deb into `folder` and returns its path."""
    try:
        subprocess.run(
            ["apt-get", "download", DEB_PACKAGE], cwd=folder, check=True, capture_output=True
        )
    except (OSError, subprocess.CalledProcessError) as error:
        raise SystemExit(
            f"`apt-get download {DEB_PACKAGE}` failed ({error}); run `apt-get "
            "update` first, or pass --deb or --data-noun with a copy you have."
        ) from error
    return next(pathlib.Path(folder).glob(f"{DEB_PACKAGE}_*.deb"))


def write_jsonl_gz(records, path):
    """Writes the records as gzip'd JSON lines with reproducible bytes."""
    buffer = io.BytesIO()
    # mtime=0 and an empty file name keep the gzip header free of the date.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as f:
        for record in records:
            line = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
            f.write(line.encode("utf-8") + b"\n")
    pathlib.Path(path).write_bytes(buffer.getvalue())


def counts_table(records):
    """A Markdown table of synsets per class and split."""
    counts = collections.Counter((r["label"], r["split"]) for r in records)
    rows = ["| file | label | train | test | total |", "|---:|---|---:|---:|---:|"]
    for index, label in enumerate(LEXNAMES):
        train, test = counts[label, "train"], counts[label, "test"]
        rows.append(
            f"| {index + FIRST_LEX_FILENUM} | {label} | {train} | {test} | {train + test} |"
        )
    train = sum(counts[label, "train"] for label in LEXNAMES)
    test = sum(counts[label, "test"] for label in LEXNAMES)
    rows.append(f"| | all | {train} | {test} | {train + test} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--deb", help=f"a downloaded {DEB_PACKAGE} .deb")
    source.add_argument("--data-noun", help="a WordNet 3.0 data.noun file")
    parser.add_argument("--out", default=str(OUTPUT), help="output .jsonl.gz file")
    args = parser.parse_args(argv)

    if args.data_noun:
        raw = pathlib.Path(args.data_noun).read_bytes()
    else:
        with tempfile.TemporaryDirectory() as folder:
            raw = data_noun_from_deb(args.deb or apt_download(folder))
    digest = hashlib.sha256(raw).hexdigest()
    if digest != DATA_NOUN_SHA256:
        print(f"note: data.noun sha256 {digest} is not the one the shipped copy was made from")
    records = build_records(raw.decode("utf-8").splitlines())
    write_jsonl_gz(records, args.out)
    digest = hashlib.sha256(pathlib.Path(args.out).read_bytes()).hexdigest()
    print(f"wrote {len(records)} synsets to {args.out} (sha256 {digest})")
    print(counts_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
