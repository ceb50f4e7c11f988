"""The output directory: layout, atomic files, the resume scan and the manifest.

```
OUT/
  manifest.json        the run: configuration, inputs, per-shard completion, counts, versions
  images/<h>.parquet   one row per input sample (pipeline.storage.schema.IMAGES_SCHEMA)
  masks/<h>.parquet    its twin: the mask rows of the same samples (absent when it has none)
  _shards/<h>.json     per-shard stats, written by the reader when it reaches a shard's end
  _scan.parquet        each committed file's row counts per shard, and the stats of the
                       complete shards, kept by `scan`
  _lock.json           the run writing here now (pipeline.storage.lock), while it runs
```

Every file is written to a hidden temp name (`.<name>.<uuid>.tmp`) in its directory and
moved into place. A write stage writes the masks file first and the images file last, so
an images file commits its keys: a key is done iff it has a row in `images/`. A masks file
without its images twin is an orphan from an interrupted write and is removed by `scan`.
A shard is complete when its stats file exists and `images/` holds all its samples.
One run at a time writes an output (`pipeline.storage.lock`): a second would relabel the same keys.
"""

import hashlib
import json
import posixpath
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

IMAGES_DIR = "images"
MASKS_DIR = "masks"
SHARDS_DIR = "_shards"
MANIFEST = "manifest.json"
TMP_SUFFIX = ".tmp"
SCAN_CACHE = "_scan.parquet"  # committed files' row counts, complete shards' stats
READ_THREADS = 8  # files a scan reads at once
T = TypeVar("T")


class ConfigMismatchError(ValueError):
    """The output directory holds results of a run with a different configuration."""


