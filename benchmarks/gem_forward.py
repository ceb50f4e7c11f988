"""GEM forward cost relative to a plain CLIP image forward, measured in one run.

ViT-B-16 with random weights (speed needs no trained weights) at 448 x 448, batch 4,
fp32 on CPU by default. GEM and CLIP runs are interleaved so machine noise hits both.
Also prints the cost of patch logits for 20 vs 1,000 classes (the per-class work after
the forward) and the arithmetic floor of docs/gem.md ("Cost") for comparison.

    python benchmarks/gem_forward.py [--model ViT-B-16] [--size 448] [--batch 4] [--repeats 5]
"""

import argparse
import statistics
import time

import open_clip
import torch

import gem


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    clip = open_clip.create_model(args.model, force_image_size=args.size, device=device).eval()
    model = gem.GEM(clip).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)

    with torch.inference_mode():
        runs = {"clip": [], "gem": []}
        clip.encode_image(x), model.encode_image(x)  # warm-up
        for _ in range(args.repeats):
            runs["clip"] += timed(lambda: clip.encode_image(x), 1)
            runs["gem"] += timed(lambda: model.encode_image(x), 1)
        clip_t, gem_t = (statistics.median(runs[k]) for k in ("clip", "gem"))

        features = model.encode_image(x)
        dim = features.patch_embeds.shape[-1]
        heat = {}
        for classes in (20, 1000):
            text = torch.nn.functional.normalize(torch.randn(classes, dim, device=device), dim=-1)
            heat[classes] = statistics.median(
                timed(lambda text=text: gem.patch_logits(features.patch_embeds, text), args.repeats)
            )

    blocks = clip.visual.transformer.resblocks
    n = (args.size // clip.visual.patch_size[0]) ** 2 + 1
    width = clip.visual.conv1.out_channels
    clip_mac = len(blocks) * (12 * n * width**2 + 2 * n**2 * width)
    gem_mac = clip_mac + model.depth * 10 * n**2 * width
    print(
        f"{args.model} random weights, {args.size}x{args.size}, batch {args.batch}, {device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"plain CLIP forward   {clip_t * 1000:9.1f} ms  ({args.batch / clip_t:.2f} img/s)")
    print(f"GEM forward          {gem_t * 1000:9.1f} ms  ({args.batch / gem_t:.2f} img/s)")
    print(
        f"GEM / CLIP           {gem_t / clip_t:9.3f}   (arithmetic floor {gem_mac / clip_mac:.3f})"
    )
    print(f"patch logits, 20 classes    {heat[20] * 1000:8.2f} ms per batch")
    print(
        f"patch logits, 1000 classes  {heat[1000] * 1000:8.2f} ms per batch "
        f"({heat[1000] / gem_t:.1%} of the GEM forward)"
    )


if __name__ == "__main__":
    main()
