"""Cost of each method's forward (and of PAMR) relative to a plain CLIP image forward, in
one run.

ViT-B-16 (OpenAI layout, QuickGELU) with random weights (speed needs no trained weights)
at 448 x 448, batch 4, fp32, on CPU unless CUDA is there. Rounds are interleaved (every
method once per round) so machine noise hits all alike; medians over rounds. "plain CLIP"
is open_clip's `encode_image`; each method is `gem.GEM(...)(images, text)`: its patch
logits for 5 classes. PAMR: one image at 448 x 448, the top-5 classes' maps, 10
iterations, dilations (8, 16).

    python -m benchmarks.ovss_cost [--size 448] [--batch 4] [--rounds 5]
"""

import argparse
import statistics
import time

import open_clip
import torch

import gem

METHODS = ("clip", "gem", "sclip", "clearclip", "naclip")


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16-quickgelu")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--classes", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # fp32 as the methods are specified
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    clip = open_clip.create_model(args.model, force_image_size=args.size, device=device).eval()
    models = {m: gem.GEM(clip, method=m).eval() for m in METHODS}
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    dim = clip.visual.proj.shape[1]
    text = torch.nn.functional.normalize(torch.randn(args.classes, dim, device=device), dim=-1)
    image = torch.randn(1, 3, args.size, args.size, device=device)
    masks = torch.randn(1, args.classes, args.size, args.size, device=device)

    runs = {
        "plain CLIP": lambda: clip.encode_image(x),
        **{m: (lambda m=m: models[m](x, text)) for m in METHODS},
        "pamr": lambda: gem.pamr(image, masks),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in runs.items():
                times[name].append(timed(fn))
    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["plain CLIP"]
    print(
        f"{args.model} random weights, {args.size}x{args.size}, batch {args.batch}, {device}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds"
    )
    print(f"{'':<22}{'ms/batch':>10}{'x plain CLIP':>14}")
    for name in ("plain CLIP", *METHODS):
        print(f"{name:<22}{median[name] * 1000:>10.1f}{median[name] / base:>14.3f}")
    per_image = median["pamr"]
    print(
        f"PAMR, 1 image, top-{args.classes}: {per_image * 1000:.1f} ms per image "
        f"({per_image / (base / args.batch):.3f}x a plain CLIP forward per image)"
    )


if __name__ == "__main__":
    main()
