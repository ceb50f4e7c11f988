"""Images/s of the labeling stage on one device, measured in one run.

ViT-B-16 with random weights at 448 px by default. Prints, for the same batches:
- plain CLIP image forward (open_clip, inputs already on the device), under autocast and
  with the weights cast to the compute dtype,
- GEM forward + top-k class selection + patch logits ("model only"), the same two ways,
  per attention backend on CUDA (flash, memory-efficient, cuDNN), and with --compile
  torch.compile'd,
- the `pipeline.stages.label.Labeler` stage as the Ray actor runs it: uint8 host batches,
  pinned-memory copy, normalization on the device, weights in the compute dtype, top-k
  against the prompt bank, patch logits of the kept classes back on the host; with a small
  (20) and a large (21,843) bank, so the cost of vocabulary size shows as a ratio; and with
  the masks made on the device (upsampled to 640x480, run lengths back to the host), and
  also with 640x480 images resized on the device (--mask-stage/--resize-stage actor), and
  those images as JPEGs decoded there too (--jpeg-stage actor); the masks alone, same-size
  images made together (flat_masks_of's default on this device) vs one at a time; and
  called from two threads at once, as Ray's concurrent actor calls do (--actor-concurrency
  2: one call's device work overlaps the other's host copies).
With --profile, also the model-only forward's top kernels (`torch.profiler`).

    python benchmarks/labeler_throughput.py [--batch 64] [--iters 10] [--precision auto]
"""

import argparse
import copy
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import gem
from pipeline.stages.decode import decode_batch
from pipeline.stages.label import Labeler, resolve_precision
from pipeline.stages.masks import flat_masks_of, runs_of
from pipeline.stages.options import LabelOptions
from tests.shards import image_bytes

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


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