def open_output(out: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of an output location (a local path or fsspec URL)."""
    fs, root = fsspec.core.url_to_fs(out)
    return fs, root.rstrip("/") or "/"


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see either no file or the whole file."""
    directory, name = posixpath.split(path)
    tmp = posixpath.join(directory, f".{name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    fs.makedirs(directory, exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def shard_id(shard: str) -> str:
    """A stable file-name-safe id of a shard URL."""
    return hashlib.sha1(shard.encode()).hexdigest()[:20]


def write_shard_stats(out: str, stats: dict) -> None:
    """Record a fully read shard (`stats["shard"]` its URL) in `OUT/_shards/`."""
    fs, root = open_output(out)
    path = posixpath.join(root, SHARDS_DIR, f"{shard_id(stats['shard'])}.json")
    atomic_write(fs, path, json.dumps(stats, sort_keys=True).encode())


@dataclass
class OutputState:
    """What an output directory holds: committed rows and fully read shards."""

    rows: dict[str, int] = field(default_factory=dict)  # shard -> its rows in images/
    done: dict[str, set[str]] = field(default_factory=dict)  # those keys, incomplete shards only
    errors: dict[str, int] = field(default_factory=dict)  # shard -> error rows
    masks: dict[str, int] = field(default_factory=dict)  # shard -> mask rows
    shards: dict[str, dict] = field(default_factory=dict)  # shard -> its stats file
    removed: list[str] = field(default_factory=list)  # orphans and temp files deleted

    def complete(self, shard: str) -> bool:
        """Whether every sample of `shard` has its row in images/."""
        stats = self.shards.get(shard)
        return stats is not None and self.rows.get(shard, 0) >= stats["samples"]


def _files(fs, directory: str, suffix: str) -> list[str]:
    if not fs.isdir(directory):
        return []
    return sorted(p for p in fs.ls(directory, detail=False) if p.endswith(suffix))


def _is_tmp(path: str) -> bool:
    name = posixpath.basename(path)
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def per_file(paths: list[str], read: Callable[[str], T]) -> list[T]:
    """`read(path)` for every file, by a few threads (object stores answer slowly but in
    parallel); `read` should reduce its file to something small."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(read, paths))


def read_columns(fs, path: str, columns: list[str]) -> pa.Table:
    """`columns` of one parquet file."""
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).read(columns=columns)


def _counts(fs, path: str, columns: list[str]) -> Counter:
    """Rows per distinct value of `columns` in one parquet file."""
    groups = read_columns(fs, path, columns).group_by(columns).aggregate([(columns[0], "count")])
    values = zip(*(groups[c].to_pylist() for c in columns), strict=True)
    return Counter(dict(zip(values, groups[f"{columns[0]}_count"].to_pylist(), strict=True)))


def _total(counts: Iterable[Counter]) -> Counter:
    total = Counter()
    for c in counts:
        total.update(c)
    return total


def _keys(fs, path: str, shards: set[str]) -> list[tuple[str, str]]:
    """The (shard, key) rows of one parquet file that belong to `shards`."""
    table = read_columns(fs, path, ["shard", "key"])
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


def _load_cache(fs, path: str) -> tuple[dict[str, Counter], dict[str, str]]:
    """Per committed file (`images/<h>.parquet`, `masks/<h>.parquet`), its rows per (shard,
    status) or (shard,) as the last scan counted them; per stats file of a shard that was
    complete then (`_shards/<h>.json`), its text. Empty when there is no readable cache."""
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, schema=_CACHE_SCHEMA)
    except (OSError, pa.ArrowException):
        return {}, {}
    cache: dict[str, Counter] = {}
    stats: dict[str, str] = {}
    for name, shard, status, n, text in zip(*table.to_pydict().values(), strict=True):
        if text is not None:
            stats[name] = text
        else:
            cache.setdefault(name, Counter())[(shard,) if status is None else (shard, status)] = n
    return cache, stats


def _save_cache(fs, path: str, cache: dict[str, Counter], stats: dict[str, str]) -> None:
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
        columns["shard"].append(json.loads(text)["shard"])
        columns["status"].append(None)
        columns["rows"].append(0)
        columns["stats"].append(text)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns, schema=_CACHE_SCHEMA), sink, compression="zstd")
    atomic_write(fs, path, sink.getvalue().to_pybytes())


def _file_counts(
    fs, paths: list[str], columns: list[str], cache: dict[str, Counter]
) -> dict[str, Counter]:
    """Rows per distinct value of `columns` for each file, from `cache` where it has the
    file (a committed file never changes: a retried write rewrites the same rows)."""
    name = {path: posixpath.join(*path.split("/")[-2:]) for path in paths}
    todo = [path for path in paths if name[path] not in cache]
    counted = dict(zip(todo, per_file(todo, lambda p: _counts(fs, p, columns)), strict=True))
    return {name[p]: counted[p] if p in counted else cache[name[p]] for p in paths}


def scan(out: str, cleanup: bool = True) -> OutputState:
    """Read the state of `out`: per-shard counts and stats, and the done keys of the shards
    that are not complete (what a resume skips). Each file is read and counted on its own,
    so memory grows with the numbers of files and shards, not of rows (apart from the keys
    of the incomplete shards).

    Files counted by an earlier scan are not read again (their counts are kept in
    `OUT/_scan.parquet`), so a resume reads only what was written since, plus the files that
    hold incomplete shards; nor are the stats files of shards that were complete then.

    With `cleanup`, first delete leftover temp files and orphan masks files (only safe while
    no job writes to `out`), and update that cache."""
    fs, root = open_output(out)
    state = OutputState()
    images_dir, masks_dir = posixpath.join(root, IMAGES_DIR), posixpath.join(root, MASKS_DIR)
    if cleanup:
        for directory in (root, images_dir, masks_dir, posixpath.join(root, SHARDS_DIR)):
            for path in _files(fs, directory, TMP_SUFFIX):
                if _is_tmp(path):
                    fs.rm(path)
                    state.removed.append(path)
    images = [p for p in _files(fs, images_dir, ".parquet") if not _is_tmp(p)]
    masks = [p for p in _files(fs, masks_dir, ".parquet") if not _is_tmp(p)]
    committed = {posixpath.basename(p) for p in images}
    orphans = [p for p in masks if posixpath.basename(p) not in committed]
    if cleanup:
        for path in orphans:
            fs.rm(path)
            state.removed.append(path)
        masks = [p for p in masks if p not in orphans]
    cache_path = posixpath.join(root, SCAN_CACHE)
    cache, cached_stats = _load_cache(fs, cache_path)
    # a complete shard's stats never change: read only the stats files not cached
    stats_files = [
        posixpath.join(SHARDS_DIR, posixpath.basename(p))
        for p in _files(fs, posixpath.join(root, SHARDS_DIR), ".json")
        if not _is_tmp(p)
    ]
    texts = {name: cached_stats[name] for name in stats_files if name in cached_stats}
    todo = [posixpath.join(root, name) for name in stats_files if name not in cached_stats]
    for path, data in fs.cat(todo).items() if todo else ():  # concurrent on object stores
        texts[posixpath.join(SHARDS_DIR, posixpath.basename(path))] = data.decode()
    shard_of = {}
    for name, text in texts.items():
        stats = json.loads(text)
        state.shards[stats["shard"]] = stats
        shard_of[name] = stats["shard"]
    image_counts = _file_counts(fs, images, ["shard", "status"], cache)
    mask_counts = _file_counts(fs, masks, ["shard"], cache)
    for (shard, status), n in _total(image_counts.values()).items():
        state.rows[shard] = state.rows.get(shard, 0) + n
        state.errors[shard] = state.errors.get(shard, 0) + (n if status != "ok" else 0)
    state.masks = {shard: n for (shard,), n in _total(mask_counts.values()).items()}
    # keys only for the shards a resume reads again, from the files that hold them
    incomplete = {shard for shard in state.rows if not state.complete(shard)}
    holding = [
        path
        for path, counts in zip(images, image_counts.values(), strict=True)
        if {shard for shard, _ in counts} & incomplete
    ]
    for rows in per_file(holding, lambda path: _keys(fs, path, incomplete)):
        for shard, key in rows:
            state.done.setdefault(shard, set()).add(key)
    state.rows.update({shard: len(keys) for shard, keys in state.done.items()})
    counts = {**image_counts, **mask_counts}
    complete = {name: text for name, text in texts.items() if state.complete(shard_of[name])}
    if cleanup and (counts != cache or complete != cached_stats):
        _save_cache(fs, cache_path, counts, complete)
    return state


def read_manifest(out: str) -> dict | None:
    """The manifest of `out`, or None when there is none."""
    fs, root = open_output(out)
    path = posixpath.join(root, MANIFEST)
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None


def write_manifest(out: str, manifest: dict) -> None:
    """Atomically (re)write `OUT/manifest.json`."""
    fs, root = open_output(out)
    data = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write(fs, posixpath.join(root, MANIFEST), data.encode())


def config_differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two manifest `config` sections."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def prepare(out: str, config: dict, overwrite: bool = False) -> None:
    """Make `out` ready for a run with output `config` (the manifest's `config` section).

    An existing output made with another configuration raises ConfigMismatchError, unless
    `overwrite`, which deletes its tables, stats and manifest first."""
    fs, root = open_output(out)
    old = read_manifest(out)
    if old is not None and old.get("config") != config:
        if not overwrite:
            diffs = "\n  ".join(config_differences(old.get("config", {}), config))
            raise ConfigMismatchError(
                f"{out} holds results of a run with a different configuration:\n  {diffs}\n"
                "Use another --out, or pass --overwrite to delete those results and start over."
            )
    if overwrite:
        for name in (IMAGES_DIR, MASKS_DIR, SHARDS_DIR, MANIFEST, SCAN_CACHE):
            path = posixpath.join(root, name)
            if fs.exists(path):
                fs.rm(path, recursive=True)
    fs.makedirs(root, exist_ok=True)


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
