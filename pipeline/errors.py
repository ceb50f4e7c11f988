"""Error kinds: error rows' messages grouped for summaries and reports."""

import re

KIND_LENGTH = 100  # characters of an error kind at most


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
    cut = text[: length - 1]
    inside_a_word = not cut[-1].isspace() and not text[length - 1].isspace()
    if inside_a_word and " " in cut.strip():
        cut = cut.rsplit(None, 1)[0]
    return cut.rstrip(" ,;:") + "…"
