"""`gemlabel run`: its arguments (shared with `gemlabel submit`, which checks them before
sending a job), whose defaults are RunConfig's, and the command itself.

Exit codes (pipeline.exit_codes): 0 the run completed (bad samples within the error budget
included: they are error rows, counted in the summary); 1 it failed or was left unfinished
(nothing could be labeled, the lock was lost, the stream stalled); 2 usage or configuration
error (nothing was labeled, the cluster cannot fit the run); 3 the error budget was
exceeded and the run stopped (rows written so far are valid; a rerun resumes); 130
interrupted.
"""

import argparse
import dataclasses
import sys

from jobs.choices import METHODS
from jobs.prompts import PRETRAINED_HELP, TEMPLATES_HELP, VOCAB_HELP
from pipeline.config import (
    JPEG_STAGES,
    MASK_MODES,
    MASK_STAGES,
    PRECISIONS,
    REFINEMENTS,
    RESIZE_STAGES,
    RunConfig,
)
from pipeline.exit_codes import EXIT_INTERRUPTED


def _image_size(text: str) -> tuple[int, int]:
    try:
        h, _, w = text.lower().partition("x")
        return int(h), int(w or h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None


def _temperature(text: str) -> str | float:
    if text == "adaptive":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'adaptive' or a number, got {text!r}") from None


def _ensemble(text: str) -> tuple[str, ...]:
    parts = tuple(p for p in text.replace(",", "") if p.strip())
    if not parts or set(parts) - {"q", "k", "v"}:
        raise argparse.ArgumentTypeError(f"expected a subset of q, k, v (e.g. qkv, qk): {text!r}")
    return parts


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated prompts, got {text!r}")
    return names


def add_run(subparsers) -> None:
    """`gemlabel run INPUT... --vocab FILE --out DIR`."""
    p = subparsers.add_parser(
        "run",
        help="label WebDataset shards into Parquet tables of masks and scores",
        description="Label WebDataset shards with open-vocabulary masks (GEM on an open_clip "
        "ViT) on Ray Data; write images/ and masks/ Parquet tables and manifest.json to --out. "
        "Rerunning the same command resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="shards: local paths, directories, globs, brace ranges ('data/{000000..000099}.tar'"
        ", quote it) or fsspec URLs (file://, s3://, gs://, http(s)://)",
    )
    p.add_argument("--vocab", help=VOCAB_HELP + " (or --bank)")
    p.add_argument("--vocab-column", help="column of a CSV/Parquet vocabulary")
    p.add_argument("--out", required=True, help="output directory (path or fsspec URL)")
    p.add_argument("--overwrite", action="store_true", help="delete earlier results in --out first")

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="open_clip model name or config (gemlabel-toy: a bundled toy model for the demo)",
    )
    g.add_argument("--pretrained", help=PRETRAINED_HELP)
    g.add_argument("--seed", type=int, help="seed of --pretrained random")
    g.add_argument(
        "--method",
        choices=METHODS,
        metavar="METHOD",
        help="localization method: %(choices)s (docs/gem.md: GEM, SCLIP, ClearCLIP, NACLIP, "
        "baselines)",
    )
    g.add_argument(
        "--refine",
        choices=REFINEMENTS,
        help="pamr: refine the kept classes' maps with PAMR against the image at --image-size "
        "(10 iterations, dilations 8 and 16), then upsample them to the original size "
        "(cost: docs/gem.md; with --mask-stage writer the maps handed over are at "
        "--image-size, not the patch grid)",
    )
    g.add_argument("--templates", help=TEMPLATES_HELP)
    g.add_argument(
        "--bank", help="a prebuilt prompt bank (gemlabel prompts build); its model must match"
    )
    g.add_argument(
        "--bank-cache",
        help="prompt bank cache directory (path or URL; shared storage on clusters); default: "
        "$GEMLABEL_BANK_CACHE or ~/.cache/gemlabel/banks",
    )
    g.add_argument("--image-size", type=_image_size, help="model input, N or HxW")
    g.add_argument("--precision", choices=PRECISIONS, help="auto: bf16 on GPU, fp32 on CPU")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the image forward in each actor (faster on GPUs after a warm-up)",
    )

    g = p.add_argument_group("GEM options (default: the method's own)")
    g.add_argument("--depth", type=int, help="number of final blocks feeding the GEM pathway")
    g.add_argument("--iterations", type=int, help="self-self attention iterations")
    g.add_argument("--temperature", type=_temperature, help="'adaptive' or a number")
    g.add_argument("--ensemble", type=_ensemble, help="projections to ensemble: subset of qkv")
    g.add_argument("--no-l2-norm", action="store_true", help="skip L2 normalization of q/k/v")

    g = p.add_argument_group("labels and masks")
    g.add_argument("--top-k", type=int, help="classes kept per image")
    g.add_argument(
        "--score-threshold",
        type=float,
        help="minimum image-level score (softmax probability over the vocabulary) of a kept class",
    )
    g.add_argument(
        "--mask-threshold",
        type=float,
        help="a pixel is in a class's mask when its min-max normalized heatmap value is >= this",
    )
    g.add_argument(
        "--mask-mode",
        choices=MASK_MODES,
        help="threshold: each class on its own (masks may overlap); semantic: argmax over the "
        "kept classes, then the threshold (disjoint masks); background: argmax of the raw "
        "logits over the kept classes and the --background prompts, no threshold (disjoint)",
    )
    g.add_argument(
        "--mask-stage",
        choices=MASK_STAGES,
        help="where masks are upsampled and thresholded: writer (CPU write tasks) or actor "
        "(the labeling actor's device; only run lengths leave it: for nodes with few CPU "
        "cores per GPU, see docs/benchmarks.md)",
    )
    g.add_argument(
        "--resize-stage",
        choices=RESIZE_STAGES,
        help="where images are resized to --image-size: decoder (PIL on CPU decode tasks) or "
        "actor (the labeling actor's device, within one level of PIL; for nodes with few "
        "CPU cores per GPU)",
    )
    g.add_argument(
        "--jpeg-stage",
        choices=JPEG_STAGES,
        help="where plain JPEGs (baseline, YCbCr or gray, complete) are decoded: decoder (PIL "
        "on CPU decode tasks) or actor (torchvision.io.decode_jpeg on the labeling actor's "
        "device: nvjpeg on a GPU; needs --resize-stage actor); other images stay on the CPU",
    )
    g.add_argument(
        "--background",
        type=_names,
        help="comma-separated background prompts competing with the kept classes in "
        "--mask-mode background (encoded with the bank's templates)",
    )
    g.add_argument(
        "--max-pixels",
        type=int,
        help="larger images are error rows (decompression-bomb guard)",
    )

    g = p.add_argument_group("execution")
    g.add_argument("--batch-size", type=int, help="per model call")
    g.add_argument(
        "--actors", type=int, help="model actors; default: one per GPU, or 1 without GPUs"
    )
    g.add_argument(
        "--gpus-per-actor", type=float, help="default: 1 if the cluster has GPUs, else 0"
    )
    g.add_argument("--cpus-per-actor", type=float, help="per actor")
    g.add_argument(
        "--actor-concurrency",
        type=int,
        help="batches in flight per model actor: while one runs on the device, the next is "
        "batched and copied to pinned memory and the previous one's results come back "
        "(1: one batch at a time)",
    )
    g.add_argument(
        "--decode-batch-size",
        type=int,
        help="images per decode task batch",
    )
    g.add_argument(
        "--rows-per-file",
        type=int,
        help="rows per output file (also the unit of work lost on a crash)",
    )
    g.add_argument("--num-cpus", type=int, help="CPUs of the embedded local Ray; default: all")
    g.add_argument("--address", help="existing Ray cluster (e.g. auto, ray://host:10001)")
    g.add_argument(
        "--stall-timeout",
        type=float,
        help="end the run (exit 1) when its stream made no progress for this many seconds "
        "(nothing read, labeled or written), with Ray's resource summary",
    )
    g.add_argument(
        "--scale-timeout",
        type=float,
        help="on an autoscaling cluster whose alive nodes cannot hold the run, wait this many "
        "seconds for the autoscaler to add them (a line every 30 s says what is missing), "
        "then exit 2; a run that no node type can ever hold is refused at once",
    )
    g.add_argument(
        "--max-error-rate",
        type=float,
        help="stop (exit code 3) when more than this fraction of samples are error rows",
    )
    g.add_argument(
        "--min-error-samples",
        type=int,
        help="samples seen before the error budget applies",
    )
    p.set_defaults(func=cmd_run, **run_defaults())


