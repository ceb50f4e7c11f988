"""Vocabularies (class names) and the prompt bank (their text embeddings)."""

import hashlib
import json
import logging

import fsspec
import numpy as np

import gem

logger = logging.getLogger(__name__)


def load_vocabulary(path: str) -> list[str]:
    """Class names from a text file (any fsspec URL), one per line.

    Surrounding whitespace is stripped; blank lines and `#` comments are skipped;
    a repeated name keeps its first position. Skips and duplicates are logged.
    """
    with fsspec.open(path, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    names, seen, duplicates = [], set(), []
    for line in lines:
        if not line or line.startswith("#"):
            continue
        if line in seen:
            duplicates.append(line)
            continue
        seen.add(line)
        names.append(line)
    if duplicates:
        logger.warning(
            "vocabulary %s: %d duplicate name(s) ignored (first kept): %s",
            path,
            len(duplicates),
            ", ".join(duplicates[:10]),
        )
    if not names:
        raise ValueError(f"vocabulary {path} has no class names (one per line expected)")
    return names


def vocabulary_hash(names: list[str]) -> str:
    """A short content hash of the ordered class names (for manifests and caches)."""
    return hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]


def build_bank(
    model: str,
    pretrained: str | None,
    names: list[str],
    templates: str = "single",
    seed: int = 0,
) -> np.ndarray:
    """Normalized text embeddings `[C, E]` (float32) of `names` under `templates`."""
    clip, tokenizer = gem.create_clip(model, pretrained, seed=seed)
    return gem.encode_class_names(clip, tokenizer, names, templates).numpy().astype(np.float32)
