"""Building a GEM model: an open_clip name (or config file) plus weights (tag or path)."""

import hashlib
import logging
import os
import pickle
from pathlib import Path

import open_clip
import torch

from .model import GEM

_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(_CONFIG_DIR)

# Weights shipped in the package, used when `pretrained` is None. `gemlabel-toy` is a toy
# trained in minutes on synthetic shapes (gem/toy/train.py), for offline demos and tests.
BUNDLED_WEIGHTS = {"gemlabel-toy": Path(__file__).parent / "weights" / "gemlabel-toy.pt"}


class WeightsUnavailableError(RuntimeError):
    """The requested weights cannot be obtained (offline, missing file, unknown tag)."""


def resolve_weights(model_name: str, pretrained: str | None) -> str | None:
    """The weights `create_clip` loads: `pretrained`, or a bundled checkpoint's path when
    it is None and the model ships one (None: seeded random weights)."""
    if pretrained is None and model_name in BUNDLED_WEIGHTS:
        return str(BUNDLED_WEIGHTS[model_name])
    return pretrained


def describe_weights(model_name: str, pretrained: str | None, seed: int = 0) -> dict:
    """Which weights `create_clip(model_name, pretrained, seed=seed)` uses, for records:
    `source` ("open_clip", "checkpoint", "bundled" or "random"), its particulars (`model`
    and `tag`; `path` and `sha256`; `name`, `path` and `sha256`; `seed`) and `text`, one
    line for people ("open_clip ViT-B-16 laion2b_s34b_b88k", "checkpoint PATH (sha256
    ...)", "bundled: gemlabel-toy (sha256 ...)", "random, seed 0"). Hashes the file of a
    checkpoint or bundled model (a missing checkpoint: `sha256` None)."""
    weights = resolve_weights(model_name, pretrained)
    if weights is None:
        if model_name.startswith(("hf-hub:", "local-dir:")):  # weights come with the name
            return {"source": "open_clip", "model": model_name, "tag": None, "text": model_name}
        return {"source": "random", "seed": seed, "text": f"random, seed {seed}"}
    if pretrained is None:
        digest = _sha256(weights)
        return {
            "source": "bundled",
            "name": model_name,
            "path": weights,
            "sha256": digest,
            "text": f"bundled: {model_name} (sha256 {digest[:16]})",
        }
    if _is_path(weights) or Path(weights).exists():
        digest = _sha256(weights) if Path(weights).is_file() else None
        return {
            "source": "checkpoint",
            "path": weights,
            "sha256": digest,
            "text": f"checkpoint {weights} (sha256 {digest[:16] if digest else 'unreadable'})",
        }
    return {
        "source": "open_clip",
        "model": model_name,
        "tag": weights,
        "text": f"open_clip {model_name} {weights}",
    }


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _register_config(model_name: str) -> str:
    """Accept a path to an open_clip JSON config as a model name; return the name to use."""
    if model_name.endswith(".json"):
        path = Path(model_name)
        if not path.is_file():
            raise FileNotFoundError(f"model config {model_name} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if model_name not in open_clip.list_models() and not model_name.startswith(
        ("hf-hub:", "local-dir:")
    ):
        raise ValueError(
            f"unknown model {model_name!r}: not an open_clip model name, a registered config "
            "(open_clip.add_model_config) or a .json config path; see open_clip.list_models()"
        )
    return model_name


def _is_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def create_clip(
    model_name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[torch.nn.Module, object]:
    """An open_clip model in eval mode and its tokenizer.

    `pretrained` is an open_clip tag (e.g. "openai", "laion2b_s34b_b88k"), a local
    checkpoint path (loaded with `weights_only=True`), or None: the bundled weights of a
    model in `BUNDLED_WEIGHTS`, else random weights drawn from `seed` (reproducible: every
    process building the same name gets the same model).
    """
    name = _register_config(model_name)
    pretrained = resolve_weights(model_name, pretrained)
    if pretrained is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            logging.disable(logging.WARNING)  # open_clip warns that no weights were loaded
            try:
                model = open_clip.create_model(name, pretrained=None, device=device)
            finally:
                logging.disable(logging.NOTSET)
    elif _is_path(pretrained) or Path(pretrained).exists():
        if not Path(pretrained).is_file():
            raise WeightsUnavailableError(
                f"checkpoint {pretrained} does not exist; pass an existing local checkpoint "
                "path or an open_clip pretrained tag"
            )
        try:
            model = open_clip.create_model(
                name, pretrained=pretrained, device=device, weights_only=True
            )
        except pickle.UnpicklingError as err:
            raise WeightsUnavailableError(
                f"checkpoint {pretrained} holds more than tensors and plain containers; "
                "gemlabel loads weights with weights_only=True and never runs pickled code. "
                "Re-save it as a plain state_dict (torch.save(model.state_dict(), path))."
            ) from err
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise WeightsUnavailableError(
                f"open_clip has no weights {pretrained!r} for {name}; known tags: {tags or 'none'}"
            )
        try:
            model = open_clip.create_model(
                name, pretrained=pretrained, device=device, weights_only=True
            )
        except Exception as err:  # hub/network errors come in many types
            hint = (
                "HF_HUB_OFFLINE is set and they are not in the local Hugging Face cache"
                if _offline()
                else "the download failed"
            )
            raise WeightsUnavailableError(
                f"cannot load weights {pretrained!r} for {name}: {hint} ({type(err).__name__}: "
                f"{err}). Download them where there is network (open_clip.create_model("
                f"{name!r}, pretrained={pretrained!r}) fills the cache, or set HF_HOME to a shared "
                "cache), or pass a local checkpoint path as pretrained."
            ) from err
    model.eval()
    return model, open_clip.get_tokenizer(name)


def create_gem_model(
    model_name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    method: str = "gem",
    seed: int = 0,
    **options,
) -> GEM:
    """Build the open_clip model `model_name` with `pretrained` weights and wrap it in `GEM`.

    `options` are the method's options (`depth`, `iterations`, `temperature`, `ensemble`,
    `l2_norm` for gem); see `gem.GEM`.
    """
    model, tokenizer = create_clip(model_name, pretrained, device=device, seed=seed)
    return GEM(model, method=method, tokenizer=tokenizer, **options).eval()
