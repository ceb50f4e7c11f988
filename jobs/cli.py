"""The `gemlabel` command. Each subcommand registers itself in `build_parser` with an
`add_<name>(subparsers)` function that sets `func` (args -> exit code).

`gemlabel run` and its exit codes live in jobs/run.py (`gemlabel submit` checks run
arguments with the same parser).

Start-up: only what a command uses is imported, in the command (torch and open_clip through
`gem` take seconds); the module itself imports neither them nor Ray nor pyarrow, and the
commands that read an output import their tool after the output is checked, so that a
wrong path fails at once.

Errors: what a user can cause (bad arguments or files, a path that is not an output,
unreachable storage or dashboard, missing weights, a cluster too small) is one line
`gemlabel: error: ...` and exit code 2. Anything else is a bug: one line naming the
exception and exit code 1; `--debug` (or GEMLABEL_DEBUG=1) prints its traceback, and the
user errors' tracebacks too.
"""

import argparse
import os
import sys
import traceback
from typing import TYPE_CHECKING

from jobs.choices import EVAL_DATASETS, EVAL_PROTOCOLS, METHODS, PRESET_METHODS, TEMPLATES
from jobs.prompts import add_prompts
from jobs.run import add_run
from jobs.submit import add_job_commands
from pipeline.exit_codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from pipeline.storage.store import Store

EXIT_BUG = EXIT_FAILED  # an internal error: one line, --debug for the traceback
# what users cause (ResourcesError, OutputLockedError, NotAnOutputError, ... are ValueErrors;
# and gem's WeightsUnavailableError, see `_user_error`)
USER_ERRORS = (ValueError, OSError)

# where `report` and `view` write when not told: under OUT/_gemlabel/ (what is not a table:
# pipeline.storage.output.STATE_DIR), so no reader of the tables' folders or of a glob of
# OUT/**/*.parquet meets them
DEFAULT_REPORT = "_gemlabel/report.html"
DEFAULT_GALLERY = "_gemlabel/gallery"


def add_eval(subparsers) -> None:
    """`gemlabel eval --dataset NAME --root PATH --model M [--pretrained W] --method METHOD`."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a method on a segmentation or point-label dataset (mIoU)",
        description="Evaluate a localization method on a standard dataset read from its usual "
        "on-disk layout (nothing is downloaded): print per-class IoU and mIoU, optionally "
        "write them with the configuration and counts as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--dataset", required=True, choices=EVAL_DATASETS, metavar="NAME", help="%(choices)s"
    )
    p.add_argument("--root", required=True, help="the dataset's directory (layout: README)")
    p.add_argument("--model", required=True, help="open_clip model name or config")
    p.add_argument(
        "--pretrained",
        default=None,
        help="open_clip weights tag or local checkpoint; default: seeded random weights",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of random weights")
    p.add_argument(
        "--method",
        default="gem",
        choices=METHODS,
        metavar="METHOD",
        help="localization method: %(choices)s",
    )
    p.add_argument(
        "--templates",
        default=None,
        choices=TEMPLATES,
        metavar="NAME",
        help="prompts (%(choices)s); default: imagenet under the official protocol, else single",
    )
    p.add_argument(
        "--protocol",
        default=None,
        choices=EVAL_PROTOCOLS,
        metavar="NAME",
        help="paper: shorter side 448, whole image; sliding: SCLIP's windows (224, stride "
        "112); official: the method's authors' settings for the dataset (short side, "
        "windows, logit scale, thresholds, background queries, PAMR). Default: official "
        f"for the methods with their authors' presets ({', '.join(PRESET_METHODS)}), else "
        "paper",
    )
    p.add_argument("--short-side", type=int, help="override the protocol's shorter side")
    p.add_argument("--window", type=int, help="override the sliding window size")
    p.add_argument("--stride", type=int, help="override the sliding window stride")
    p.add_argument(
        "--background-threshold",
        type=float,
        default=None,
        help="background (class 0) where the top class probability is under this; default: "
        "the official preset's probability threshold, else 0.8 (voc)",
    )
    p.add_argument(
        "--logit-scale",
        type=float,
        help="scale of the cosine scores before the softmax; default: the preset's, else "
        "the model's",
    )
    p.add_argument(
        "--refine",
        choices=["none", "pamr"],
        help="refine the scores with PAMR (10 iterations, dilations 8, 16) before labeling; "
        "default: the preset's (naclip: pamr), else none",
    )
    p.add_argument(
        "--save-predictions",
        metavar="DIR",
        help="write each predicted label map as DIR/<id>.png (palette PNG, the dataset's "
        "label ids)",
    )
    p.add_argument("--limit", type=int, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=8, help="images (or windows) per call")
    p.add_argument("--device", help="torch device; default: cuda if available, else cpu")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument(
        "--analysis",
        action="store_true",
        help="also report patch-patch similarity, object-background and "
        "text-object-background contrast (paper section 5)",
    )
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the evaluation; print the table; write JSON to --out."""
    import torch

    from gem import create_gem_model
    from gem.eval import PRESETS, evaluate
    from gem.eval.datasets import OPENIMAGES
    from gem.eval.report import format_results, write_results

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = create_gem_model(
        args.model, args.pretrained, device=device, method=args.method, seed=args.seed
    )
    protocol = args.protocol or ("official" if args.method in PRESETS else "paper")
    if args.dataset == OPENIMAGES and args.protocol is None:
        protocol = "paper"
    result = evaluate(
        model,
        args.dataset,
        args.root,
        protocol,
        limit=args.limit,
        batch_size=args.batch_size,
        templates=args.templates,
        background_threshold=args.background_threshold,
        analysis=args.analysis,
        short_side=args.short_side,
        window=args.window,
        stride=args.stride,
        logit_scale=args.logit_scale,
        refine=args.refine,
        save_predictions=args.save_predictions,
    )
    result = {"model": args.model, "pretrained": args.pretrained, **result}
    print(format_results(result))
    if args.out:
        write_results(result, args.out)
    return EXIT_OK


