"""Which weights a run or a prompt bank uses, from `--model` and `--pretrained` (no torch).

Not given, `--pretrained` means the model's own weights: the paper's for its model
(DEFAULT_WEIGHTS), or the weights a bundled model ships with (gemlabel-toy). Seeded
random weights are used only when asked for: `--pretrained random` (for tests and
throughput measurements: their masks mean nothing)."""

from importlib.util import find_spec
from pathlib import Path

DEFAULT_MODEL = "ViT-B-16"
DEFAULT_WEIGHTS = {"ViT-B-16": "laion2b_s34b_b88k"}  # the GEM paper's
RANDOM_WEIGHTS = "random"


def default_pretrained(model: str, pretrained: str | None) -> str | None:
    """`pretrained`, or when it is None the model's default weights (None if it has none)."""
    return DEFAULT_WEIGHTS.get(model) if pretrained is None else pretrained


def gem_pretrained(pretrained: str | None) -> str | None:
    """What `gem.create_gem_model` takes: None for `--pretrained random` (seeded random
    weights) or for a bundled model's own, else the tag or checkpoint."""
    return None if pretrained == RANDOM_WEIGHTS else pretrained


def bundled_models() -> list[str]:
    """The models whose weights ship with gem (gem.factory.BUNDLED_WEIGHTS: the checkpoints
    gem/weights/<model>.pt), read from gem's folder without importing gem, which loads torch."""
    folder = Path(find_spec("gem").submodule_search_locations[0]) / "weights"
    return sorted(p.stem for p in folder.glob("*.pt"))
