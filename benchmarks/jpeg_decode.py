"""CPU cost of the decode stage per JPEG: the plain way vs what the stage does.

For each source size, a toy scene saved as a JPEG (quality 90) is decoded and resized to
the model input in three ways: (a) `full`: a full decode (`decode_image`) and PIL's
bicubic resize (`gem.resize_rgb`); (b) `scaled`: libjpeg's DCT scaling down to no less
than the input size (`decode_scaled`), then PIL's resize; (c) `stage`, as the decode stage
does it: `decode_scaled`, then torch's uint8 bicubic kernel (`gem.resize_uint8`). Prints
ms per image, the ratios to (c) and the mean absolute pixel difference of the model
inputs to (a), measured in one run, on one thread.

    python benchmarks/jpeg_decode.py [--sizes 640x480,1920x1080,4032x3024] [--image-size 448]
"""

import argparse
import io
import time

import numpy as np
import torch

import gem
from gem.toy.scenes import render_scene
from pipeline.stages.decode import decode_image, decode_scaled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="640x480,1920x1080,4032x3024")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = (args.image_size, args.image_size)
    ways = {
        "full": lambda data: np.asarray(gem.resize_rgb(decode_image(data), size)),
        "scaled": lambda data: np.asarray(
            gem.resize_rgb(decode_scaled(data, min_size=size)[0], size)
        ),
        "stage": lambda data: gem.resize_uint8(
            torch.from_numpy(np.array(decode_scaled(data, min_size=size)[0])), size
        ).numpy(),
    }
    print(f"JPEG -> {args.image_size}x{args.image_size} model input, one thread")
    for source in args.sizes.split(","):
        width, height = map(int, source.split("x"))
        out = io.BytesIO()
        render_scene(0, 0, width, height)[0].save(out, "JPEG", quality=90)
        data = out.getvalue()
        ms, pixels = {}, {}
        for name, way in ways.items():
            pixels[name] = way(data).astype(int)
            start = time.perf_counter()
            for _ in range(args.repeats):
                way(data)
            ms[name] = (time.perf_counter() - start) / args.repeats * 1000
        print(
            f"{source:>10s} "
            + "  ".join(f"{name} {t:6.1f} ms" for name, t in ms.items())
            + f"  full/stage {ms['full'] / ms['stage']:4.2f}"
            + f"  scaled/stage {ms['scaled'] / ms['stage']:4.2f}"
            + "  mean |diff| to full: "
            + " ".join(
                f"{name} {np.abs(pixels[name] - pixels['full']).mean():.2f}"
                for name in ("scaled", "stage")
            )
        )


if __name__ == "__main__":
    main()