def _open_output(url: str) -> "Store":
    """The Store of an existing output; NotAnOutputError (exit 2) before anything is
    written when `url` holds none."""
    from pipeline.storage.credentials import explained
    from pipeline.storage.output import require_output
    from pipeline.storage.store import Store

    out = Store(url)
    with explained(out):  # credentials, endpoint, bucket: one line naming the URL
        require_output(out)
    return out


def add_filter(subparsers) -> None:
    """`gemlabel filter OUT --out FILTERED [criteria]`."""
    p = subparsers.add_parser(
        "filter",
        help="write a filtered copy of an output's tables (no model run)",
        description="Copy OUT's tables to --out keeping only the mask rows that pass every "
        "criterion, then at most --max-masks-per-image per image (highest scores). Every "
        "images row is kept; its labels/scores keep exactly the classes of its kept masks. "
        "Same schema, atomic files; rerunning resumes.",
    )
    p.add_argument("output", metavar="OUT", help="a gemlabel output directory")
    p.add_argument("--out", required=True, help="directory of the filtered copy")
    p.add_argument("--min-score", type=float, help="keep masks whose score is >= this")
    p.add_argument("--classes", help="keep these classes: a file (one per line) or NAME,NAME")
    p.add_argument("--min-area", type=int, help="keep masks of at least this many pixels")
    p.add_argument("--max-masks-per-image", type=int, help="then keep the K best per image")
    p.add_argument("--overwrite", action="store_true", help="replace another filter's results")
    p.set_defaults(func=cmd_filter)


def cmd_filter(args: argparse.Namespace) -> int:
    """Filter; print the totals before and after."""
    source = _open_output(args.output)
    from pipeline.storage.store import Store
    from pipeline.tools.filter import FilterSpec, filter_output, resolve_classes

    spec = FilterSpec(
        min_score=args.min_score,
        classes=resolve_classes(source, args.classes),
        min_area=args.min_area,
        max_masks_per_image=args.max_masks_per_image,
    )
    manifest = filter_output(source, Store(args.out), spec, overwrite=args.overwrite)
    before, after = manifest["source_totals"] or {}, manifest["totals"]
    print(
        f"gemlabel filter: {after['images']} images kept, masks {before.get('masks')} -> "
        f"{after['masks']}\noutput: {args.out}"
    )
    return EXIT_OK


