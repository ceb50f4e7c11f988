"""The training-free localization methods, as data: which attention the pathway uses,
over how many final blocks, how position embeddings are resampled, and the options each
accepts (with their defaults).

`gem` defaults reproduce the authors' release (`gem_torch` 1.0.1): the last 6 blocks
(their `gem_depth=7`), one iteration, adaptive temperature, the q+k+v ensemble, L2 norm.

`sclip`, `clearclip` and `naclip` replace the last block (docs/ovss.md); their defaults
are the authors' code: SCLIP keeps the block's residual and FFN, ClearCLIP and NACLIP drop
both (`residual`, `ffn`; ClearCLIP's `ignore_residual=False` is `residual=True, ffn=True`),
NACLIP's Gaussian has `sigma` 5 (patch units). ClearCLIP is the paper's q-q attention; the
authors' shipped configs run `model_type='vanilla'` (q-k attention, residual and FFN
dropped), a different method.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .attention import (
    correlative_attention,
    gem_attention,
    kmeans_attention,
    neighbourhood_attention,
    query_query_attention,
    value_attention,
    value_value_attention,
)


@dataclass(frozen=True)
class Method:
    """A localization method: `attention` maps `(x, q, k, v, **options)` (and `grid=(h, w)`
    when `uses_grid`) to per-head outputs in a pathway over the last `depth` blocks (None:
    plain CLIP tokens). The pathway starts from the CLIP path's tokens unless the option
    `residual` is False, and ends with the last block's FFN when the option `ffn` is True.
    `pos_embed` is the position-embedding rule (`gem.pos_embed`)."""

    name: str
    attention: Callable[..., Any] | None
    depth: int
    options: dict[str, Any] = field(default_factory=dict)
    depth_is_fixed: bool = False
    feature_surgery: bool = False
    pos_embed: str = "antialias"
    uses_grid: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "gem",
            gem_attention,
            depth=6,
            options={
                "ensemble": ("q", "k", "v"),
                "iterations": 1,
                "temperature": "adaptive",
                "l2_norm": True,
            },
        ),
        Method("clip", None, depth=0, depth_is_fixed=True),
        Method("maskclip", value_attention, depth=1, depth_is_fixed=True),
        Method("clip_surgery", value_value_attention, depth=6, feature_surgery=True),
        Method(
            "gem_kmeans",
            kmeans_attention,
            depth=6,
            options={"clusters": 8, "kmeans_iterations": 10},
        ),
        Method(
            "sclip",
            correlative_attention,
            depth=1,
            depth_is_fixed=True,
            options={"residual": True, "ffn": True},
            pos_embed="dino",
        ),
        Method(
            "clearclip",
            query_query_attention,
            depth=1,
            depth_is_fixed=True,
            options={"residual": False, "ffn": False},
            pos_embed="dino",
        ),
        Method(
            "naclip",
            neighbourhood_attention,
            depth=1,
            depth_is_fixed=True,
            options={"residual": False, "ffn": False, "sigma": 5.0},
            pos_embed="dino",
            uses_grid=True,
        ),
    ]
}


def list_methods() -> list[str]:
    """Names of the available methods."""
    return list(METHODS)


def get_method(name: str) -> Method:
    """The method called `name`, or a ValueError listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def resolve_options(method: Method, num_blocks: int, depth: int | None, options: dict) -> dict:
    """Validate user options against `method`, fill defaults, and return them with `depth`."""
    unknown = (
        set(options)
        - set(method.options)
        - ({"feature_surgery"} if method.feature_surgery else set())
    )
    if unknown:
        accepted = ["depth", *method.options] + (
            ["feature_surgery"] if method.feature_surgery else []
        )
        raise ValueError(
            f"method {method.name!r} does not take option(s) {sorted(unknown)}; "
            f"it accepts {accepted}"
        )
    if depth is None:
        depth = method.depth
    elif method.depth_is_fixed and depth != method.depth:
        raise ValueError(f"method {method.name!r} always uses depth={method.depth}, got {depth}")
    if not isinstance(depth, int) or not 0 <= depth <= num_blocks:
        raise ValueError(
            f"depth must be an int in [1, {num_blocks}] (the model's blocks), got {depth!r}"
        )
    if method.depth > 0 and depth < 1:
        raise ValueError(f"method {method.name!r} needs depth >= 1, got {depth}")
    resolved = {**method.options, **{k: v for k, v in options.items() if k != "feature_surgery"}}
    if "ensemble" in resolved:
        ensemble = tuple(resolved["ensemble"])
        if (
            not ensemble
            or not set(ensemble) <= {"q", "k", "v"}
            or len(set(ensemble)) != len(ensemble)
        ):
            raise ValueError(
                f"ensemble must be a non-empty subset of ('q', 'k', 'v'), got {ensemble!r}"
            )
        resolved["ensemble"] = tuple(p for p in "qkv" if p in ensemble)
    if "iterations" in resolved:
        it = resolved["iterations"]
        if isinstance(it, bool) or not isinstance(it, int) or it < 0:
            raise ValueError(f"iterations must be an int >= 0, got {it!r}")
    if "temperature" in resolved:
        t = resolved["temperature"]
        if t != "adaptive" and (isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0):
            raise ValueError(f"temperature must be 'adaptive' or a positive number, got {t!r}")
    for name in ("l2_norm", "residual", "ffn"):
        if name in resolved and not isinstance(resolved[name], bool):
            raise ValueError(f"{name} must be a bool, got {resolved[name]!r}")
    if "sigma" in resolved:
        sigma = resolved["sigma"]
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma <= 0:
            raise ValueError(f"sigma must be a positive number, got {sigma!r}")
        resolved["sigma"] = float(sigma)
    for name in ("clusters", "kmeans_iterations"):
        if name in resolved and (not isinstance(resolved[name], int) or resolved[name] < 1):
            raise ValueError(f"{name} must be an int >= 1, got {resolved[name]!r}")
    feature_surgery = bool(options.get("feature_surgery", False))
    return {"depth": depth, "feature_surgery": feature_surgery, **resolved}
