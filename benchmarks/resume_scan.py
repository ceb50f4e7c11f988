"""What reading an output directory's state costs the driver at corpus scale.

Every `gemlabel run` (and `filter`, `shards`) starts and ends with `pipeline.storage.output.scan`:
which (shard, key) rows exist, per-shard counts, the shards' stats. This writes a synthetic
output directory shaped like a real one (`--shards` shards of `--per-shard` images, one
images file and one masks file per `--rows-per-file` rows, `--masks` masks per image, every
shard complete but `--incomplete` of them), then prints the scan's time and peak memory
against reading the same columns with pyarrow alone, and the time of a second scan, which
finds the per-file counts the first one cached (what a resume pays):

    python -m benchmarks.resume_scan --shards 2000 --per-shard 1000

Each scan runs in a fresh process, so its peak RSS is its own.
"""

import argparse
import os
import posixpath
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from pipeline.storage import output
from pipeline.storage.schema import IMAGES_SCHEMA, MASKS_SCHEMA


def write_output(
    root: str, shards: int, per_shard: int, rows_per_file: int, masks: int, incomplete: int
) -> int:
    """A synthetic output directory; returns the number of image rows."""
    for name in (output.IMAGES_DIR, output.MASKS_DIR, output.SHARDS_DIR):
        os.makedirs(posixpath.join(root, name), exist_ok=True)
    rows = [
        (f"s3://bucket/shards/{s:06d}.tar", f"{s:06d}{i:05d}")
        for s in range(shards)
        for i in range(per_shard)
    ]
    for start in range(0, len(rows), rows_per_file):
        chunk = rows[start : start + rows_per_file]
        n = len(chunk)
        images = pa.table(
            {
                "key": [k for _, k in chunk],
                "shard": [s for s, _ in chunk],
                "width": [640] * n,
                "height": [480] * n,
                "status": ["ok"] * n,
                "error": [None] * n,
                "labels": [list(range(masks))] * n,
                "scores": [[0.5] * masks] * n,
            },
            schema=IMAGES_SCHEMA,
        )
        m = n * masks
        mask_table = pa.table(
            {
                "key": [k for _, k in chunk for _ in range(masks)],
                "shard": [s for s, _ in chunk for _ in range(masks)],
                "label_id": list(range(masks)) * n,
                "label": ["cat"] * m,
                "score": [0.5] * m,
                "mask": [{"size": [480, 640], "counts": "PPYo0"}] * m,
                "bbox": [[0.0, 0.0, 10.0, 10.0]] * m,
                "area": [100] * m,
            },
            schema=MASKS_SCHEMA,
        )
        name = f"{start:012d}.parquet"
        pq.write_table(mask_table, posixpath.join(root, output.MASKS_DIR, name), compression="zstd")
        pq.write_table(images, posixpath.join(root, output.IMAGES_DIR, name), compression="zstd")
    # the last `incomplete` shards claim one sample more than they have rows
    stats = [
        {
            "shard": f"s3://bucket/shards/{s:06d}.tar",
            "samples": per_shard + (s >= shards - incomplete),
            "damaged": False,
            "damage": None,
        }
        for s in range(shards)
    ]
    for start in range(0, shards, 1000):  # journals as a run writes them, a file per batch
        output.write_shard_stats(root, stats[start : start + 1000])
    return len(rows)


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_scan(root: str) -> tuple[float, float, int, int]:
    """(seconds, peak RSS MiB, complete shards, keys held) of `output.scan` in this process."""
    base = _peak_mib()
    start = time.perf_counter()
    state = output.scan(root)
    seconds = time.perf_counter() - start
    complete = sum(state.complete(s) for s in state.shards)
    return seconds, _peak_mib() - base, complete, sum(len(k) for k in state.done.values())


def time_read(root: str) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of reading the columns a scan needs, with pyarrow only."""
    base = _peak_mib()
    start = time.perf_counter()
    for name, columns in (
        (output.IMAGES_DIR, ["shard", "key", "status"]),
        (output.MASKS_DIR, ["shard"]),
    ):
        pds.dataset(posixpath.join(root, name), format="parquet").to_table(columns=columns)
    return time.perf_counter() - start, _peak_mib() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--rows-per-file", type=int, default=512)
    parser.add_argument("--masks", type=int, default=3, help="masks per image")
    parser.add_argument("--incomplete", type=int, default=10, help="shards left incomplete")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        rows = write_output(
            root, args.shards, args.per_shard, args.rows_per_file, args.masks, args.incomplete
        )
        print(
            f"wrote {rows:,} image rows, {rows * args.masks:,} mask rows, {args.shards} shards "
            f"({time.perf_counter() - start:.0f} s)"
        )
        with ProcessPoolExecutor(1) as pool:  # fresh processes: each peak RSS is its own
            read_s, read_mib = pool.submit(time_read, root).result()
        print(f"pyarrow read of the columns: {read_s:6.2f} s, peak +{read_mib:7.0f} MiB")
        scans = []
        for label in ("output.scan, first", "again (counts cached)"):
            with ProcessPoolExecutor(1) as pool:
                scans.append(pool.submit(time_scan, root).result())
            seconds, mib, complete, keys = scans[-1]
            print(
                f"{label + ':':28s} {seconds:6.2f} s, peak +{mib:7.0f} MiB "
                f"({complete} complete shards, {keys:,} keys held)"
            )
        print(
            f"first scan / read: {scans[0][0] / read_s:.2f}x time, "
            f"{scans[0][1] / max(read_mib, 1):.2f}x memory; "
            f"cached / first scan: {scans[1][0] / scans[0][0]:.3f}x time"
        )


if __name__ == "__main__":
    main()
