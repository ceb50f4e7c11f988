"""`gemlabel prompts build|list`: prompt bank files and the built-in vocabularies."""

import argparse
import sys
import time

VOCAB_HELP = (
    "class names: a built-in vocabulary (gemlabel prompts list), a text file (one class per "
    "line, synonyms as 'sofa; couch'), or a CSV/Parquet column (file.csv:COLUMN); path or URL"
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
    b.add_argument("--model", default="gemlabel-tiny", help="open_clip model name or config")
    b.add_argument("--pretrained", help="open_clip weights tag or checkpoint; default: random")
    b.add_argument("--seed", type=int, default=0, help="seed of random weights")
    b.add_argument("--templates", default="single", help=TEMPLATES_HELP)
    b.add_argument("--batch-size", type=int, default=512, help="prompts per text forward")
    b.add_argument("--device", help="torch device; default: cuda if available, else cpu")
    b.add_argument("--out", required=True, help="bank file to write (.parquet; path or URL)")
    b.set_defaults(func=cmd_build)
    ls = commands.add_parser("list", help="the built-in vocabularies and their sizes")
    ls.set_defaults(func=cmd_list)


def cmd_build(args: argparse.Namespace) -> int:
    """Build and save a bank; print what was written."""
    from gem import WeightsUnavailableError, resolve_weights
    from pipeline.prompts import bank as prompt_bank
    from pipeline.prompts.vocab import load_vocabulary

    started = time.perf_counter()
    try:
        names = load_vocabulary(args.vocab, args.vocab_column)
        bank = prompt_bank.build(
            names,
            args.model,
            args.pretrained,
            args.templates,
            args.seed,
            args.batch_size,
            device=args.device,
        )
        prompt_bank.save(bank, args.out)
    except (ValueError, OSError, WeightsUnavailableError) as err:
        print(f"gemlabel: error: {err}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {len(bank.names)} classes x {len(bank.templates)} templates, "
        f"dim {bank.embeddings.shape[1]}, model {bank.model} "
        f"({resolve_weights(bank.model, bank.pretrained) or f'random weights, seed {bank.seed}'}), "
        f"vocabulary {bank.vocabulary_hash}, key {bank.key}, "
        f"{time.perf_counter() - started:.1f} s"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print the built-in vocabularies with their sizes."""
    from pipeline.prompts.vocab import BUILTIN, load_vocabulary

    for name in BUILTIN:
        names = load_vocabulary(name)
        print(f"{name:15s} {len(names):6d}  {', '.join(names[:4])}, ...")
    return 0
