"""CPU cost of the decode stage per JPEG: full decode vs the reduced-scale decode it uses.

For each source size, a toy scene saved as a JPEG (quality 90) is decoded and resized to
the model input (a) at full size (`decode_image`, then `gem.resize_rgb`) and (b) as the
decode stage does it (`decode_scaled`: libjpeg's DCT scaling down to no less than the
input size, then the same resize). Prints ms per image, the ratio and the mean absolute
pixel difference of the model inputs, measured in one run.

    python benchmarks/jpeg_decode.py [--sizes 640x480,1920x1080,4032x3024] [--image-size 448]
"""

import argparse
import io
import time

import numpy as np

import gem
from gem.toy.scenes import render_scene
from pipeline.decode import decode_image, decode_scaled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="640x480,1920x1080,4032x3024")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    size = (args.image_size, args.image_size)

    def full(data: bytes):
        return gem.resize_rgb(decode_image(data), size)

    def scaled(data: bytes):
        return gem.resize_rgb(decode_scaled(data, min_size=size)[0], size)

    print(f"JPEG -> {args.image_size}x{args.image_size} model input, one thread")
    for source in args.sizes.split(","):
        width, height = map(int, source.split("x"))
        out = io.BytesIO()
        render_scene(0, 0, width, height)[0].save(out, "JPEG", quality=90)
        data = out.getvalue()
        ms = {}
        for name, decode in (("full", full), ("scaled", scaled)):
            decode(data)
            start = time.perf_counter()
            for _ in range(args.repeats):
                decode(data)
            ms[name] = (time.perf_counter() - start) / args.repeats * 1000
        diff = np.abs(np.asarray(full(data), int) - np.asarray(scaled(data), int)).mean()
        print(
            f"{source:>10s} full {ms['full']:7.1f} ms  scaled {ms['scaled']:7.1f} ms  "
            f"ratio {ms['full'] / ms['scaled']:4.2f}  mean |diff| {diff:.2f} levels"
        )


if __name__ == "__main__":
    main()
