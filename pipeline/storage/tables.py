"""Reading a finished output directory: its tables, its class names, its masks, and where its
source shards are now.

Shared by the tools that work on a labeled output after the run (filter, labeled shards,
report, gallery, COCO export, loader). Nothing here writes, and nothing here needs the
model: reading the tables imports neither torch nor the prompt code.
"""

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
from pycocotools import mask as mask_utils

from pipeline.storage import output
from pipeline.storage.output import IMAGES_DIR, MASKS_DIR
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


def class_names(store: Store | str) -> list[str] | None:
    """The class names of `store` by label_id, as its run recorded them (`classes.json`);
    None for outputs written before runs kept them."""
    return output.read_classes(as_store(store))


def decode_mask(mask: dict) -> np.ndarray:
    """The `[height, width]` bool array of a mask as the tables and `labels.json` hold it
    (COCO RLE: `size` [h, w] and `counts` as text)."""
    rle = {"size": list(mask["size"]), "counts": mask["counts"].encode()}
    return mask_utils.decode(rle).astype(bool)


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
