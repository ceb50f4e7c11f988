"""Whole-pipeline throughput vs a bare model loop, and driver memory vs shard count.

1. `gemlabel run` (pipeline.run.run on a local Ray) over generated shards, against a bare
   loop calling the same Labeler (same model, same code path) on the same images decoded
   beforehand, with as many torch threads as the pipeline's actor has CPUs. Printed as
   images/s of both and their ratio (goal >= 0.85 once fixed start-up costs amortize: use
   more images with --shards/--per-shard). The pipeline time includes actor start-up and
   model loading; Ray's own start-up is excluded (and an untimed one-shard run first starts
   its worker processes). A second, smaller run on the first quarter of the shards gives
   the marginal (steady-state) rate, (n_all - n_small) / (t_all - t_small), which cancels
   the fixed start-up costs a long job amortizes. The bare loop resizes images and makes
   masks on the actor when the pipeline does (--resize-stage actor, --mask-stage actor),
   and decodes JPEGs there with --jpeg-stage actor.
   `--actor-concurrency 1,2,1,2` runs the pipeline once per value, in that order, and
   prints the ratio of the medians of the largest and smallest value.
2. Peak driver memory (RSS above the level before the run) for --memory-shards runs of
   10 and 50 shards with the tiny model: it should stay flat, since data streams.

Defaults fit a 2-core CPU in a few minutes (ViT-B-16 with random weights at 224 px). On a
GPU machine (one actor per GPU; web-sized JPEGs; shards written and pre-decoded in parallel):

    python -m benchmarks.pipeline_overhead --size 448 --shards 32 --per-shard 256 \
        --batch-size 128 --source-size 640x480 --formats jpg --memory-per-shard 0 \
        --actor-concurrency 1,2,1,2
"""

import argparse
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch

from pipeline.config import JPEG_STAGES, MASK_STAGES, RESIZE_STAGES, RunConfig
from pipeline.prompts.bank import build
from pipeline.prompts.vocab import load_vocabulary
from pipeline.run import run
from pipeline.stages.decode import decode_batch
from pipeline.stages.label import Labeler
from pipeline.stages.read import read_shard
from tests.shards import write_good_shard, write_good_shards

VOCAB = ["cat", "dog", "car", "tree", "sky", "person", "bicycle", "boat", "road", "water"]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_during(fn) -> tuple[object, int]:
    """Run `fn`; return its result and the peak RSS above the level before it."""
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[0], rss_bytes()) - base


def decoded(shard: str, config: RunConfig) -> dict[str, np.ndarray]:
    """One shard read and decoded as the pipeline's decode stage does it."""
    table = pa.concat_tables(read_shard(shard))
    columns = {
        name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.schema.names
    }
    return decode_batch(columns, **asdict(config.decode_options()))


