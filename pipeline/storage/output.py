"""The output directory: layout, the resume scan and the manifest (on a `Store`).

```
OUT/
  manifest.json        the run: configuration, inputs, per-shard completion, counts, versions
  classes.json         the run's class names, a JSON list indexed by `label_id`
  images/<h>.parquet   one row per input sample (pipeline.storage.schema.IMAGES_SCHEMA)
  masks/<h>.parquet    its twin: the mask rows of the same samples (absent when it has none)
  _shards/<t>.json     stats of shards read to their end, journaled by the driver as the
                       readers report them: a list per file (t: time-ordered id); older
                       outputs hold one stats object per shard (`<sha1(url)>.json`)
  _gemlabel/scan.arrow each committed file's row counts per shard, and the stats of the
                       complete shards, kept by `scan` (Arrow IPC; outputs of earlier
                       versions kept it as `_scan.parquet`: read when the new one is
                       absent, replaced by the next scan that saves)
  _gemlabel/progress.json  the running driver's counts (pipeline.tools.progress)
  _lock/<n>.json       the run writing here now (pipeline.storage.lock)
```

Every file appears atomically (`Store.write`). A write stage writes the masks file first
and the images file last, so an images file commits its keys: a key is done iff it has a
row in `images/`. A masks file without its images twin is an orphan of an interrupted
write: `scan` leaves it out of every count, and `remove_leftovers` deletes it (and temp
files of unfinished writes) once no writer can still be working on it (see
docs/architecture.md, "Deletes"). A shard is complete when its stats file exists and
`images/` holds all its samples. One run at a time writes an output (pipeline.storage.lock).
"""

import json
import posixpath
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import pyarrow as pa

from pipeline.storage.store import Store, as_store

IMAGES_DIR = "images"
MASKS_DIR = "masks"
SHARDS_DIR = "_shards"
MANIFEST = "manifest.json"
CLASSES = "classes.json"  # the class names by label_id, written by the run before any table
# Only the tables end in .parquet: readers of OUT/<table>/ and globs of OUT/**/*.parquet get
# exactly their rows. What is not a table, the manifest, the class names, the stats or the
# lock lives in STATE_DIR (the scan cache; by default gemlabel report and view write there).
STATE_DIR = "_gemlabel"
SCAN_CACHE = f"{STATE_DIR}/scan.arrow"  # committed files' row counts, complete shards' stats
OLD_SCAN_CACHE = "_scan.parquet"  # the same as Parquet, where earlier versions kept it
# what --overwrite deletes: a run's results (the lock, the report and the gallery stay)
RESULTS = (IMAGES_DIR, MASKS_DIR, SHARDS_DIR, MANIFEST, CLASSES, SCAN_CACHE, OLD_SCAN_CACHE)
READ_THREADS = 8  # files a scan reads at once
T = TypeVar("T")


class ConfigMismatchError(ValueError):
    """The output directory holds results of a run with a different configuration."""


