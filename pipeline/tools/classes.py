"""The class names of a labeled output, for the tools that show or export them.

A run records its class names in the output (`classes.json`, pipeline.storage.output).
Outputs written before that are read as before: the vocabulary file the manifest names,
while it still has the recorded hash, else the names that occur in the masks table.
"""

from pipeline.prompts.vocab import class_names as vocab_class_names
from pipeline.prompts.vocab import load_vocabulary, vocabulary_hash
from pipeline.storage import tables
from pipeline.storage.output import MASKS_DIR, read_manifest
from pipeline.storage.store import Store, as_store


def class_names(store: Store | str) -> dict[int, str]:
    """Vocabulary id -> class name of `store` (see the module docstring)."""
    store = as_store(store)
    names = tables.class_names(store)
    if names is not None:
        return dict(enumerate(names))
    manifest = read_manifest(store) or {}
    path = manifest.get("vocabulary_file")
    expected = manifest.get("config", {}).get("vocabulary", {}).get("hash")
    if path:
        try:
            entries = load_vocabulary(path)
        except (OSError, ValueError):
            entries = None
        if entries is not None and vocabulary_hash(entries) == expected:
            return dict(enumerate(vocab_class_names(entries)))  # "sofa; couch" -> "sofa"
    masks = tables.read_table(store, MASKS_DIR, ["label_id", "label"])
    pairs = zip(masks["label_id"].to_pylist(), masks["label"].to_pylist(), strict=True)
    return dict(sorted(set(pairs)))


def vocabulary_size(store: Store | str) -> int:
    """Number of classes of the run that made `store`: its class names, else the manifest's
    count, else the largest class id seen + 1."""
    store = as_store(store)
    names = tables.class_names(store)
    if names is not None:
        return len(names)
    manifest = read_manifest(store) or {}
    size = manifest.get("config", {}).get("vocabulary", {}).get("classes")
    if size:
        return int(size)
    return max(class_names(store), default=-1) + 1