def run_defaults() -> dict:
    """The defaults of `gemlabel run`'s options: RunConfig's."""
    return {
        f.name: f.default
        for f in dataclasses.fields(RunConfig)
        if f.default is not dataclasses.MISSING
    }


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of parsed `gemlabel run` arguments."""
    gem_options = {
        name: getattr(args, name)
        for name in ("depth", "iterations", "temperature", "ensemble")
        if getattr(args, name) is not None
    }
    if args.no_l2_norm:
        gem_options["l2_norm"] = False
    fields = RunConfig.__dataclass_fields__
    values = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    return RunConfig(**values, gem_options=gem_options)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the labeling job; print the summary; return its exit code. Errors (bad
    configuration, storage, weights, a cluster too small: exit 2; bugs: exit 1) are
    reported by `jobs.cli.main` as for every command."""
    from pipeline.run import run

    try:
        summary = run(config_from_args(args))
    except KeyboardInterrupt:
        print("gemlabel: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(summary.format())
    return summary.exit_code


def parse_run_args(run_args: list[str]) -> RunConfig:
    """The RunConfig of a `gemlabel run ...` argument list (`run` first); a usage error
    exits 2 as the real command would."""
    parser = argparse.ArgumentParser(prog="gemlabel")
    add_run(parser.add_subparsers(dest="command", required=True))
    return config_from_args(parser.parse_args(run_args))