def add_shards(subparsers) -> None:
    """`gemlabel shards OUT --out URL [--source INPUT...]`."""
    p = subparsers.add_parser(
        "shards",
        help="write WebDataset shards of the source samples with their labels",
        description="Join OUT's tables to the source shards by (shard, key) and write new "
        "shards: each sample keeps its members and gets <key>.labels.json (classes, scores, "
        "boxes, COCO RLE) and <key>.seg.png (0 background, label_id + 1; 16-bit when the "
        "vocabulary has more than 255 classes). Runs on Ray Data; rerunning resumes.",
    )
    p.add_argument("output", metavar="OUT", help="a gemlabel output directory")
    p.add_argument("--out", required=True, help="directory for the new shards (path or URL)")
    p.add_argument(
        "--source",
        nargs="+",
        metavar="INPUT",
        help="where the source shards are now (as for run; matched by URL or file name); "
        "default: the URLs recorded in the tables",
    )
    p.add_argument(
        "--samples-per-shard",
        type=int,
        help="resize: N samples per shard (default: one per source)",
    )
    p.add_argument("--include-unlabeled", action="store_true", help="copy samples without labels")
    p.add_argument(
        "--include-errors", action="store_true", help="copy failed samples with an error marker"
    )
    p.add_argument("--prefix", default="shard", help="output shard names: PREFIX-000000.tar")
    p.add_argument("--overwrite", action="store_true", help="delete earlier shards in --out")
    p.add_argument("--num-cpus", type=int, help="CPUs of the embedded local Ray; default: all")
    p.add_argument("--address", help="existing Ray cluster (e.g. auto, ray://host:10001)")
    p.set_defaults(func=cmd_shards)


def cmd_shards(args: argparse.Namespace) -> int:
    """Write the labeled shards; print what was written and what was left out."""
    source = _open_output(args.output)
    from pipeline.storage.store import Store
    from pipeline.tools.labeled_shards import write_labeled_shards

    manifest = write_labeled_shards(
        source,
        Store(args.out),
        sources=args.source,
        samples_per_shard=args.samples_per_shard,
        include_unlabeled=args.include_unlabeled,
        include_errors=args.include_errors,
        prefix=args.prefix,
        overwrite=args.overwrite,
        address=args.address,
        num_cpus=args.num_cpus,
    )
    tables, written = manifest["totals"]["tables"], manifest["totals"]["written"]
    print(
        f"gemlabel shards {manifest['status']}: {manifest['totals']['shards']} shards, "
        f"{written['samples']} samples ({written['labeled']} labeled, {written['unlabeled']} "
        f"unlabeled, {written['errors']} errors); in the tables: {tables['labeled']} labeled, "
        f"{tables['unlabeled']} unlabeled, {tables['errors']} errors"
        + (f"; {written['missing']} not found in the source shards" if written["missing"] else "")
        + f"\noutput: {args.out}"
    )
    return EXIT_OK if manifest["status"] == "complete" and not written["missing"] else EXIT_FAILED


