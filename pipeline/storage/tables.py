"""Reading a finished output directory: its tables, its vocabulary, its source shards.

Shared by the tools that work on a labeled output after the run (filter, labeled shards,
report). Nothing here writes.
"""

import posixpath

import pyarrow as pa
import pyarrow.dataset as pds

from pipeline.prompts.vocab import class_names as vocab_class_names
from pipeline.prompts.vocab import load_vocabulary, vocabulary_hash
from pipeline.storage import output
from pipeline.storage.output import IMAGES_DIR, MASKS_DIR, read_manifest
from pipeline.storage.schema import IMAGES_SCHEMA, MASKS_SCHEMA
from pipeline.storage.store import Store, as_store

SCHEMAS = {IMAGES_DIR: IMAGES_SCHEMA, MASKS_DIR: MASKS_SCHEMA}


def table_files(store: Store | str, name: str) -> list[str]:
    """The committed `.parquet` files of table `name` ("images" or "masks"), sorted; masks
    files only with their images twin (an orphan's rows are not part of the table)."""
    store = as_store(store)
    images, masks = output.table_files(store)
    return images if name == IMAGES_DIR else masks


def table_dataset(store: Store | str, name: str, files: list[str] | None = None) -> pds.Dataset:
    """Table `name` of `store` as a pyarrow dataset over its committed files, or over `files`
    (names in the table's directory), an empty one when there are none: open it once to
    query it many times."""
    store = as_store(store)
    if files is None:
        files = table_files(store, name)
    else:
        files = [store.path(name, f) for f in files]
    return store.dataset(files, SCHEMAS[name])


def read_table(
    store: Store | str, name: str, columns: list[str] | None = None, filter=None
) -> pa.Table:
    """Table `name` of `store` (all committed files), optionally only `columns` and the rows
    matching the pyarrow `filter` expression; an empty table when there are no files."""
    store = as_store(store)
    return table_dataset(store, name).to_table(columns=columns, filter=filter)


def class_names(store: Store | str) -> dict[int, str]:
    """Vocabulary id -> class name of `store`: the whole vocabulary when the manifest's
    vocabulary file is still readable and has the recorded hash, else the names that
    occur in the masks table."""
    store = as_store(store)
    manifest = read_manifest(store) or {}
    path = manifest.get("vocabulary_file")
    expected = manifest.get("config", {}).get("vocabulary", {}).get("hash")
    if path:
        try:
            names = load_vocabulary(path)
        except (OSError, ValueError):
            names = None
        if names is not None and vocabulary_hash(names) == expected:
            return dict(enumerate(vocab_class_names(names)))  # "sofa; couch" -> "sofa"
    masks = read_table(store, MASKS_DIR, ["label_id", "label"])
    pairs = zip(masks["label_id"].to_pylist(), masks["label"].to_pylist(), strict=True)
    return dict(sorted(set(pairs)))


def vocabulary_size(store: Store | str) -> int:
    """Number of classes of the run that made `store` (from the manifest, else the largest
    class id seen + 1)."""
    store = as_store(store)
    manifest = read_manifest(store) or {}
    size = manifest.get("config", {}).get("vocabulary", {}).get("classes")
    if size:
        return int(size)
    return max(class_names(store), default=-1) + 1


def match_sources(table_shards: list[str], sources: list[str]) -> dict[str, str]:
    """Table shard URL -> where to read it: each of `sources` (expanded shard URLs) stands
    for the table shard with the same URL, else for the one with the same file name when
    that is unique. Raises ValueError for a source that matches no table shard."""
    by_name: dict[str, list[str]] = {}
    for shard in table_shards:
        by_name.setdefault(posixpath.basename(shard), []).append(shard)
    known = set(table_shards)
    mapping = {}
    for source in sources:
        if source in known:
            mapping[source] = source
            continue
        candidates = by_name.get(posixpath.basename(source), [])
        if len(candidates) != 1:
            why = "no" if not candidates else "more than one"
            raise ValueError(f"source {source} matches {why} shard of the labeled output")
        mapping[candidates[0]] = source
    return mapping
