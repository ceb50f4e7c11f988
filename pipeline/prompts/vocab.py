"""Vocabularies: class names, optionally with synonyms ("sofa; couch"), from a text file, a
CSV/Parquet column or a built-in list.

A vocabulary is a list of entries; an entry is one class: its synonyms joined by "; ". The
first synonym is the class's name in the output tables; all of them are averaged into the
class's text embedding (see pipeline.prompts.bank).
"""

import hashlib
import json
import logging
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

SEPARATOR = ";"
_DATA = Path(__file__).parent / "vocabularies"
_TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")


def _data_file(name: str) -> Callable[[], list[str]]:
    return lambda: (_DATA / f"{name}.txt").read_text(encoding="utf-8").splitlines()


def _dataset(name: str) -> Callable[[], list[str]]:
    """A segmentation dataset's foreground classes, from the evaluation's class lists
    (one source of truth for both; imported when the vocabulary is read, as gem imports
    torch)."""

    def names() -> list[str]:
        from gem.eval.datasets import class_names

        return [c for c in class_names(name) if c != "background"]

    return names


def _imagenet1k() -> list[str]:
    """open_clip's cleaned ImageNet-1k class names (two are repeated there: sunglasses,
    missile; kept, so ids are ImageNet's)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def _imagenet21k() -> list[str]:
    """The 21,843 ImageNet-21k (fall 2011) synsets in timm's order, each as its WordNet
    lemmas ("sofa, couch, lounge" -> synonyms), from timm's package data (an open_clip
    dependency)."""
    info = resources.files("timm.data") / "_info"
    synsets = (info / "imagenet21k_goog_synsets.txt").read_text().split()
    lemmas = dict(
        line.split("\t", 1)
        for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines()
        if line
    )
    return [f"{SEPARATOR} ".join(p.strip() for p in lemmas[s].split(",")) for s in synsets]


# Built-in vocabularies are used as shipped (no deduplication): ids are the datasets' ids.
BUILTIN: dict[str, Callable[[], list[str]]] = {
    "voc": _dataset("voc"),
    "context59": _dataset("context59"),
    "ade150": _dataset("ade150"),
    "coco80": _data_file("coco80"),
    "coco-stuff171": _dataset("coco-stuff171"),
    "cityscapes19": _dataset("cityscapes"),
    "imagenet1k": _imagenet1k,
    "imagenet21k": _imagenet21k,
}


def normalize_entry(text: str) -> str:
    """An entry's canonical form: synonyms stripped, inner whitespace collapsed, empty
    synonyms dropped, joined by "; " ("" when nothing is left)."""
    parts = (" ".join(p.split()) for p in text.split(SEPARATOR))
    return f"{SEPARATOR} ".join(p for p in parts if p)


def synonyms(entry: str) -> list[str]:
    """The synonyms of an entry ("sofa; couch" -> ["sofa", "couch"])."""
    return [p.strip() for p in entry.split(SEPARATOR) if p.strip()]


def class_names(entries: list[str]) -> list[str]:
    """Each entry's name in the output tables: its first synonym."""
    return [synonyms(e)[0] for e in entries]


def split_column(source: str, column: str | None) -> tuple[str, str | None]:
    """`file.csv:name` -> (`file.csv`, `name`); an explicit `column` wins."""
    base, _, suffix = source.rpartition(":")
    if column is None and base.lower().endswith(_TABLE_SUFFIXES) and "/" not in suffix:
        return base, suffix
    return source, column


def _read_column(path: str, column: str | None) -> list[str]:
    with fsspec.open(path, "rb") as f:
        if path.lower().endswith((".parquet", ".pq")):
            table = pq.read_table(f)
        else:
            delimiter = "\t" if path.lower().endswith(".tsv") else ","
            table = pa_csv.read_csv(f, parse_options=pa_csv.ParseOptions(delimiter=delimiter))
    if column is None:
        if table.num_columns == 1:
            column = table.column_names[0]
        elif "name" in table.column_names:
            column = "name"
        else:
            raise ValueError(
                f"vocabulary {path} has columns {table.column_names}: choose one with "
                f"--vocab-column or {path}:COLUMN"
            )
    if column not in table.column_names:
        raise ValueError(f"vocabulary {path} has no column {column!r} ({table.column_names})")
    values = table.column(column).cast(pa.string()).to_pylist()
    return ["" if v is None else v for v in values]


def _read_lines(path: str) -> list[str]:
    with fsspec.open(path, "rt", encoding="utf-8") as f:
        return [line for line in f if not line.lstrip().startswith("#")]


def load_vocabulary(source: str, column: str | None = None) -> list[str]:
    """Vocabulary entries from a built-in name (see BUILTIN), a text file (one class per
    line, `#` comments), or a CSV/TSV/Parquet column (`column`, or `file.csv:column`; the
    only column or one called `name` by default). Paths may be fsspec URLs.

    Entries are normalized (see normalize_entry); from files, blank entries are skipped and
    a repeated entry keeps its first position, both reported in the log.
    """
    if source in BUILTIN and column is None:
        return [normalize_entry(e) for e in BUILTIN[source]()]
    path, column = split_column(source, column)
    if column is not None or path.lower().endswith(_TABLE_SUFFIXES):
        raw = _read_column(path, column)
    else:
        raw = _read_lines(path)
    names, seen, duplicates, blanks = [], set(), [], 0
    for entry in map(normalize_entry, raw):
        if not entry:
            blanks += 1
        elif entry in seen:
            duplicates.append(entry)
        else:
            seen.add(entry)
            names.append(entry)
    if blanks:
        logger.info("vocabulary %s: %d blank entries skipped", source, blanks)
    if duplicates:
        logger.warning(
            "vocabulary %s: %d duplicate name(s) ignored (first kept): %s",
            source,
            len(duplicates),
            ", ".join(duplicates[:10]),
        )
    if not names:
        raise ValueError(
            f"vocabulary {source} has no class names (one per line expected, or a built-in: "
            f"{', '.join(BUILTIN)})"
        )
    return names


def vocabulary_hash(names: list[str]) -> str:
    """A short content hash of the ordered entries (for manifests and caches)."""
    return hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]
