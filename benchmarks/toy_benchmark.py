"""The synthetic benchmark: `gemlabel run` with the toy model on generated scene shards,
the Parquet masks scored against the scenes' exact ground truth (mIoU per method).

Every stage is in the loop (decode with EXIF, resize, the model, upsampling, RLE, the
tables), so a transposed mask or a resize slip anywhere shows up as a lower number. The
toy model was trained with dense supervision: the numbers check the plumbing and say
nothing about how the methods compare on real CLIP weights.

    python -m benchmarks.toy_benchmark --work /tmp/toy-bench --count 100
"""

import argparse
import json
import os
import time

import numpy as np
import pyarrow.compute as pc
from pycocotools import mask as mask_utils

from gem.toy.scenes import CLASSES, label_map_from_json, write_scene_shards, write_vocab
from pipeline.config import RunConfig
from pipeline.run import run
from pipeline.stages.read import expand_inputs
from pipeline.storage.output import IMAGES_DIR, MASKS_DIR
from pipeline.storage.tables import match_sources, read_table
from pipeline.tools.labeled_shards import iter_samples

METHODS = ("gem", "clip", "maskclip", "clip_surgery")
# The labeling settings of the benchmark (and of `make demo`): the toy's input size, as
# many classes as a scene has objects, disjoint masks where a class beats the background
# prompt (the toy was trained against "a photo of a background.").
SETTINGS = {
    "model": "gemlabel-toy",
    "image_size": (64, 64),
    "top_k": 4,
    "score_threshold": 0.1,
    "mask_mode": "background",
}


def score(out: str, sources: list[str]) -> dict:
    """Per-class IoU of the masks in `out` against the ground truth (`<key>.json`) in
    `sources`, intersections and unions summed over all images (an image without an ok
    row predicts nothing); mIoU over the classes that occur in truth or prediction."""
    sources = expand_inputs(sources)
    masks = read_table(out, MASKS_DIR, ["shard", "key", "label", "mask"])
    shards = read_table(out, IMAGES_DIR, ["shard"])["shard"].unique().to_pylist()
    where = {source: shard for shard, source in match_sources(shards, sources).items()}
    inter, union = np.zeros(len(CLASSES)), np.zeros(len(CLASSES))
    images = 0
    for source in sources:
        shard = where.get(source, source)
        rows = masks.filter(pc.equal(masks["shard"], shard)).to_pylist()
        by_key: dict[str, list[dict]] = {}
        for row in rows:
            by_key.setdefault(row["key"], []).append(row)
        for key, members in iter_samples(source):
            truth = label_map_from_json(json.loads(dict(members)["json"]))
            pred = np.zeros((len(CLASSES), *truth.shape), dtype=bool)
            for row in by_key.get(key, []):
                rle = dict(row["mask"], counts=row["mask"]["counts"].encode())
                pred[CLASSES.index(row["label"])] |= mask_utils.decode(rle).astype(bool)
            gt = truth[None] == np.arange(len(CLASSES))[:, None, None]
            inter += (pred & gt).sum((1, 2))
            union += (pred | gt).sum((1, 2))
            images += 1
    valid = union > 0
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=valid)
    return {
        "miou": round(float(iou[valid].mean()), 4) if valid.any() else None,
        "images": images,
        "per_class": {CLASSES[c]: round(float(iou[c]), 4) for c in np.flatnonzero(valid)},
    }


def write_benchmark_data(
    work: str,
    count: int,
    seed: int = 2000,
    min_size: int = 64,
    max_size: int = 160,
    per_shard: int = 50,
) -> tuple[list[str], str]:
    """Held-out scene shards (sizes in [min_size, max_size], a quarter EXIF-rotated JPEGs)
    and the vocabulary file under `work`."""
    shards = write_scene_shards(
        os.path.join(work, "shards"), count, per_shard, seed, min_size, max_size, exif_fraction=0.25
    )
    return shards, write_vocab(os.path.join(work, "vocab.txt"))


def run_benchmark(
    work: str, count: int = 200, methods=METHODS, num_cpus: int | None = None, **settings
) -> dict[str, dict]:
    """Label the benchmark shards with each method and score them: method -> score()."""
    shards, vocab = write_benchmark_data(work, count)
    results = {}
    for method in methods:
        out = os.path.join(work, f"out-{method}")
        config = RunConfig(
            inputs=shards,
            vocab=vocab,
            out=out,
            method=method,
            overwrite=True,
            num_cpus=num_cpus,
            **{**SETTINGS, **settings},
        )
        start = time.time()
        run(config)
        results[method] = {**score(out, shards), "seconds": round(time.time() - start, 1)}
    return results


def format_table(results: dict[str, dict]) -> str:
    """A Markdown table: method, mIoU, images."""
    lines = ["| method | mIoU | images |", "|---|---|---|"]
    lines += [f"| {m} | {r['miou']:.3f} | {r['images']} |" for m, r in results.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="mIoU of the toy model per method on synthetic scenes")
    p.add_argument("--work", default="out/toy-benchmark", help="shards and outputs go here")
    p.add_argument("--count", type=int, default=100, help="number of scenes")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--num-cpus", type=int, default=None)
    args = p.parse_args(argv)
    results = run_benchmark(args.work, args.count, args.methods, args.num_cpus)
    print(format_table(results))


if __name__ == "__main__":
    main()
