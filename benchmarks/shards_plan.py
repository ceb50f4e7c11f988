"""What planning `gemlabel shards` costs the driver at corpus scale.

`write_labeled_shards` plans its output shards on the driver (`plan_shards`): per source
shard, how many samples of each kind, and which files hold them. This writes two synthetic
output directories (`benchmarks.resume_scan.write_output`: `--shards` complete shards of
`--per-shard` and of 10x `--per-shard` images), then prints, for each, the plan's time and
peak memory, and the peak memory of holding the same rows' (shard, key, status, labels)
as Python objects, as the plan did before it counted per file:

    python -m benchmarks.shards_plan --shards 1000 --per-shard 100

Each measurement runs in a fresh process, so its peak RSS is its own.
"""

import argparse
import json
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from benchmarks.resume_scan import write_output
from pipeline.storage import output
from pipeline.tools.labeled_shards import plan_shards


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_plan(root: str, samples_per_shard: int | None) -> tuple[float, float, int]:
    """(seconds, peak RSS MiB, output shards) of `plan_shards` in this process."""
    base = _peak_mib()
    start = time.perf_counter()
    jobs, _ = plan_shards(root, None, samples_per_shard=samples_per_shard)
    return time.perf_counter() - start, _peak_mib() - base, len(jobs)


def python_rows(root: str) -> float:
    """Peak RSS MiB of holding every images row's (shard, key, status, labels) in Python."""
    from pipeline.storage.tables import read_table

    base = _peak_mib()
    table = read_table(root, output.IMAGES_DIR, ["shard", "key", "status", "labels"])
    columns = [table[c].to_pylist() for c in table.column_names]
    del table
    rows = list(zip(*columns, strict=True))
    assert rows
    return _peak_mib() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--rows-per-file", type=int, default=512)
    parser.add_argument("--samples-per-shard", type=int, default=None)
    args = parser.parse_args()
    results = []
    for per_shard in (args.per_shard, 10 * args.per_shard):
        with tempfile.TemporaryDirectory() as root:
            rows = write_output(root, args.shards, per_shard, args.rows_per_file, 3, 0)
            with ProcessPoolExecutor(1) as pool:
                seconds, mib, jobs = pool.submit(time_plan, root, args.samples_per_shard).result()
            with ProcessPoolExecutor(1) as pool:
                held = pool.submit(python_rows, root).result()
            results.append((rows, seconds, mib, held))
            print(
                f"{rows:>10,} images: plan {seconds:6.2f} s, peak +{mib:6.0f} MiB, {jobs} "
                f"output shards; the rows as Python objects: peak +{held:6.0f} MiB"
            )
    (small, _, small_mib, small_held), (large, _, large_mib, large_held) = results
    print(
        json.dumps(
            {
                "rows": large / small,
                "plan_memory": round(large_mib / max(small_mib, 1), 2),
                "python_rows_memory": round(large_held / max(small_held, 1), 2),
            }
        )
    )


if __name__ == "__main__":
    main()
