"""`gemlabel prompts build|list`: prompt bank files and the built-in vocabularies."""

import argparse
import dataclasses
import time

from pipeline.config import RunConfig
from pipeline.exit_codes import EXIT_OK
from pipeline.weights import DEFAULT_MODEL, DEFAULT_WEIGHTS, RANDOM_WEIGHTS

VOCAB_HELP = (
    "class names: a built-in vocabulary (gemlabel prompts list), a text file (one class per "
    "line, synonyms as 'sofa; couch'), or a CSV/Parquet column (file.csv:COLUMN); path or URL"
)
PRETRAINED_HELP = (
    f"open_clip weights tag or checkpoint, or '{RANDOM_WEIGHTS}' for seeded random weights "
    "(tests: the masks mean nothing); default: the model's own ("
    + ", ".join(f"{m}: {w}" for m, w in DEFAULT_WEIGHTS.items())
    + "; gemlabel-toy: bundled)"
)
TEMPLATES_HELP = "prompt templates: single, imagenet (the 80 ImageNet ones) or a file of '{}' lines"


def add_prompts(subparsers) -> None:
    """`gemlabel prompts build ...` and `gemlabel prompts list`."""
    p = subparsers.add_parser("prompts", help="build prompt bank files; list vocabularies")
    commands = p.add_subparsers(dest="prompts_command", required=True, metavar="COMMAND")
    b = commands.add_parser(
        "build",
        help="encode a vocabulary into a prompt bank file",
        description="Encode a vocabulary with a model's text tower into one Parquet file "
        "(names, ids, normalized embeddings, and the model, weights, templates and vocabulary "
        "hash); pass it to `gemlabel run --bank`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b.add_argument("--vocab", required=True, help=VOCAB_HELP)
    b.add_argument("--vocab-column", help="column of a CSV/Parquet vocabulary")
    run = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    b.add_argument("--model", default=DEFAULT_MODEL, help="open_clip model name or config")
    b.add_argument("--pretrained", help=PRETRAINED_HELP)
    b.add_argument("--seed", type=int, default=run["seed"], help="seed of --pretrained random")
    b.add_argument("--templates", default=run["templates"], help=TEMPLATES_HELP)
    b.add_argument("--batch-size", type=int, default=512, help="prompts per text forward")
    b.add_argument("--device", help="torch device; default: cuda if available, else cpu")
    b.add_argument("--out", required=True, help="bank file to write (.parquet; path or URL)")
    b.set_defaults(func=cmd_build)
    ls = commands.add_parser("list", help="the built-in vocabularies and their sizes")
    ls.set_defaults(func=cmd_list)


def cmd_build(args: argparse.Namespace) -> int:
    """Build and save a bank; print what was written. Errors (a vocabulary, model or
    weights that cannot be used, an unwritable --out: exit 2) are reported by
    `jobs.cli.main` as for every command."""
    from gem import resolve_weights
    from pipeline.prompts import bank as prompt_bank
    from pipeline.prompts.vocab import load_vocabulary
    from pipeline.weights import default_pretrained, gem_pretrained

    started = time.perf_counter()
    pretrained = default_pretrained(args.model, args.pretrained)
    prompt_bank.check_weights(args.model, pretrained)
    names = load_vocabulary(args.vocab, args.vocab_column)
    bank = prompt_bank.build(
        names,
        args.model,
        gem_pretrained(pretrained),
        args.templates,
        args.seed,
        args.batch_size,
        device=args.device,
    )
    prompt_bank.save(bank, args.out)
    print(
        f"{args.out}: {len(bank.names)} classes x {len(bank.templates)} templates, "
        f"dim {bank.embeddings.shape[1]}, model {bank.model} "
        f"({resolve_weights(bank.model, bank.pretrained) or f'random weights, seed {bank.seed}'}), "
        f"vocabulary {bank.vocabulary_hash}, key {bank.key}, "
        f"{time.perf_counter() - started:.1f} s"
    )
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """Print the built-in vocabularies with their sizes."""
    from pipeline.prompts.vocab import BUILTIN, load_vocabulary

    for name in BUILTIN:
        names = load_vocabulary(name)
        print(f"{name:15s} {len(names):6d}  {', '.join(names[:4])}, ...")
    return EXIT_OK