def concurrent_rate(fn, batch: int, iters: int, threads: int) -> float:
    """Images/s of `iters` calls of `fn` from `threads` threads at once (Ray's concurrent
    actor calls), after one warm-up call per thread."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: fn(), range(threads)))
        sync()
        start = time.perf_counter()
        list(pool.map(lambda _: fn(), range(iters)))
        sync()
    return batch * iters / (time.perf_counter() - start)


def profile_table(fn, device: torch.device, calls: int = 3, rows: int = 14) -> str:
    """`torch.profiler`'s table of the kernels (CUDA) or operators (CPU) of `calls` calls."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        sync()
    sort = "cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70)


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
    parser.add_argument(
        "--profile", action="store_true", help="print the model-only forward's top kernels"
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_precision(args.precision, device)
    size = (args.size, args.size)

    torch.manual_seed(0)
    clip = open_clip.create_model(args.model, force_image_size=args.size, device=device).eval()
    cast = copy.deepcopy(clip).to(dtype)
    models = {"autocast": gem.GEM(clip).eval(), "cast": gem.GEM(cast).eval()}
    dim = clip.visual.output_dim
    x = torch.randn(args.batch, 3, *size, device=device)
    bank = F.normalize(torch.randn(20, dim, device=device), dim=-1)

    def autocast(how: str):
        enabled = how == "autocast" and dtype != torch.float32
        return torch.autocast(device.type, dtype=dtype, enabled=enabled)

    def model_only(how: str, encode=None):
        encode = encode or models[how].encode_image
        inputs = x if how == "autocast" else x.to(dtype)

        def fn():
            with autocast(how):
                features = encode(inputs)
            image = F.normalize(features.image_embeds.float(), dim=-1)
            top = (image @ bank.T).topk(args.top_k, dim=-1).indices
            return gem.patch_logits(features.patch_embeds.float(), bank[top])

        return fn

    def clip_forward(how: str):
        model, inputs = (clip, x) if how == "autocast" else (cast, x.to(dtype))

        def fn():
            with autocast(how):
                return model.encode_image(inputs)

        return fn

    print(
        f"{args.model} random weights, {args.size}px, batch {args.batch}, {device} "
        f"({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), {dtype}"
    )
    rates = {}
    with torch.inference_mode():
        for how in ("autocast", "cast"):
            rates[f"clip {how}"] = rate(clip_forward(how), args.batch, args.iters)
            rates[f"gem {how}"] = rate(model_only(how), args.batch, args.iters)
        if device.type == "cuda":
            for name, backend in BACKENDS.items():
                try:
                    with sdpa_kernel([backend]):
                        rates[f"gem cast, {name} attention"] = rate(
                            model_only("cast"), args.batch, args.iters
                        )
                except RuntimeError as err:  # backend unavailable for these shapes/dtypes
                    print(f"{name} attention unavailable: {str(err).splitlines()[0]}")
        if args.compile:
            compiled = torch.compile(models["cast"].encode_image)
            start = time.perf_counter()
            model_only("cast", compiled)()
            print(f"torch.compile warm-up {time.perf_counter() - start:.1f} s")
            rates["gem cast, compiled"] = rate(model_only("cast", compiled), args.batch, args.iters)
        if args.profile:
            forwards = {"eager": model_only("cast")}
            if args.compile:
                forwards["compiled"] = model_only("cast", compiled)
            for name, fn in forwards.items():
                print(f"GEM model only, weights cast, {name}: top kernels over 3 batches")
                print(profile_table(fn, device))
        fp32 = models["autocast"].encode_image(x).patch_embeds
        low = models["cast"].encode_image(x.to(dtype)).patch_embeds.float()
        cos = F.cosine_similarity(fp32, low, dim=-1)
    for name, value in rates.items():
        print(f"{name:34s} {value:10.1f} img/s")
    print(
        f"patch embeddings, weights cast vs fp32: cosine min {cos.min():.4f} mean {cos.mean():.5f}"
    )
    gem_rate = rates["gem cast"]
    print(f"GEM/CLIP time, weights cast: {rates['clip cast'] / gem_rate:.3f}")
    print(f"cast / autocast, GEM model only: {gem_rate / rates['gem autocast']:.3f}")

    pixels = np.random.default_rng(0).integers(0, 256, (args.batch, *size, 3), dtype=np.uint8)
    batch = {
        "shard": np.array(["s"] * args.batch, dtype=object),
        "key": np.array([str(i) for i in range(args.batch)], dtype=object),
        "width": np.full(args.batch, 640),
        "height": np.full(args.batch, 480),
        "error": np.array([None] * args.batch, dtype=object),
        "pixels": pixels,
    }

    def make_labeler(classes: int, **options) -> Labeler:
        bank = F.normalize(torch.randn(classes, dim), dim=-1).numpy()
        options = LabelOptions(
            args.model, None, "gem", args.top_k, 0.0, size, precision=args.precision, **options
        )
        return Labeler(options, bank)

    rates = {}
    for classes in (int(v) for v in args.vocab_sizes.split(",")):
        labeler = make_labeler(classes)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rates[classes] = rate(lambda labeler=labeler: labeler(batch), args.batch, args.iters)
        print(f"Labeler stage, {classes:6d} classes {rates[classes]:10.1f} img/s")
        if device.type == "cuda":
            print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    labeler = make_labeler(20)
    both = concurrent_rate(lambda: labeler(batch), args.batch, args.iters, 2)
    print(
        f"Labeler stage, 20 classes, 2 calls at once {both:8.1f} img/s "
        f"({both / rates[min(rates)]:.3f} x one at a time)"
    )
    with_masks = make_labeler(20, make_masks=True)
    masks_rate = rate(lambda: with_masks(batch), args.batch, args.iters)
    print(
        f"Labeler stage, 20 classes, masks made here {masks_rate:8.1f} img/s "
        f"({masks_rate / rates[min(rates)]:.3f} x logits only)"
    )
    on_device = make_labeler(20, make_masks=True, resize_on_device=True)
    originals = np.random.default_rng(1).integers(0, 256, (args.batch, 480, 640, 3), np.uint8)
    device_rate = rate(lambda: on_device(dict(batch, pixels=originals)), args.batch, args.iters)
    print(
        f"Labeler stage, 20 classes, resize + masks here {device_rate:8.1f} img/s "
        f"({device_rate / rates[min(rates)]:.3f} x logits only)"
    )
    grid = size[0] // 16, size[1] // 16
    maps = [torch.randn(5, *grid, device=device) for _ in range(args.batch)]
    shapes = [(480, 640)] * args.batch
    one = rate(lambda: runs_of(flat_masks_of(maps, shapes, 0.5, budget=0)), args.batch, args.iters)
    grouped = rate(lambda: runs_of(flat_masks_of(maps, shapes, 0.5)), args.batch, args.iters)
    print(
        f"masks alone (5 classes, 640x480), this device's grouping {grouped:8.1f} img/s "
        f"({grouped / one:.3f} x one image at a time)"
    )
    jpegs = [image_bytes(640, 480, "jpeg", seed=i) for i in range(args.batch)]
    rows = dict(
        batch, image=np.array(jpegs, dtype=object), image_ext=np.array(["jpg"] * args.batch)
    )
    probed = decode_batch(rows, size, resize_to_model_input=False, leave_jpegs_to_actor=True)
    decoding = make_labeler(20, make_masks=True, resize_on_device=True, decode_jpegs_on_device=True)
    jpeg_rate = rate(lambda: decoding(probed), args.batch, args.iters)
    print(
        f"Labeler stage, 20 classes, JPEG decode + resize + masks here {jpeg_rate:8.1f} img/s "
        f"({jpeg_rate / device_rate:.3f} x resize + masks)"
    )
    if args.compile:
        compiled = make_labeler(20, compile=True)
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
