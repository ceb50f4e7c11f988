"""Pipeline images/s and peak Labeler actor memory with a small and a huge vocabulary.

`gemlabel run` (pipeline.run.run on one local Ray) over the same generated shards with
each vocabulary (default `voc`, 20 classes, and `imagenet21k`, 21,843), alternating for
--repeats rounds. Both prompt banks are built into the cache first (build times printed),
so the runs measure labeling only (actor start-up and model load included, identical for
both). Prints images/s per vocabulary (best round), the ratio large / small (goal >= 0.8)
and the peak RSS (VmHWM) of the Labeler actor processes in each run.

    python -m benchmarks.vocab_scaling [--model ViT-B-16] [--size 448] [--shards 4]
        [--per-shard 32] [--batch-size 16] [--vocabs voc,imagenet21k] [--repeats 2]

On a 2-core CPU use e.g. --size 224 --shards 2 --per-shard 8 --batch-size 4.
"""

import argparse
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch

from pipeline.config import RunConfig
from pipeline.prompts import bank as prompt_bank
from pipeline.prompts.vocab import load_vocabulary
from pipeline.run import run
from tests.shards import write_good_shards


def labeler_pids() -> set[int]:
    """Pids of the live Labeler actor processes."""
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"Labeler" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.add(int(pid))
        except OSError:  # the process ended meanwhile
            continue
    return pids


def peak_rss(pids: set[int]) -> int:
    """The largest VmHWM (peak RSS, bytes) among `pids`."""
    peak = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            continue
    return peak


def run_measured(config: RunConfig) -> tuple[float, int]:
    """Images/s of one run and its Labeler actors' peak RSS (sampled every 0.2 s; actors
    of earlier runs that are still shutting down are left out)."""
    earlier, peak, done = labeler_pids(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], peak_rss(labeler_pids() - earlier))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        summary = run(config)
    finally:
        done.set()
        sampler.join()
    assert summary.status == "complete", summary.format()
    return summary.images_per_second, peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--vocabs", default="voc,imagenet21k")
    parser.add_argument("--templates", default="single")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bank-cache", help="default: the user's prompt bank cache")
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(tempfile.mkdtemp(prefix="gemlabel-vocab-bench-"))
    shards = write_good_shards(root / "shards", args.shards, args.per_shard)
    vocabs = args.vocabs.split(",")
    for vocab in vocabs:
        started = time.perf_counter()
        names = load_vocabulary(vocab)
        _, path = prompt_bank.cached(
            names, args.model, None, args.templates, cache_dir=args.bank_cache
        )
        print(
            f"bank {vocab}: {len(names)} classes, ready in {time.perf_counter() - started:.1f}"
            f" s (built or loaded from the cache) -> {path}"
        )

    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel("ERROR")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="WARNING")
    rates: dict[str, list[float]] = {v: [] for v in vocabs}
    peaks: dict[str, int] = dict.fromkeys(vocabs, 0)
    for round_ in range(args.repeats):
        for vocab in vocabs:
            config = RunConfig(
                inputs=shards,
                vocab=vocab,
                out=str(root / f"out-{vocab}-{round_}"),
                model=args.model,
                pretrained="random",  # throughput needs no trained weights
                image_size=args.size,
                batch_size=args.batch_size,
                top_k=args.top_k,
                templates=args.templates,
                actors=1,
                bank_cache=args.bank_cache,
                max_error_rate=1.0,
            )
            rate, peak = run_measured(config)
            rates[vocab].append(rate)
            peaks[vocab] = max(peaks[vocab], peak)
            print(
                f"round {round_} {vocab:12s} {rate:8.2f} images/s, actor peak RSS "
                f"{peak / 2**20:7.0f} MiB"
            )
    ray.shutdown()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(
        f"{args.model} random weights, {args.size} px, batch {args.batch_size}, "
        f"{args.shards * args.per_shard} images, 1 actor, {device}"
    )
    for vocab in vocabs:
        print(
            f"{vocab:12s} best {max(rates[vocab]):8.2f} images/s, peak actor RSS "
            f"{peaks[vocab] / 2**20:7.0f} MiB"
        )
    small, large = vocabs[0], vocabs[-1]
    print(f"ratio {large} / {small}: {max(rates[large]) / max(rates[small]):.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