def bare_loop(config: RunConfig, shards: list[str]) -> tuple[int, float]:
    """Images and seconds of the Labeler alone on pre-decoded batches."""
    with ProcessPoolExecutor() as pool:
        parts = list(pool.map(partial(decoded, config=config), shards))
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    names = load_vocabulary(config.vocab)
    bank = build(names, config.model, config.pretrained, config.templates)
    labeler = Labeler(config.label_options(), bank.embeddings, bank.templates)
    n = len(rows["key"])
    batches = [
        {k: v[i : i + config.batch_size] for k, v in rows.items()}
        for i in range(0, n, config.batch_size)
    ]
    labeler(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        labeler(batch)
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=int, default=1)
    parser.add_argument("--memory-per-shard", type=int, default=2, help="0: skip part 2")
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs")
    parser.add_argument("--source-size", default=None, help="WxH of every image (default: mixed)")
    parser.add_argument("--formats", default="jpg,png,webp")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile in the actors")
    parser.add_argument("--mask-stage", default="writer", choices=MASK_STAGES)
    parser.add_argument("--resize-stage", default="decoder", choices=RESIZE_STAGES)
    parser.add_argument("--jpeg-stage", default="decoder", choices=JPEG_STAGES)
    parser.add_argument(
        "--actor-concurrency",
        type=lambda v: [int(c) for c in v.split(",")],
        default=[RunConfig.actor_concurrency],
        help="comma-separated values to compare in this run, interleaved (e.g. 1,2,1,2)",
    )
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel("ERROR")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
    root = Path(tempfile.mkdtemp(prefix="gemlabel-bench-"))
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    sizes = (tuple(map(int, args.source_size.split("x"))),) if args.source_size else None
    write = partial(
        write_good_shard,
        root / "shards",
        per_shard=args.per_shard,
        formats=tuple(args.formats.split(",")),
        **({"sizes": sizes} if sizes else {}),
    )
    with ProcessPoolExecutor() as pool:
        shards = list(pool.map(write, range(args.shards)))
    config = RunConfig(
        inputs=shards,
        vocab=str(vocab),
        out=str(root / "out"),
        model=args.model,
        pretrained="random",  # throughput needs no trained weights
        image_size=args.size,
        batch_size=args.batch_size,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        precision=args.precision,
        compile=args.compile,
        mask_stage=args.mask_stage,
        resize_stage=args.resize_stage,
        jpeg_stage=args.jpeg_stage,
        max_error_rate=1.0,
    )

    run(replace(config, inputs=shards[:1], out=str(root / "warm-up")))  # Ray workers, caches
    results = []
    for concurrency in args.actor_concurrency:
        c = replace(config, actor_concurrency=concurrency)
        quarter = shards[: max(1, len(shards) // 4)]
        tag = f"{len(results)}-{concurrency}"
        small = run(replace(c, inputs=quarter, out=str(root / f"small-{tag}")))
        whole = run(replace(c, out=str(root / f"out-{tag}")))
        marginal = (whole.images - small.images) / (whole.seconds - small.seconds)
        results.append((concurrency, whole, marginal))
    torch.set_num_threads(args.cpus_per_actor * args.actors)
    n, bare_seconds = bare_loop(config, shards)
    bare = n / bare_seconds
    print(
        f"model {args.model} (random weights) at {args.size} px, batch {args.batch_size}, "
        f"{n} images in {args.shards} shards, {args.actors} actor(s) x "
        f"{args.cpus_per_actor} CPU, images {args.source_size or 'mixed'} {args.formats}, "
        f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}"
    )
    print(f"bare loop {bare:8.2f} images/s ({bare_seconds:.1f} s, same Labeler, pre-decoded)")
    for concurrency, whole, marginal in results:
        print(
            f"--actor-concurrency {concurrency}: pipeline {whole.images_per_second:8.2f} "
            f"images/s ({whole.seconds:.1f} s, incl. actor start-up and model load), marginal "
            f"{marginal:8.2f} images/s (all shards minus the first quarter's run)"
        )
        print(
            f"  ratio pipeline / bare: {whole.images_per_second / bare:.2f} whole run, "
            f"{marginal / bare:.2f} marginal (goal >= 0.85)"
        )
    values = sorted(set(args.actor_concurrency))
    if len(values) > 1:  # medians over the rounds of each value
        median = {v: float(np.median([m for c, _, m in results if c == v])) for v in values}
        print(
            f"marginal, --actor-concurrency {values[-1]} / {values[0]}: "
            f"{median[values[-1]] / median[values[0]]:.2f}"
        )

    peaks = {}
    for count in (10, 50) if args.memory_per_shard else ():
        many = write_good_shards(root / f"mem{count}", count, args.memory_per_shard)
        mem_config = RunConfig(
            inputs=many,
            vocab=str(vocab),
            out=str(root / f"mem-out{count}"),
            model="gemlabel-tiny",
            pretrained="random",
            image_size=32,
            max_error_rate=1.0,
        )
        _, peaks[count] = peak_rss_during(lambda c=mem_config: run(c))
        print(f"driver peak RSS increase, {count} shards: {peaks[count] / 2**20:7.1f} MiB")
    if peaks:
        print(
            f"ratio 50 / 10 shards: {peaks[50] / max(peaks[10], 1):.2f} "
            "(flat: a few MiB either way)"
        )
    ray.shutdown()


if __name__ == "__main__":
    main()