def write_shard_stats(store: Store | str, stats: list[dict]) -> tuple[str, str]:
    """Journal fully read shards (each `stats["shard"]` its URL) in one new file of
    `OUT/_shards/` (one PUT, however many shards); return its name and text. Files sort by
    time: where two name one shard, the later counts."""
    store = as_store(store)
    name = posixpath.join(SHARDS_DIR, f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json")
    text = json.dumps(stats, sort_keys=True)
    store.write_text(name, text)
    return name, text


def _stats_of(text: str) -> list[dict]:
    """The shard stats in a stats file: a journal (a list) or one shard's (an object)."""
    stats = json.loads(text)
    return stats if isinstance(stats, list) else [stats]


@dataclass
class OutputState:
    """What an output directory holds: committed rows and fully read shards."""

    rows: dict[str, int] = field(default_factory=dict)  # shard -> its rows in images/
    done: dict[str, set[str]] = field(default_factory=dict)  # those keys, incomplete shards only
    errors: dict[str, int] = field(default_factory=dict)  # shard -> error rows
    masks: dict[str, int] = field(default_factory=dict)  # shard -> mask rows
    shards: dict[str, dict] = field(default_factory=dict)  # shard -> its stats file

    def complete(self, shard: str) -> bool:
        """Whether every sample of `shard` has its row in images/."""
        stats = self.shards.get(shard)
        return stats is not None and self.rows.get(shard, 0) >= stats["samples"]


def per_file(paths: list[str], read: Callable[[str], T]) -> list[T]:
    """`read(path)` for every file, by a few threads (object stores answer slowly but in
    parallel); `read` should reduce its file to something small."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(read, paths))


def _counts(store: Store | str, path: str, columns: list[str]) -> Counter:
    """Rows per distinct value of `columns` in one parquet file."""
    table = store.read_table(path, columns)
    groups = table.group_by(columns).aggregate([(columns[0], "count")])
    values = zip(*(groups[c].to_pylist() for c in columns), strict=True)
    return Counter(dict(zip(values, groups[f"{columns[0]}_count"].to_pylist(), strict=True)))


def _total(counts: Iterable[Counter]) -> Counter:
    total = Counter()
    for c in counts:
        total.update(c)
    return total


def _keys(store: Store | str, path: str, shards: set[str]) -> list[tuple[str, str]]:
    """The (shard, key) rows of one parquet file that belong to `shards`."""
    table = store.read_table(path, ["shard", "key"])
    rows = zip(table["shard"].to_pylist(), table["key"].to_pylist(), strict=True)
    return [(shard, key) for shard, key in rows if shard in shards]


_CACHE_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("shard", pa.string()),
        ("status", pa.string()),
        ("rows", pa.int64()),
        ("stats", pa.string()),  # a stats file's text (its row: file, shard and this)
    ]
)


def _load_cache(store: Store) -> tuple[dict[str, Counter], dict[str, str], bool]:
    """Per committed file (`images/<h>.parquet`, `masks/<h>.parquet`), its rows per (shard,
    status) or (shard,) as the last scan counted them; per stats file whose shards were all
    complete then (`_shards/<t>.json`), its text. Empty when there is no readable cache.
    The flag: whether it was read from `OLD_SCAN_CACHE` (there was no `SCAN_CACHE`)."""
    old = False
    try:
        try:
            table = pa.ipc.open_file(pa.BufferReader(store.read(SCAN_CACHE))).read_all()
        except FileNotFoundError:  # an output of an earlier version, or none yet
            table, old = store.read_table(OLD_SCAN_CACHE, schema=_CACHE_SCHEMA), True
        table = table.cast(_CACHE_SCHEMA)
    except (OSError, ValueError, pa.ArrowException):
        return {}, {}, False
    cache: dict[str, Counter] = {}
    stats: dict[str, str] = {}
    for name, shard, status, n, text in zip(*table.to_pydict().values(), strict=True):
        if text is not None:
            stats[name] = text
        else:
            cache.setdefault(name, Counter())[(shard,) if status is None else (shard, status)] = n
    return cache, stats, old


def _save_cache(
    store: Store | str, cache: dict[str, Counter], stats: dict[str, str], old: bool = False
) -> None:
    """Write `SCAN_CACHE` (under the output's lock); with `old`, then delete the cache of
    the previous layout it replaces."""
    store = as_store(store)
    columns = {name: [] for name in _CACHE_SCHEMA.names}
    for name, counts in cache.items():
        for key, n in counts.items():
            columns["file"].append(name)
            columns["shard"].append(key[0])
            columns["status"].append(key[1] if len(key) > 1 else None)
            columns["rows"].append(n)
            columns["stats"].append(None)
    for name, text in stats.items():
        columns["file"].append(name)
        columns["shard"].append(None)
        columns["status"].append(None)
        columns["rows"].append(0)
        columns["stats"].append(text)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_file(sink, _CACHE_SCHEMA, options=options) as writer:
        writer.write_table(pa.table(columns, schema=_CACHE_SCHEMA))
    store.write(SCAN_CACHE, sink.getvalue().to_pybytes())
    if old:
        store.delete([store.path(OLD_SCAN_CACHE)])


def _name(path: str) -> str:
    """`images/<h>.parquet` of a table file's path."""
    return posixpath.join(*path.split("/")[-2:])


def _file_counts(
    store: Store | str, paths: list[str], columns: list[str], known: dict[str, Counter]
) -> dict[str, Counter]:
    """Rows per distinct value of `columns` for each file, from `known` where it has the
    file (a committed file never changes: a retried write rewrites the same rows)."""
    todo = [path for path in paths if _name(path) not in known]
    counted = dict(zip(todo, per_file(todo, lambda p: _counts(store, p, columns)), strict=True))
    return {_name(p): counted[p] if p in counted else known[_name(p)] for p in paths}


def _listing(store: Store) -> tuple[list[str], list[str], list[str]]:
    """The images files, the masks files with their images twin, and the orphan masks
    files, asked of the store now. Masks are listed first: a masks file written after that
    listing is not counted even if its twin appears before the images listing."""
    masks = store.ls(MASKS_DIR, ".parquet")
    images = store.ls(IMAGES_DIR, ".parquet")
    committed = {posixpath.basename(p) for p in images}
    twinned = [p for p in masks if posixpath.basename(p) in committed]
    return images, twinned, [p for p in masks if posixpath.basename(p) not in committed]


def table_files(store: Store | str) -> tuple[list[str], list[str]]:
    """The committed images files and the masks files that have their images twin, asked
    of the store now (orphan masks files are left out)."""
    images, masks, _ = _listing(as_store(store))
    return images, masks


def _stats_texts(
    store: Store, reported: dict[str, str], cached: dict[str, str], fresh: bool
) -> dict[str, str]:
    """The text of every shard stats file: from the cache or what this run `reported`
    (a complete shard's stats never change), else read from the store. `fresh`: the output
    is new to this run, so its stats files are the reported ones (nothing is listed)."""
    if fresh:
        names = list(reported)
    else:
        names = [_name(p) for p in store.ls(SHARDS_DIR, ".json")]
    texts = {
        name: cached.get(name, reported.get(name))
        for name in names
        if name in cached or name in reported
    }
    todo = [store.path(name) for name in names if name not in texts]
    for path, data in store.read_many(todo).items():  # concurrent on object stores
        texts[_name(path)] = data.decode()
    return texts


def _read_done_keys(store: Store, state: OutputState, image_counts: dict[str, Counter]) -> None:
    """Add to `state` the done keys of the shards a resume reads again (not complete), read
    from the images files that hold them (`image_counts`: file -> Counter of (shard,
    status)); their row counts become the keys' counts."""
    incomplete = {shard for shard in state.rows if not state.complete(shard)}
    holding = [
        path for path, counts in image_counts.items() if {shard for shard, _ in counts} & incomplete
    ]
    for rows in per_file(holding, lambda path: _keys(store, path, incomplete)):
        for shard, key in rows:
            state.done.setdefault(shard, set()).add(key)
    state.rows.update({shard: len(keys) for shard, keys in state.done.items()})


def scan(
    store: Store | str,
    known: dict[str, Counter] | None = None,
    stats: dict[str, str] | None = None,
    save: bool = False,
    listing: tuple[list[str], list[str]] | None = None,
    fresh: bool = False,
) -> OutputState:
    """Read the state of `store`: per-shard counts and stats, and the done keys of the
    shards that are not complete (what a resume skips). Each file is read and counted on
    its own, so memory grows with the numbers of files and shards, not of rows (apart from
    the keys of the incomplete shards). Orphan masks files are left out; nothing is deleted.

    Files counted before are not read again: their counts come from `known` (what this
    run's writers reported: `images/<h>.parquet` -> Counter of (shard, status), masks
    files -> Counter of (shard,)) or the cache (`SCAN_CACHE`, else `OLD_SCAN_CACHE`); nor are
    the stats files whose shards were all complete at the last scan, or that this run wrote
    (`stats`: file name -> text). With `save` (only under the output's lock), that cache is
    updated. `listing`: the (images, masks) files, listed just before by the caller.
    `fresh`: the output was new to this run, so it holds no cache and no stats files but
    `stats` (neither is asked of the store)."""
    store = as_store(store)
    state = OutputState()
    images, masks = listing or table_files(store)
    cache, cached_stats, old_cache = ({}, {}, False) if fresh else _load_cache(store)
    counts_known = {**cache, **(known or {})}
    texts = _stats_texts(store, stats or {}, cached_stats, fresh)
    shards_of = {}
    for name in sorted(texts):  # later journals override earlier ones
        found = _stats_of(texts[name])
        state.shards.update((s["shard"], s) for s in found)
        shards_of[name] = [s["shard"] for s in found]
    image_counts = _file_counts(store, images, ["shard", "status"], counts_known)
    mask_counts = _file_counts(store, masks, ["shard"], counts_known)
    for (shard, status), n in _total(image_counts.values()).items():
        state.rows[shard] = state.rows.get(shard, 0) + n
        state.errors[shard] = state.errors.get(shard, 0) + (n if status != "ok" else 0)
    state.masks = {shard: n for (shard,), n in _total(mask_counts.values()).items()}
    _read_done_keys(store, state, dict(zip(images, image_counts.values(), strict=True)))
    counts = {**image_counts, **mask_counts}
    complete = {
        name: text
        for name, text in texts.items()
        if all(state.complete(shard) for shard in shards_of[name])
    }
    if save and (counts != cache or complete != cached_stats or old_cache):
        _save_cache(store, counts, complete, old=old_cache)  # moves an old layout's cache
    return state


def remove_leftovers(store: Store | str) -> tuple[list[str], list[str]]:
    """Delete what writers that died left behind: temp files of unfinished writes (stores
    without atomic PUTs) and masks files without their images twin. Only while no writer
    can be working on `store`: under its lock, after this run's stream has ended (see
    docs/architecture.md, "Deletes"). Returns what is left: `table_files`' listing."""
    store = as_store(store)
    images, masks, orphans = _listing(store)
    store.delete(orphans + store.find_temp())
    return images, masks


def discard_unreported(
    store: Store | str,
    listing: tuple[list[str], list[str]],
    written: dict[str, Counter],
    existing: frozenset[str],
) -> tuple[tuple[list[str], list[str]], list[str]]:
    """Delete the images files (and their masks twins) in `listing` that are neither
    `existing` (there before the run) nor `written` (reported back to the driver, named
    `images/<h>.parquet`): written by a task lost with its node, whose rows a re-run wrote
    again, perhaps batched otherwise. Only after a complete stream (every row came back in
    a reported file), under the lock. Returns the listing without them, and their names."""
    images, masks = listing
    stray = [path for path in images if path not in existing and _name(path) not in written]
    if not stray:
        return listing, []
    names = {posixpath.basename(path) for path in stray}
    twins = [path for path in masks if posixpath.basename(path) in names]
    as_store(store).delete(stray + twins)
    left = [p for p in images if p not in stray], [p for p in masks if p not in twins]
    return left, sorted(_name(path) for path in stray)


def read_manifest(store: Store | str) -> dict | None:
    """The manifest of `store`, or None when there is none."""
    store = as_store(store)
    text = store.read_text(MANIFEST)
    return json.loads(text) if text is not None else None


class NotAnOutputError(ValueError):
    """A location given as an output holds no gemlabel output."""


def require_output(store: Store | str) -> dict | None:
    """Check that `store` holds a gemlabel output: a manifest, or committed `images/` files
    (at most one GET and one LIST). Return the manifest (None for tables without one);
    raise NotAnOutputError naming the location and what was expected otherwise."""
    store = as_store(store)
    try:
        manifest = read_manifest(store)
    except ValueError:
        raise NotAnOutputError(
            f"{store.display(MANIFEST)} is not a gemlabel manifest (not JSON)"
        ) from None
    if manifest is not None or store.ls(IMAGES_DIR, ".parquet"):
        return manifest
    what = "is not a gemlabel output" if store.exists("") else "does not exist"
    raise NotAnOutputError(
        f"{store.display()} {what}: expected the --out of a gemlabel run "
        f"({MANIFEST} and {IMAGES_DIR}/*.parquet)"
    )


def write_classes(store: Store | str, names: list[str]) -> None:
    """Write `OUT/classes.json`: `names[label_id]` is the class of that id (one name per
    line), so readers of the tables need neither the vocabulary file nor the model."""
    store = as_store(store)
    store.write_text(CLASSES, json.dumps(list(names), indent=0, ensure_ascii=False) + "\n")


def read_classes(store: Store | str) -> list[str] | None:
    """The class names of `store` by label_id (`OUT/classes.json`), or None for an output
    written before runs kept them."""
    store = as_store(store)
    text = store.read_text(CLASSES)
    return json.loads(text) if text is not None else None


def write_manifest(store: Store | str, manifest: dict) -> None:
    """Atomically (re)write `OUT/manifest.json`."""
    store = as_store(store)
    store.write_text(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def config_differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two manifest `config` sections."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def prepare(store: Store | str, config: dict, overwrite: bool = False) -> bool:
    """Make `store` ready for a run with output `config` (the manifest's `config` section);
    return whether it holds earlier results (a manifest: a run writes it before any table).

    An existing output made with another configuration raises ConfigMismatchError, unless
    `overwrite`, which deletes its tables, stats and manifest first."""
    store = as_store(store)
    old = read_manifest(store)
    if old is not None and old.get("config") != config:
        if not overwrite:
            diffs = "\n  ".join(config_differences(old.get("config", {}), config))
            raise ConfigMismatchError(
                f"{store.display()} holds results of a run with a different configuration:"
                f"\n  {diffs}\n"
                "Use another --out, or pass --overwrite to delete those results and start over."
            )
    if overwrite:
        for name in RESULTS:
            store.delete_tree(name)
    return old is not None and not overwrite


def shard_report(state: OutputState, shards: list[str]) -> dict[str, dict]:
    """Per-shard completion and counts of `shards` for the manifest."""
    report = {}
    for shard in shards:
        stats = state.shards.get(shard, {})
        report[shard] = {
            "complete": state.complete(shard),
            "samples": stats.get("samples"),
            "images": state.rows.get(shard, 0),
            "errors": state.errors.get(shard, 0),
            "masks": state.masks.get(shard, 0),
            "damaged": stats.get("damaged", False),
            "damage": stats.get("damage"),
        }
    return report


def totals(state: OutputState) -> dict[str, int]:
    """Counts over everything in the output tables."""
    images = sum(state.rows.values())
    errors = sum(state.errors.values())
    return {
        "images": images,
        "ok": images - errors,
        "errors": errors,
        "masks": sum(state.masks.values()),
    }
