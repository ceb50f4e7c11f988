"""Error kinds: error rows' messages grouped for summaries and reports, and text shortened
between words (never inside one) where it must fit."""

import re

KIND_LENGTH = 200  # characters of an error kind at most (a path and the reason fit)


def error_kind(error: str, length: int = KIND_LENGTH) -> str:
    """An error message without its parenthesized, sample-specific details, for grouping;
    one longer than `length` is cut at a word boundary and ends in "…"."""
    kind = re.sub(r"\s*\(.*", "", error)
    return shorten(kind, length)


def shorten(text: str, length: int) -> str:
    """`text`, or its words that fit in `length` characters followed by "…" (a single word
    longer than that is cut)."""
    if len(text) <= length:
        return text
    cut = text[: max(length - 1, 1)]
    inside_a_word = not cut[-1].isspace() and not text[len(cut)].isspace()
    if inside_a_word and " " in cut.strip():
        cut = cut.rsplit(None, 1)[0]
    return cut.rstrip(" ,;:") + "…"
