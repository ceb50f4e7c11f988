"""CPU cost of the write stage's mask encoding per image, and the cores it takes to keep up.

`pipeline.stages.masks.encode_masks` (upsample the kept classes' patch logits to the original
size, threshold or argmax, COCO RLE, bbox, area) for each mask mode, on one thread, with
k classes of a 28x28 grid (ViT-B/16 at 448 px) upsampled to each image size. Prints ms per
image and the CPU cores that a GPU labeling `--rate` images/s needs for it.

    python benchmarks/mask_encoding.py [--k 5] [--sizes 640x480,1024x768] [--rate 1000]
"""

import argparse
import time
from functools import partial

import numpy as np
import torch

from pipeline.stages.masks import MASK_MODES, encode_masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5, help="kept classes per image")
    parser.add_argument("--grid", type=int, default=28)
    parser.add_argument("--sizes", default="640x480,1024x768")
    parser.add_argument("--rate", type=float, default=1000.0, help="images/s to keep up with")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(args.k, args.grid, args.grid)).astype(np.float32)
    background = rng.normal(size=(args.grid, args.grid)).astype(np.float32)
    labels, scores = np.arange(args.k), np.ones(args.k, np.float32)
    print(f"{args.k} classes from a {args.grid}x{args.grid} grid, one thread")
    for size in args.sizes.split(","):
        width, height = map(int, size.split("x"))
        for mode in MASK_MODES:
            encode = partial(
                encode_masks, logits, labels, scores, height, width, 0.5, mode, background
            )
            encode()
            start = time.perf_counter()
            for _ in range(args.repeats):
                encode()
            ms = (time.perf_counter() - start) / args.repeats * 1000
            print(
                f"{size:>10s} {mode:10s} {ms:7.2f} ms/image  "
                f"{ms * args.rate / 1000:5.1f} cores for {args.rate:.0f} images/s"
            )


if __name__ == "__main__":
    main()
