"""CPU time per image of the pipeline's CPU stages, and the cores a GPU's rate needs.

The decode stage (`decode_batch`: JPEG decode, EXIF, resize to the model input) and the
write stage (`write_batch`: masks upsampled to the original size, COCO RLE, both Parquet
tables) on batches of toy-scene JPEGs, one thread, without Ray or a model: the labeling
actor's output is stood in for by random patch logits of `--k` kept classes on the grid
of a ViT-B/16 at the input size. Prints ms per image per stage and the CPU cores that a GPU
labeling `--rate` images/s needs for both (Ray's own per-batch costs not included).

    python benchmarks/cpu_stages.py [--source-size 640x480] [--image-size 448] [--k 5]
"""

import argparse
import io
import tempfile
import time

import numpy as np
import torch

from gem.toy.scenes import render_scene
from pipeline.stages.decode import decode_batch
from pipeline.stages.write import write_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-size", default="640x480", help="WxH of the JPEGs")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--k", type=int, default=5, help="kept classes per image")
    parser.add_argument("--mask-mode", default="threshold")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rate", type=float, default=1000.0, help="images/s to keep up with")
    args = parser.parse_args()
    torch.set_num_threads(1)
    width, height = map(int, args.source_size.split("x"))
    grid = args.image_size // 16
    rng = np.random.default_rng(0)
    jpegs = []
    for i in range(args.batch):
        out = io.BytesIO()
        render_scene(i, 0, width, height)[0].save(out, "JPEG", quality=90)
        jpegs.append(out.getvalue())
    n = args.batch

    def column(values) -> np.ndarray:
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array

    batch = {
        "shard": column(["shard-000000.tar"] * n),
        "key": column([f"{i:06d}" for i in range(n)]),
        "image": column(jpegs),
        "image_ext": column(["jpg"] * n),
        "error": column([None] * n),
    }
    labeled = {
        "labels": column([np.arange(args.k, dtype=np.int32)] * n),
        "scores": column([np.linspace(0.9, 0.1, args.k, dtype=np.float32)] * n),
        "logits": column(
            [rng.normal(size=(args.k, grid, grid)).astype(np.float32) for _ in range(n)]
        ),
        "node": column([""] * n),
    }
    names = [f"class {i}" for i in range(args.k)]
    size = (args.image_size, args.image_size)
    seconds = {"decode": 0.0, "write": 0.0}
    with tempfile.TemporaryDirectory() as out:
        for round_ in range(args.batches + 1):  # the first round warms up
            start = time.perf_counter()
            decoded = decode_batch(dict(batch), size)
            middle = time.perf_counter()
            rows = {k: decoded[k] for k in ("shard", "key", "width", "height", "error")}
            write_batch(rows | labeled, out, names, 0.5, args.mask_mode)
            end = time.perf_counter()
            if round_:
                seconds["decode"] += middle - start
                seconds["write"] += end - middle
    images = n * args.batches
    print(
        f"{args.source_size} JPEGs -> {args.image_size} px input, {args.k} classes "
        f"({args.mask_mode}), batches of {n}, one thread"
    )
    for name, s in (*seconds.items(), ("both", sum(seconds.values()))):
        ms = s / images * 1000
        cores = ms * args.rate / 1000
        print(f"{name:>7s} {ms:7.2f} ms/image  {cores:5.1f} cores for {args.rate:.0f} images/s")


if __name__ == "__main__":
    main()
