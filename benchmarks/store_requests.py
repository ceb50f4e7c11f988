"""Requests a run makes to an object store, per data file written and per run.

Starts SeaweedFS (S3) behind the tests' counting proxy (tests/object_stores.py, 127.0.0.1
only), runs `gemlabel run` on a 16-shard corpus (inputs on local disk, output on S3) in
its own process and Ray, and prints the requests by kind: every request counted, from
the driver and from Ray's workers. A data file is an images or masks Parquet file; the
shard stats files are counted as requests, not as data files.

    python -m benchmarks.store_requests [--shards 16] [--per-shard 8]
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.storage.output import IMAGES_DIR, MASKS_DIR, SHARDS_DIR
from pipeline.storage.store import Store
from tests import object_stores
from tests.shards import write_good_shards

RUN = "--image-size 32 --top-k 3 --batch-size 8 --decode-batch-size 8"
RUN += " --model gemlabel-tiny --pretrained random"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=8)
    parser.add_argument("--rows-per-file", type=int, help="default: one file per shard")
    parser.add_argument("--code", help="run the gemlabel of this checkout (e.g. an older one)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="store-requests-"))
    shards = write_good_shards(work / "shards", args.shards, args.per_shard)
    (work / "vocab.txt").write_text("cat\ndog\ncar\ntree\nsky\nperson\nbicycle\nboat\n")
    server = object_stores.SeaweedS3(["gemlabel"]).start()
    proxy = object_stores.CountingProxy(server.endpoint).start()
    try:
        env = {**os.environ, **object_stores.s3_env(proxy.url)}
        env.pop("RAY_ADDRESS", None)
        if args.code:
            env["PYTHONPATH"] = os.path.abspath(args.code)
        out = "s3://gemlabel/bench-out"
        cmd = [sys.executable, "-m", "jobs.cli", "run", *shards, "--vocab", str(work / "vocab.txt")]
        rows = args.rows_per_file or args.per_shard
        cmd += ["--out", out, "--rows-per-file", str(rows), "--num-cpus", "2"]
        proxy.log.reset()
        done = subprocess.run(
            cmd + RUN.split(), env=env, capture_output=True, text=True, cwd=args.code
        )
        if done.returncode != 0:
            raise SystemExit(f"gemlabel run failed:\n{done.stdout}\n{done.stderr}")
        proxy.log.settle()
        counts = proxy.log.counts
        os.environ.update(object_stores.s3_env(proxy.url))
        store = Store(out)
        files = {d: len(store.ls(d, ".parquet")) for d in (IMAGES_DIR, MASKS_DIR)}
        stats = len(store.ls(SHARDS_DIR, ".json"))
    finally:
        proxy.stop()
        server.stop()
    data_files = files[IMAGES_DIR] + files[MASKS_DIR]
    total = sum(counts.values())
    print(f"{args.shards} shards x {args.per_shard} images, output on S3 (SeaweedFS)")
    print(
        f"data files written: {data_files} ({files[IMAGES_DIR]} images, {files[MASKS_DIR]} masks)"
    )
    print(f"shard stats files: {stats}")
    print("requests by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"requests in all: {total}")
    print(f"requests per data file: {total / data_files:.2f} (goal <= 1.5)")
    print(f"requests per file written (data + stats): {total / (data_files + stats):.2f}")
    return {"requests": dict(counts), "data_files": data_files, "stats_files": stats}


if __name__ == "__main__":
    main()
