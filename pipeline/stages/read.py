"""Reading WebDataset shards: input expansion and the reader of one shard (the run's Ray Data
datasource, pipeline.dataset.ShardDatasource, is one read task per shard of `read_shard`;
Ray is not imported here, so the tools that read shards do not load Ray Data).

A shard is read by a chain of small generators: `tar_members` (the tar's data members) ->
`group_samples` (samples) -> `read_shard` (row blocks). Members are grouped into samples as
webdataset does (key = member path up to the first dot of its basename, extension = the
rest, lower-cased; `__*__` meta members skipped). Member
bytes are never decoded here and nothing is ever unpickled: `pick_image_member` chooses
the image by extension and only that member's bytes travel on.

Rows: `shard` (the URL after expansion), `key`, `image`, `image_ext`, `error`. Failures are
rows, not exceptions:

- a shard that cannot be opened: one row with key "" and "read: cannot open shard ...";
- a shard that is not a tar: one row with key "" and "read: not a readable tar ...";
- a truncated or corrupt tar: the samples before the damage are yielded as usual, the sample
  being read when the damage is hit becomes an error row (key "" if none was started), and
  the shard is recorded as damaged;
- a sample without an image member, or with two members of the same name: an error row;
- members of a key that reappear after other keys (the tar is not grouped by key): the
  first group is the sample; later members of that key are ignored and listed in the shard's
  stats (`split_keys`), so (shard, key) stays unique.

When the reader reaches the end of a shard it reports the shard's stats (`samples`: rows
the shard yields in total, including keys skipped as already done) to the driver, which
journals them in the output (pipeline.storage.output.write_shard_stats).
"""

import io
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
from braceexpand import braceexpand

from pipeline.stages.decode import pick_image_member
from pipeline.storage.schema import READ_SCHEMA

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_GLOB = re.compile(r"[*?\[]")
_META = re.compile(r"__[^/]*__($|/)")
# webdataset's key/extension split (webdataset.tariterators.base_plus_ext, whose package
# imports torch): the key is the path up to the first dot of the basename
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
MAX_SPLIT_KEYS = 100  # how many non-contiguous keys a shard's stats list


def _has_protocol(path: str) -> bool:
    return "://" in path