def add_report(subparsers) -> None:
    """`gemlabel report OUT [--source INPUT...] [--html FILE]`."""
    p = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report on an output's labels",
        description="Statistics to check before training on the labels (status and error "
        "kinds, masks per image, class frequency, score and mask-area histograms) and, with "
        "--source, example overlays per top class; one HTML file, no network needed.",
    )
    p.add_argument("output", metavar="OUT", help="a gemlabel output directory")
    p.add_argument("--source", nargs="+", metavar="INPUT", help="source shards, for overlays")
    p.add_argument(
        "--html",
        help="report file (local path or URL); default: OUT/_gemlabel/report.html, beside the "
        "tables' folders, not among them",
    )
    p.add_argument("--top", type=int, default=20, help="classes in the top-classes plot")
    p.add_argument("--examples", type=int, default=3, help="overlays per top class")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report; print its path."""
    out = _open_output(args.output)
    from pipeline.tools.report import write_report

    path = args.html or out.display(DEFAULT_REPORT)
    write_report(out, path, args.source, top=args.top, per_class=args.examples)
    print(f"report: {path}")
    return EXIT_OK


def add_view(subparsers) -> None:
    """`gemlabel view OUT [--source INPUT...] [--dest DIR] [--per-page N]`."""
    p = subparsers.add_parser(
        "view",
        help="write a static HTML gallery of an output's masks",
        description="Each image with its masks overlaid in distinct colours, label names and "
        "scores; paged; offline (images embedded). Pixels come from --source or the "
        "manifest's inputs.",
    )
    p.add_argument("output", metavar="OUT", help="a gemlabel output directory")
    p.add_argument("--source", nargs="+", metavar="INPUT", help="source shards (default: inputs)")
    p.add_argument(
        "--dest",
        help="gallery directory (local path or URL); default: OUT/_gemlabel/gallery, beside "
        "the tables' folders, not among them",
    )
    p.add_argument("--per-page", type=int, default=60, help="images per page")
    p.set_defaults(func=cmd_view)


def cmd_view(args: argparse.Namespace) -> int:
    """Write the gallery; print the path of its first page."""
    out = _open_output(args.output)
    from pipeline.storage.store import Store
    from pipeline.tools.gallery import write_gallery

    dest = Store(args.dest) if args.dest else out.child(DEFAULT_GALLERY)
    paths = write_gallery(out, dest, args.source, per_page=args.per_page)
    print(f"gallery: {paths[0]} ({len(paths)} page{'s' if len(paths) != 1 else ''})")
    return EXIT_OK


def add_export(subparsers) -> None:
    """`gemlabel export coco OUT FILE [--write-images DIR] [--images-root DIR]`."""
    p = subparsers.add_parser(
        "export", help="export an output's masks (coco: COCO JSON with RLE segmentation)"
    )
    p.add_argument("format", choices=["coco"], help="output format")
    p.add_argument("output", metavar="OUT", help="a gemlabel output directory")
    p.add_argument("file", metavar="FILE", help="the file to write")
    p.add_argument(
        "--write-images",
        metavar="DIR",
        help="also write the images the JSON references into DIR (EXIF orientation applied, "
        "as labeled), so COCO tools open the JSON and its pictures as they are",
    )
    p.add_argument(
        "--images-root",
        metavar="DIR",
        help="what file_name is relative to (default: FILE's directory); file_name is the "
        "sample key with its image's extension in the source shard",
    )
    p.add_argument(
        "--source",
        nargs="+",
        metavar="INPUT",
        help="source shards, for the images' extensions and pixels (default: the run's inputs)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Write the COCO JSON; print the counts."""
    out = _open_output(args.output)
    from pipeline.tools.coco import export_coco

    counts = export_coco(out, args.file, args.source, args.write_images, args.images_root)
    print(f"coco: {args.file} ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The `gemlabel` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="gemlabel", description="Open-vocabulary pseudo-labels for image corpora (GEM)."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_run(subparsers)
    add_prompts(subparsers)
    add_job_commands(subparsers)
    add_eval(subparsers)
    add_filter(subparsers)
    add_shards(subparsers)
    add_report(subparsers)
    add_view(subparsers)
    add_export(subparsers)
    _add_debug(parser)
    return parser


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """`--debug` on every (sub)command that takes no further subcommand."""
    children = [
        child
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for child in action.choices.values()
    ]
    for child in children:
        _add_debug(child)
    if not children:
        parser.add_argument(
            "--debug",
            action="store_true",
            help="print the traceback of an error (also GEMLABEL_DEBUG=1)",
        )


def _raised_from(module: str, name: str, err: BaseException) -> bool:
    """Whether `err` is a `module.name`; False without importing `module` when nothing has
    (then nothing could have raised it)."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(err, getattr(loaded, name))


def _user_error(err: BaseException) -> bool:
    """Whether `err` is one a user causes (see the module doc): USER_ERRORS and missing
    weights (gem.WeightsUnavailableError); Ray's errors never are (a failed task's error
    subclasses its cause's type)."""
    user = isinstance(err, USER_ERRORS) or _raised_from(
        "gem.factory", "WeightsUnavailableError", err
    )
    return user and not _raised_from("ray.exceptions", "RayError", err)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gemlabel` console script."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("GEMLABEL_DEBUG", "") not in ("", "0")
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader of stdout went away (`gemlabel prompts list | head`): stop quietly, and
        # point stdout at /dev/null so that the interpreter's final flush does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("gemlabel: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - one line for the user; the traceback on request
        if debug:
            traceback.print_exc()
        if _user_error(err):
            print(f"gemlabel: error: {err}", file=sys.stderr)
            return EXIT_USAGE
        print(
            f"gemlabel: internal error: {type(err).__name__}: {err}\n"
            "gemlabel: this is a bug; rerun with --debug (or GEMLABEL_DEBUG=1) for the "
            "traceback",
            file=sys.stderr,
        )
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
