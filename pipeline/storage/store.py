"""`Store`: one output location (a local directory, `file://`, `s3://`, `gs://`, `memory://`
or any fsspec URL) and every read, write, listing and delete of it.

Rules that every command relies on:

- **Listings are never served from a cache.** s3fs and gcsfs keep a directory-listing
  cache per filesystem instance (and fsspec hands the same instance to every caller), so
  each `list` drops that directory's cached listing first and asks the store.
- **A written file appears whole or not at all.** On object stores where one PUT is atomic
  (S3, GCS, memory) a file is one PUT (`pipe_file`; a streamed file is one multipart
  upload, visible only once complete): no temp object, no copy, no delete. Elsewhere
  (local disks, shared mounts, other fsspec filesystems) it is written to a hidden temp
  name (`.<name>.<uuid>.tmp`) in its directory and moved into place.
- **`create` is exclusive**: of two writers creating one name, exactly one succeeds. S3
  `If-None-Match: *` and GCS `ifGenerationMatch=0` (s3fs/gcsfs `mode="create"`), a hard
  link on local disks (`link` fails when the name exists); memory: a process-wide lock.
"""

import contextlib
import os
import posixpath
import tempfile
import threading
import uuid
from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

TMP_SUFFIX = ".tmp"
ONE_PUT_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "memory")  # a single PUT is atomic there
_MEMORY_CREATE = threading.Lock()


def is_tmp(path: str) -> bool:
    """Whether `path` names a temp file of an unfinished write (`.<name>.<uuid>.tmp`)."""
    name = posixpath.basename(path)
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def _precondition_failed(err: Exception) -> bool:
    """Whether `err` is a store's answer to a create of a name that exists (HTTP 412)."""
    text = f"{type(err).__name__} {err}".lower()
    return any(s in text for s in ("precondition", "pre-condition", "412"))


