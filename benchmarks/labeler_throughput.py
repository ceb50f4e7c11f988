"""Images/s of the labeling stage on one device, measured in one run.

ViT-B-16 with random weights at 448 px by default. Prints, for the same batches:
- plain CLIP image forward (open_clip, inputs already on the device),
- GEM forward + top-k class selection + patch logits ("model only"),
- the `pipeline.label.Labeler` stage as the Ray actor runs it: uint8 host batches,
  pinned-memory copy, normalization on the device, autocast, top-k against the prompt bank,
  patch logits of the kept classes back on the host; with a small (20) and a large
  (21,843) bank, so the cost of vocabulary size shows as a ratio.

    python benchmarks/labeler_throughput.py [--batch 64] [--iters 10] [--precision auto]
"""

import argparse
import time

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

import gem
from pipeline.label import Labeler, resolve_precision


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rate(fn, batch: int, iters: int) -> float:
    """Images/s of `fn` over `iters` calls after two warm-up calls."""
    fn(), fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--vocab-sizes", default="20,21843")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_precision(args.precision, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    size = (args.size, args.size)

    torch.manual_seed(0)
    clip = open_clip.create_model(args.model, force_image_size=args.size, device=device).eval()
    model = gem.GEM(clip).eval()
    dim = clip.visual.output_dim
    x = torch.randn(args.batch, 3, *size, device=device)
    bank = F.normalize(torch.randn(20, dim, device=device), dim=-1)

    def gem_model_only():
        with autocast:
            features = model.encode_image(x)
        image = F.normalize(features.image_embeds.float(), dim=-1)
        top = (image @ bank.T).topk(args.top_k, dim=-1).indices
        return gem.patch_logits(features.patch_embeds.float(), bank[top])

    def clip_forward():
        with autocast:
            return clip.encode_image(x)

    print(
        f"{args.model} random weights, {args.size}px, batch {args.batch}, {device} "
        f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), {dtype}"
    )
    with torch.inference_mode():
        clip_rate = rate(clip_forward, args.batch, args.iters)
        gem_rate = rate(gem_model_only, args.batch, args.iters)
    print(f"plain CLIP forward            {clip_rate:10.1f} img/s")
    print(
        f"GEM model only (+top-k, logits) {gem_rate:8.1f} img/s   GEM/CLIP time "
        f"{clip_rate / gem_rate:.3f}"
    )

    pixels = np.random.default_rng(0).integers(0, 256, (args.batch, *size, 3), dtype=np.uint8)
    batch = {
        "shard": np.array(["s"] * args.batch, dtype=object),
        "key": np.array([str(i) for i in range(args.batch)], dtype=object),
        "width": np.full(args.batch, 640),
        "height": np.full(args.batch, 480),
        "error": np.array([None] * args.batch, dtype=object),
        "pixels": pixels,
    }
    rates = {}
    for classes in (int(v) for v in args.vocab_sizes.split(",")):
        labeler = Labeler(
            model=args.model,
            pretrained=None,
            method="gem",
            gem_options={},
            bank=F.normalize(torch.randn(classes, dim), dim=-1).numpy(),
            top_k=args.top_k,
            score_threshold=0.0,
            image_size=size,
            precision=args.precision,
        )
        rates[classes] = rate(lambda labeler=labeler: labeler(batch), args.batch, args.iters)
        print(f"Labeler stage, {classes:6d} classes {rates[classes]:10.1f} img/s")
        if device.type == "cuda":
            print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if args.compile:
        compiled = Labeler(
            model=args.model,
            pretrained=None,
            method="gem",
            gem_options={},
            bank=F.normalize(torch.randn(20, dim), dim=-1).numpy(),
            top_k=args.top_k,
            score_threshold=0.0,
            image_size=size,
            precision=args.precision,
            compile=True,
        )
        start = time.perf_counter()
        compiled(batch)
        print(f"torch.compile warm-up {time.perf_counter() - start:.1f} s")
        compiled_rate = rate(lambda: compiled(batch), args.batch, args.iters)
        print(
            f"Labeler stage, compiled, 20 classes {compiled_rate:8.1f} img/s "
            f"({compiled_rate / rates[min(rates)]:.3f} x eager)"
        )
    small, large = sorted(rates)[0], sorted(rates)[-1]
    print(f"Labeler {large} / {small} classes: {rates[large] / rates[small]:.3f}")
    print(f"Labeler / model only: {rates[small] / gem_rate:.3f}")


if __name__ == "__main__":
    main()