def _expand_one(item: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(item)
    remote = _has_protocol(item)

    def name(p: str) -> str:
        return fs.unstrip_protocol(p) if remote else p

    if _GLOB.search(path):
        matches = sorted(p for p in fs.glob(path) if p.endswith(TAR_SUFFIXES))
        if not matches:
            raise ValueError(f"no shards (.tar files) match {item!r}")
        return [name(p) for p in matches]
    if not item.endswith(TAR_SUFFIXES) and not item.startswith(("http://", "https://")):
        if fs.isdir(path):
            found = sorted(p for p in fs.find(path) if p.endswith(TAR_SUFFIXES))
            if not found:
                raise ValueError(f"directory {item!r} holds no shards (.tar files)")
            return [name(p) for p in found]
    return [item if remote else path]


def expand_inputs(inputs: list[str]) -> list[str]:
    """Shard URLs from user inputs, in order, without duplicates.

    Each input is a local path, a directory (its .tar files, recursively), a glob or any
    fsspec URL (file://, s3://, gs://, http(s)://, ...); brace ranges such as
    `data/{000000..000099}.tar` are expanded first. Local paths become absolute (workers may
    run elsewhere); URLs are kept as given. A path that does not exist is kept: the reader
    reports it as an error row. A glob or directory without shards raises ValueError."""
    shards: dict[str, None] = {}
    for item in inputs:
        for expanded in braceexpand(item):
            for shard in _expand_one(expanded):
                shards.setdefault(shard, None)
    return list(shards)


def _stream_options(shard: str) -> dict:
    # HTTP: stream the body instead of random access (needs no Range support, no buffering)
    return {"block_size": 0} if shard.startswith(("http://", "https://")) else {}


class _Rows:
    """Accumulates rows of one shard and cuts them into bounded blocks."""

    def __init__(self, shard: str, rows_per_block: int, bytes_per_block: int):
        self.shard = shard
        self.rows_per_block, self.bytes_per_block = rows_per_block, bytes_per_block
        self.columns: dict[str, list] = {name: [] for name in READ_SCHEMA.names}
        self.nbytes = 0

    def add(self, key: str, image=None, ext=None, error=None) -> None:
        values = (self.shard, key, image, ext, error)
        for name, value in zip(READ_SCHEMA.names, values, strict=True):
            self.columns[name].append(value)
        self.nbytes += len(image or b"")

    def full(self) -> bool:
        rows = len(self.columns["key"])
        return rows >= self.rows_per_block or self.nbytes >= self.bytes_per_block

    def take(self) -> pa.Table:
        table = pa.Table.from_pydict(self.columns, schema=READ_SCHEMA)
        self.columns = {name: [] for name in READ_SCHEMA.names}
        self.nbytes = 0
        return table


def tar_members(stream) -> Iterator[tuple[str, str, io.BufferedReader]]:
    """A WebDataset tar's data members in tar order as `(key, ext, file)`, streamed: regular
    files only, meta members (`__...__`) and names without an extension skipped. Read a
    member's `file` before taking the next one (or leave it unread: it is skipped)."""
    tar = tarfile.open(fileobj=stream, mode="r|*")
    for info in tar:
        tar.members = []  # stream mode keeps every TarInfo otherwise
        if not info.isreg() or _META.match(info.name):
            continue
        split = _KEY_EXT.match(info.name)
        if split:
            yield split[1], split[2], tar.extractfile(info)


@dataclass
class TarKeys:
    """What `group_samples` has met in a tar so far: every key in tar order (`seen`), the
    key whose members it is reading (`current`; None between samples and while it skips
    a key's later members) and the keys whose members reappeared after other keys
    (`split`, at most MAX_SPLIT_KEYS)."""

    seen: dict[str, None] = field(default_factory=dict)
    current: str | None = None
    split: list[str] = field(default_factory=list)


def group_samples(
    members: Iterable[tuple[str, str, io.BufferedReader]],
    skip: frozenset[str] = frozenset(),
    keys: TarKeys | None = None,
) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """`tar_members` grouped into samples: `(key, [(ext, bytes), ...])` in tar order. A key's
    members that reappear after other keys are ignored (the first group is the sample);
    keys in `skip` are not yielded and their members not read. `keys` (a TarKeys) follows
    the grouping, also when the tar breaks off mid-sample."""
    keys = keys if keys is not None else TarKeys()
    group: list[tuple[str, bytes]] = []
    for name, ext, member in members:
        if name != keys.current:
            finished, sample, group = keys.current, group, []
            if name in keys.seen:  # not grouped by key: ignore the later members
                keys.current = None
                if name not in keys.split and len(keys.split) < MAX_SPLIT_KEYS:
                    keys.split.append(name)
            else:
                keys.current = name
                keys.seen[name] = None
            if finished is not None and finished not in skip:
                yield finished, sample
        if keys.current is not None and keys.current not in skip:
            group.append((ext, member.read()))
    if keys.current is not None and keys.current not in skip:
        yield keys.current, group


def _image_row(key: str, members: list[tuple[str, bytes]]) -> dict:
    """The read row of one sample: its image member, or the error that it has none or two
    members of one name (extensions compared lower-cased)."""
    by_ext: dict[str, bytes] = {}
    duplicate = None
    for ext, data in members:
        ext = ext.lower()
        if ext in by_ext:
            duplicate = ext
        by_ext[ext] = data
    if duplicate:
        return {"error": f"read: sample has two members named {duplicate!r}"}
    try:
        ext, image = pick_image_member(by_ext)
    except ValueError as err:
        return {"error": f"read: {err}"}
    return {"image": image, "ext": ext}


def read_shard(
    shard: str,
    done: frozenset[str] = frozenset(),
    rows_per_block: int = 128,
    bytes_per_block: int = 64 << 20,
    progress=None,
    on_end: Callable[[dict], None] | None = None,
) -> Iterator[pa.Table]:
    """Stream one shard's samples as READ_SCHEMA tables (see the module docstring).

    Keys in `done` are skipped (their member bytes are not even read). Once the end is
    reached, the shard's stats go to `progress` (pipeline.cluster.Progress, also ticked at
    each block) and to `on_end`, when given."""
    rows = _Rows(shard, rows_per_block, bytes_per_block)
    keys = TarKeys()
    damage = None
    opened = False
    try:
        with fsspec.open(shard, "rb", **_stream_options(shard)) as stream:
            opened = True
            for key, members in group_samples(tar_members(stream), done, keys):
                rows.add(key, **_image_row(key, members))
                if rows.full():
                    if progress is not None:
                        progress.tick.remote()
                    yield rows.take()
    except Exception as err:  # noqa: BLE001 - any failure of a shard is data, not a crash
        reason = f"{type(err).__name__}: {err}"
        if keys.seen:
            damage = f"read: shard truncated or corrupt while reading this sample: {reason}"
        elif not opened or isinstance(err, (FileNotFoundError, PermissionError)):
            damage = f"read: cannot open shard {shard}: {reason}"
        else:
            damage = f"read: not a readable tar: {shard}: {reason}"
        bad = keys.current if keys.current is not None else ""  # "": the shard itself
        if bad not in done:
            rows.add(bad, error=damage)
        keys.seen[bad] = None
    if rows.columns["key"]:
        yield rows.take()
    if progress is not None or on_end is not None:
        stats = {
            "shard": shard,
            "samples": len(keys.seen),
            "damaged": damage is not None,
            "damage": damage,
            "split_keys": keys.split,
        }
        if progress is not None:  # acknowledged: the stream ends after the driver has it
            import ray

            ray.get(progress.shard_end.remote(stats))
        if on_end is not None:
            on_end(stats)