class Store:
    """An output location opened once: its fsspec filesystem, its root, and the operations
    above. Paths taken and returned are the filesystem's own (`root/...`); `rel` arguments
    are relative to the root. Pickles as its URL (Ray tasks reopen it where they run)."""

    def __init__(self, url: str):
        self.url = url if "://" in url or "::" in url else os.path.abspath(url)
        self.fs, root = fsspec.core.url_to_fs(self.url)
        self.root = root.rstrip("/") or "/"
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.one_put = not self.local and any(p in ONE_PUT_PROTOCOLS for p in protocols)

    def __reduce__(self):
        return Store, (self.url,)

    def __eq__(self, other) -> bool:
        return isinstance(other, Store) and (type(self.fs), self.root) == (
            type(other.fs),
            other.root,
        )

    def __hash__(self) -> int:
        return hash((type(self.fs), self.root))

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def path(self, *parts: str) -> str:
        """The filesystem path of `parts` under the root."""
        return posixpath.join(self.root, *parts)

    def child(self, *parts: str) -> "Store":
        """The location `parts` below this one."""
        return Store(self.display(*parts))

    def display(self, *parts: str) -> str:
        """`parts` under the root as the user would write it (with its `s3://`-like prefix)."""
        path = self.path(*parts)
        return path if self.local else self.fs.unstrip_protocol(path)

    # listings --------------------------------------------------------------------------

    def _entries(self, directory: str) -> list[dict]:
        self.fs.invalidate_cache(directory)
        try:
            return self.fs.ls(directory, detail=True)
        except FileNotFoundError:
            return []

    def ls(self, rel: str = "", suffix: str = "", temp: bool = False) -> list[str]:
        """The files directly in directory `rel` whose names end in `suffix`, sorted, asked
        of the store now (never a cached listing); temp files of unfinished writes only
        with `temp`."""
        files = (  # some S3 servers list an emptied prefix as an object ending in "/"
            e["name"]
            for e in self._entries(self.path(rel))
            if e.get("type", "file") == "file" and not e["name"].endswith("/")
        )
        return sorted(p for p in files if p.endswith(suffix) and is_tmp(p) == temp)

    def exists(self, rel: str) -> bool:
        """Whether `rel` exists now (asked of the store, not of a cached listing)."""
        path = self.path(rel)
        self.fs.invalidate_cache(path)
        return self.fs.exists(path)

    # reads -----------------------------------------------------------------------------

    def read(self, rel_or_path: str) -> bytes:
        """The bytes of a file (one GET); FileNotFoundError when there is none."""
        return self.fs.cat_file(self._resolve(rel_or_path))

    def read_many(self, paths: list[str]) -> dict[str, bytes]:
        """The bytes of several files, fetched concurrently on object stores."""
        return self.fs.cat(list(paths), on_error="raise") if paths else {}

    def read_text(self, rel: str) -> str | None:
        """A text file's content, or None when it does not exist."""
        try:
            return self.read(rel).decode("utf-8")
        except FileNotFoundError:
            return None

    def read_table(
        self, rel_or_path: str, columns: list[str] | None = None, schema: pa.Schema | None = None
    ) -> pa.Table:
        """A Parquet file read whole in one GET (`columns` of it)."""
        data = self.read(rel_or_path)
        return pq.read_table(pa.BufferReader(data), columns=columns, schema=schema)

    @contextlib.contextmanager
    def open_read(self, rel_or_path: str) -> Iterator:
        """A binary file object of a file, streamed (for tars and large files)."""
        with self.fs.open(self._resolve(rel_or_path), "rb") as f:
            yield f

    def dataset(self, paths: list[str], schema: pa.Schema) -> pds.Dataset:
        """A pyarrow dataset over Parquet files of this store (an empty one for none)."""
        if not paths:
            return pds.dataset(schema.empty_table())
        return pds.dataset(list(paths), format="parquet", filesystem=self.fs, schema=schema)

    # writes ----------------------------------------------------------------------------

    def write(self, rel_or_path: str, data: bytes) -> None:
        """Write a whole file atomically (see the module doc): readers see the old file, or
        none, or all of `data`."""
        path = self._resolve(rel_or_path)
        if self.one_put:
            self.fs.pipe_file(path, data)
            return
        with self._temp(path) as tmp:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)

    def write_text(self, rel: str, text: str) -> None:
        """`write` of UTF-8 text."""
        self.write(rel, text.encode("utf-8"))

    def write_table(self, rel_or_path: str, table: pa.Table) -> None:
        """`write` of a zstd-compressed Parquet file."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.write(rel_or_path, sink.getvalue().to_pybytes())

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator:
        """A binary file object whose content appears at `rel` atomically on a clean exit
        (on object stores spooled to a local temp file, then one upload: a PUT, or one
        multipart upload for large files; temp + move elsewhere); nothing appears when the
        block raises."""
        path = self.path(rel)
        if self.one_put:
            with tempfile.NamedTemporaryFile(prefix="gemlabel-") as f:
                yield f
                f.flush()
                self.fs.put_file(f.name, path)
            return
        with self._temp(path) as tmp:
            with self.fs.open(tmp, "wb") as f:
                yield f
            self.fs.mv(tmp, path)

    def create(self, rel: str, data: bytes) -> bool:
        """Create `rel` with `data` only if no file has that name: True if this call created
        it, False if it existed. Exclusive: of concurrent creates, exactly one gets True."""
        path = self.path(rel)
        if self.local:
            with self._temp(path) as tmp:
                self.fs.pipe_file(tmp, data)
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return False
            return True
        if self.fs.protocol in ("memory", ("memory",)):
            with _MEMORY_CREATE:
                if self.fs.exists(path):
                    return False
                self.fs.pipe_file(path, data)
                return True
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except OSError as err:
            if _precondition_failed(err):
                return False
            raise
        return True

    # deletes ---------------------------------------------------------------------------

    def delete(self, paths: list[str]) -> None:
        """Delete files (batched on object stores); files already gone are ignored."""
        if not paths:
            return
        try:
            self.fs.rm(list(paths))
        except FileNotFoundError:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(path)

    def delete_tree(self, rel: str) -> None:
        """Delete `rel` and everything below it, if it exists."""
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)

    def find_temp(self, rel: str = "") -> list[str]:
        """Temp files of unfinished writes below `rel` (none on one-PUT stores)."""
        if self.one_put:
            return []
        directory = self.path(rel)
        self.fs.invalidate_cache(directory)
        try:
            return sorted(p for p in self.fs.find(directory) if is_tmp(p))
        except FileNotFoundError:
            return []

    # helpers ---------------------------------------------------------------------------

    def _resolve(self, rel_or_path: str) -> str:
        if rel_or_path.startswith(self.root.rstrip("/") + "/") or rel_or_path == self.root:
            return rel_or_path
        return self.path(rel_or_path)

    @contextlib.contextmanager
    def _temp(self, path: str) -> Iterator[str]:
        directory, name = posixpath.split(path)
        self.fs.makedirs(directory, exist_ok=True)
        tmp = posixpath.join(directory, f".{name}.{uuid.uuid4().hex}{TMP_SUFFIX}")
        try:
            yield tmp
        finally:
            with contextlib.suppress(FileNotFoundError):
                if self.fs.exists(tmp):
                    self.fs.rm_file(tmp)


def split_file(url: str) -> tuple[Store, str]:
    """The Store of the directory holding file `url` (a path or URL) and the file's name."""
    directory, name = posixpath.split(url.rstrip("/"))
    if not name:
        raise ValueError(f"not a file path: {url!r}")
    return Store(directory or "."), name


def as_store(location: "Store | str") -> Store:
    """`location` as a Store (a path or URL is opened; a Store is returned as it is), so the
    Python API takes either while commands open each location once."""
    return location if isinstance(location, Store) else Store(location)
