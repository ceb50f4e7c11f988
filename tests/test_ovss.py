"""SCLIP, ClearCLIP and NACLIP against an independent computation written from
docs/ovss.md (not from `gem/`): per image, per head, LayerNorm, attention, QuickGELU MLP
and the DINO-style bicubic resampling of the position table spelled out by hand.

Judged as the note says: dense logits `[C, h, w]` after per-(image, class) min-max, max
abs error <= 1e-4, fp32. Each wrong variant of the note's "common mistakes" table is the
same reference with one thing changed; the tests show it misses the implementation by more
than the tolerance, so the comparison can tell them apart.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import gem

MODEL = "gemlabel-tiny-openai"  # OpenAI layout: QuickGELU, 6 blocks, width 128, patch 16
TOL = 1e-4
METHOD_NAMES = ("sclip", "clearclip", "naclip")
# (batch, (H, W)): native 14 x 14 grid; non-square; non-native; a 7 x 28 grid with the
# table's token count (used as stored); sizes leaving pixels over the patch grid.
CASES = [
    (1, (224, 224)),
    (2, (224, 224)),
    (2, (224, 320)),
    (1, (288, 224)),
    (2, (112, 448)),
    (3, (250, 203)),
]


def layer_norm(x, module):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * module.weight + module.bias


def cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def bicubic_matrix(n_out: int, n_in: int, step: float) -> torch.Tensor:
    """Rows of weights: output i reads source coordinate (i + 0.5) * step - 0.5, four taps
    clamped to the border (PyTorch's bicubic, a = -0.75, no antialias)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = (i + 0.5) * step - 0.5
        base = math.floor(src)
        frac = src - base
        for tap in range(-1, 3):
            m[i, min(max(base + tap, 0), n_in - 1)] += cubic(tap - frac)
    return m


def position_table(table: torch.Tensor, g0: int, h: int, w: int, rule: str) -> torch.Tensor:
    """The position table for an h x w grid. `dino` is the authors' rule (section 1);
    `antialias` (open_clip/GEM) and `exact` (no +0.1) are the table's two mistakes."""
    if h * w == g0 * g0 and rule == "dino":
        return table
    cls, grid = table[:1], table[1:].reshape(g0, g0, -1)
    if rule == "dino":
        rows = bicubic_matrix(h, g0, g0 / (h + 0.1))
        cols = bicubic_matrix(w, g0, g0 / (w + 0.1))
        patches = torch.einsum("ir,rcd,jc->ijd", rows, grid.double(), cols).float()
    elif rule == "exact":
        rows, cols = bicubic_matrix(h, g0, g0 / h), bicubic_matrix(w, g0, g0 / w)
        patches = torch.einsum("ir,rcd,jc->ijd", rows, grid.double(), cols).float()
    else:
        patches = F.interpolate(
            grid.permute(2, 0, 1)[None], size=(h, w), mode="bicubic", antialias=True
        )[0].permute(1, 2, 0)
    return torch.cat([cls, patches.reshape(h * w, -1)])


def omega(h: int, w: int, sigma: float, mistake: str | None) -> torch.Tensor:
    """NACLIP's neighbourhood bias written pairwise; its mistakes change it."""
    if mistake == "omega_transposed":
        h, w = w, h
    n = h * w
    out = torch.zeros(1 + n, 1 + n)
    for i in range(n):
        for j in range(n):
            dr, dc = i // w - j // w, i % w - j % w
            out[1 + i, 1 + j] = math.exp(-(dr * dr + dc * dc) / (2 * sigma * sigma))
    if mistake == "omega_normalised":  # divided by the sum of the whole Gaussian window
        window = sum(
            math.exp(-(r * r + c * c) / (2 * sigma * sigma))
            for r in range(-h + 1, h)
            for c in range(-w + 1, w)
        )
        out = out / window
    if mistake == "omega_cls_one":
        out[0, :] = 1
        out[:, 0] = 1
    return out


def mlp(x, block):
    fc, proj = block.mlp.c_fc, block.mlp.c_proj
    z = x @ fc.weight.T + fc.bias
    return (z * torch.sigmoid(1.702 * z)) @ proj.weight.T + proj.bias


def attention(x, block, kind: str, bias=None, scale: bool = True):
    """Per head: softmax over keys of a similarity between two of q, k (or the sum of two
    maps for `csa`), applied to v; heads merged; output projection."""
    attn = block.attn
    width = x.shape[-1]
    heads = attn.num_heads
    d = width // heads
    qkv = x @ attn.in_proj_weight.T + attn.in_proj_bias
    q, k, v = qkv[:, :width], qkv[:, width : 2 * width], qkv[:, 2 * width :]
    s = d**-0.5 if scale else 1.0
    outs = []
    for head in range(heads):
        cols = slice(head * d, (head + 1) * d)
        qh, kh, vh = q[:, cols], k[:, cols], v[:, cols]
        first, second = {"qk": (qh, kh), "qq": (qh, qh), "kk": (kh, kh)}.get(kind, (qh, qh))
        logits = s * first @ second.T + (0 if bias is None else bias)
        a = torch.softmax(logits, dim=-1)
        if kind in ("csa", "csa_mean"):  # SCLIP: q-q and k-k maps, each normalized, added
            a = a + torch.softmax(s * kh @ kh.T, dim=-1)
            a = a / 2 if kind == "csa_mean" else a
        outs.append(a @ vh)
    return torch.cat(outs, dim=1) @ attn.out_proj.weight.T + attn.out_proj.bias


def reference(clip, image, text, method: str, mistake: str | None = None, sigma: float = 5.0):
    """Dense logits `[C, h, w]` of one image `[3, H, W]` by docs/ovss.md, with at most one
    `mistake` from its table (section 8)."""
    visual = clip.visual
    conv = visual.conv1
    p = conv.kernel_size[0]
    width = conv.out_channels
    h, w = image.shape[1] // p, image.shape[2] // p
    pixels = image[:, : h * p, : w * p].reshape(3, h, p, w, p).permute(1, 3, 0, 2, 4)
    tokens = pixels.reshape(h * w, 3 * p * p) @ conv.weight.reshape(width, -1).T
    g0 = visual.grid_size[0]
    rule = {"pos_antialias": "antialias", "pos_exact": "exact"}.get(mistake, "dino")
    pos = position_table(visual.positional_embedding, g0, h, w, rule)
    x = torch.cat([visual.class_embedding[None], tokens]) + pos
    x = layer_norm(x, visual.ln_pre)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = x + attention(layer_norm(x, block.ln_1), block, "qk")
        x = x + mlp(layer_norm(x, block.ln_2), block)
    last = blocks[-1]
    y = layer_norm(x, last.ln_1)
    residual, ffn = False, False
    if method == "sclip":
        kind = {"sclip_qk": "qk", "sclip_mean": "csa_mean"}.get(mistake, "csa")
        o = attention(y, last, kind)
        residual, ffn = mistake != "sclip_no_residual", mistake != "sclip_no_ffn"
    elif method == "clearclip":
        kind = {"clearclip_kk": "kk", "clearclip_vanilla": "qk"}.get(mistake, "qq")
        o = attention(y, last, kind, scale=mistake != "clearclip_no_scale")
        residual = mistake in ("clearclip_residual", "clearclip_residual_ffn")
        ffn = mistake == "clearclip_residual_ffn"
    else:
        sigma = 4.0 if mistake == "naclip_sigma4" else sigma
        bias = None if mistake == "omega_none" else omega(h, w, sigma, mistake)
        o = attention(y, last, "kk", bias=bias)
        residual = ffn = mistake == "naclip_residual_ffn"
    z = x + o if residual else o
    if ffn:
        z = z + mlp(layer_norm(z, last.ln_2), last)
    feats = layer_norm(z, visual.ln_post)[1:] @ visual.proj
    feats = feats / feats.norm(dim=-1, keepdim=True)
    return (feats @ text.T).T.reshape(-1, h, w)


def normalized(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(-2)
    lo, hi = flat.min(-1, keepdim=True)[0], flat.max(-1, keepdim=True)[0]
    return ((flat - lo) / (hi - lo)).reshape(maps.shape)


@pytest.fixture(scope="module")
def clip():
    return gem.create_clip(MODEL)[0]


@pytest.fixture(scope="module")
def text(clip):
    return F.normalize(torch.randn(5, clip.visual.proj.shape[1], generator=_gen(9)), dim=-1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def inputs(batch: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=_gen(seed))


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((normalized(got) - normalized(want)).abs().max())


@pytest.mark.parametrize("batch, size", CASES, ids=str)
@pytest.mark.parametrize("method", METHOD_NAMES)
@torch.no_grad()
def test_matches_independent_computation(clip, text, method, batch, size):
    model = gem.GEM(clip, method=method)
    x = inputs(batch, size, seed=sum(size))
    got = model(x, text)
    assert got.shape == (batch, len(text), size[0] // 16, size[1] // 16)
    for i in range(batch):
        want = reference(clip, x[i], text, method)
        assert max_error(got[i], want) <= TOL


MISTAKES = {
    "sclip": ["sclip_no_residual", "sclip_no_ffn", "sclip_qk", "sclip_mean"],
    "clearclip": [
        "clearclip_residual",
        "clearclip_residual_ffn",
        "clearclip_kk",
        "clearclip_no_scale",
        "clearclip_vanilla",
    ],
    "naclip": [
        "naclip_sigma4",
        "omega_normalised",
        "omega_cls_one",
        "omega_transposed",
        "omega_none",
        "naclip_residual_ffn",
    ],
}
POSITION_MISTAKES = ["pos_antialias", "pos_exact"]


@pytest.mark.parametrize(
    "method, mistake",
    [(m, x) for m, xs in MISTAKES.items() for x in xs]
    + [(m, x) for m in METHOD_NAMES for x in POSITION_MISTAKES],
)
@torch.no_grad()
def test_each_mistake_fails_the_comparison(clip, text, method, mistake):
    """Non-square, non-native input (the transposed Omega and the table resampling show only
    there); batch 2."""
    model = gem.GEM(clip, method=method)
    x = inputs(2, (224, 320), seed=7)
    got = model(x, text)
    errors = [max_error(got[i], reference(clip, x[i], text, method, mistake)) for i in range(2)]
    assert max(errors) > TOL, errors


@torch.no_grad()
def test_fp16_fails_the_comparison(clip, text):
    """The authors' GPU precision (fp16 weights and activations) is outside the tolerance."""
    model = gem.GEM(clip, method="naclip")
    x = inputs(1, (224, 320), seed=8)
    half = gem.GEM(gem.create_clip(MODEL)[0].half(), method="naclip")
    with torch.autocast("cpu", enabled=False):
        low = half(x.half(), text.half()).float()
    assert max_error(low[0], model(x, text)[0]) > TOL


@torch.no_grad()
def test_logit_scale_cancels(clip, text):
    """Multiplying the logits by a logit scale is no mistake under min-max."""
    x = inputs(1, (224, 224), seed=3)
    got = gem.GEM(clip, method="sclip")(x, text)[0]
    assert max_error(got, 40 * reference(clip, x[0], text, "sclip")) <= TOL


@torch.no_grad()
def test_sigma_option(clip, text):
    x = inputs(1, (224, 320), seed=4)
    got = gem.GEM(clip, method="naclip", sigma=3)(x, text)[0]
    assert max_error(got, reference(clip, x[0], text, "naclip", sigma=3.0)) <= TOL


@torch.no_grad()
def test_clearclip_residual_switch(clip, text):
    """ClearCLIP's `ignore_residual=False`: residual and FFN kept."""
    x = inputs(1, (224, 320), seed=5)
    got = gem.GEM(clip, method="clearclip", residual=True, ffn=True)(x, text)[0]
    want = reference(clip, x[0], text, "clearclip", "clearclip_residual_ffn")
    assert max_error(got, want) <= TOL


def test_position_rule_edge_case(clip):
    """A 7 x 28 grid has the 14 x 14 table's token count: the table is used as stored."""
    table = clip.visual.positional_embedding
    same = gem.resample_pos_embed(table, (7, 28), (14, 14), rule="dino")
    assert same is table
    resized = gem.resample_pos_embed(table, (7, 28), (14, 14))
    assert resized.shape == table.shape and not torch.equal(resized, table)
    want = position_table(table, 14, 18, 20, "dino")
    got = gem.resample_pos_embed(table, (18, 20), (14, 14), rule="dino")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
