"""gem.GEM against a literal, per-image, per-head reference of the computation in docs/gem.md."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

import gem
from gem.methods import METHODS

TEXT_CLASSES = ["cat", "dog", "red car", "tree", "sky"]


def reference_patch_logits(
    model,
    image: torch.Tensor,
    text: torch.Tensor,
    depth: int = 6,
    iterations: int = 1,
    temperature="adaptive",
    ensemble=("q", "k", "v"),
    l2_norm: bool = True,
) -> torch.Tensor:
    """docs/gem.md written out literally for one image `[3, H, W]`: loops over blocks,
    heads and projections; the averaged map applied to v once. Returns `[C, h, w]`."""
    visual = model.visual
    blocks = visual.transformer.resblocks
    width = visual.conv1.out_channels
    heads = blocks[0].attn.num_heads
    d = width // heads
    feat = visual.conv1(image.unsqueeze(0))[0]  # [D, h, w]
    gh, gw = feat.shape[-2:]
    tokens = feat.reshape(width, -1).T
    pos_cls, pos_patch = visual.positional_embedding[:1], visual.positional_embedding[1:]
    oh, ow = visual.grid_size
    if (gh, gw) != (oh, ow):
        grid = pos_patch.reshape(1, oh, ow, width).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False
        )
        pos_patch = grid.permute(0, 2, 3, 1).reshape(gh * gw, width)
    h = visual.ln_pre(
        torch.cat([visual.class_embedding[None], tokens]) + torch.cat([pos_cls, pos_patch])
    )
    hs = [h]
    for block in blocks:
        hs.append(block(hs[-1].unsqueeze(0))[0])
    first = len(blocks) - depth
    z = hs[first].clone()
    for index in range(first, len(blocks)):
        block = blocks[index]
        x = block.ln_1(hs[index])
        w_in, b_in = block.attn.in_proj_weight, block.attn.in_proj_bias
        proj = {
            "q": x @ w_in[:width].T + b_in[:width],
            "k": x @ w_in[width : 2 * width].T + b_in[width : 2 * width],
            "v": x @ w_in[2 * width :].T + b_in[2 * width :],
        }
        if temperature == "adaptive":
            s = torch.stack([x[i].norm() for i in range(x.shape[0])]).mean() * d**-0.5
        else:
            s = temperature
        outputs = []
        for head in range(heads):
            cols = slice(head * d, (head + 1) * d)
            maps = []
            for name in ensemble:
                p = proj[name][:, cols]
                for _ in range(iterations):
                    p_hat = F.normalize(p, dim=-1) if l2_norm else p
                    p = torch.softmax(s * p_hat @ p_hat.T, dim=-1) @ p_hat
                p_hat = F.normalize(p, dim=-1) if l2_norm else p
                maps.append(torch.softmax(s * p_hat @ p_hat.T, dim=-1))
            attn = sum(maps) / len(maps)
            outputs.append(attn @ proj["v"][:, cols])
        o = torch.cat(outputs, dim=1) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
        z = z + block.ls_1(o)
    patches = F.normalize(visual.ln_post(z)[1:] @ visual.proj, dim=-1)
    logits = patches @ F.normalize(text, dim=-1).T  # [n, C]
    return logits.T.reshape(-1, gh, gw)


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return tiny_clip[0]


@pytest.fixture(scope="module")
def text(tiny_clip):
    model, tokenizer = tiny_clip
    return gem.encode_class_names(model, tokenizer, TEXT_CLASSES)


def images(batch: int, size=(64, 48), seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


OPTION_SETTINGS = [
    {},
    {"depth": 3},
    {"depth": 8, "iterations": 0},
    {"iterations": 2},
    {"iterations": 3, "temperature": 4.0},
    {"ensemble": ("v",)},
    {"ensemble": ("q", "k")},
    {"l2_norm": False, "temperature": 0.25},
]


@pytest.mark.parametrize("options", OPTION_SETTINGS, ids=str)
@pytest.mark.parametrize("size", [(32, 32), (64, 48)], ids=str)
@torch.no_grad()
def test_matches_literal_reference(clip, text, options, size):
    model = gem.GEM(clip, **options)
    x = images(2, size)
    got = model(x, text)
    for i in range(2):
        want = reference_patch_logits(clip, x[i], text, **{"depth": 6, **options})
        assert got[i].shape == want.shape
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


@torch.no_grad()
def test_defaults_are_the_release(clip):
    model = gem.GEM(clip)
    assert model.depth == 6
    assert model.options == {
        "ensemble": ("q", "k", "v"),
        "iterations": 1,
        "temperature": "adaptive",
        "l2_norm": True,
    }


@pytest.mark.parametrize("method", list(METHODS))
@torch.no_grad()
def test_batch_invariance(clip, text, method):
    model = gem.GEM(clip, method=method)
    x = images(4, (48, 80), seed=1)
    batched = gem.heatmaps(model(x, text), (48, 80))
    for i in range(4):
        alone = gem.heatmaps(model(x[i : i + 1], text), (48, 80))
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=0)
    shuffled = gem.heatmaps(model(x.flip(0), text), (48, 80)).flip(0)
    torch.testing.assert_close(batched, shuffled, atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_clip_path_is_untouched(pool_type):
    """The image embedding is open_clip's (up to float rounding), also where GEM's last
    block updates only the class token (class-token pooling) and where all tokens are pooled."""
    config = open_clip.get_model_config("gemlabel-tiny")
    config["vision_cfg"]["pool_type"] = pool_type
    clip = open_clip.CLIP(**config).eval()
    assert clip.visual.pool_type == pool_type
    x = images(3, (32, 32), seed=2)
    for method in METHODS:
        features = gem.GEM(clip, method=method).encode_image(x)
        torch.testing.assert_close(features.image_embeds, clip.encode_image(x), atol=1e-5, rtol=0)


@torch.no_grad()
def test_each_option_changes_the_output(clip, text):
    x = images(2, (64, 64), seed=3)
    base = gem.heatmaps(gem.GEM(clip)(x, text), (64, 64))
    for options in OPTION_SETTINGS[1:] + [{"temperature": 1.0}, {"depth": 5}]:
        other = gem.heatmaps(gem.GEM(clip, **options)(x, text), (64, 64))
        assert (other - base).abs().max() > 1e-3, options


@torch.no_grad()
def test_each_baseline_differs_from_gem(clip, text):
    x = images(2, (64, 64), seed=4)
    base = gem.GEM(clip)(x, text)
    outputs = {name: gem.GEM(clip, method=name)(x, text) for name in METHODS if name != "gem"}
    outputs["clip_surgery_plain"] = gem.GEM(clip, method="clip_surgery", feature_surgery=False)(
        x, text
    )
    for name, logits in outputs.items():
        assert logits.shape == base.shape
        assert (logits - base).abs().max() > 1e-3, name


@torch.no_grad()
def test_baselines_match_their_definitions(clip, text):
    """clip = final tokens; maskclip = last block's value path; clip_surgery without
    feature surgery = v-v attention without L2 norm at the softmax scale 1/sqrt(d)."""
    x = images(2, (64, 48), seed=5)
    heads = clip.visual.transformer.resblocks[0].attn.num_heads
    d = clip.visual.conv1.out_channels // heads
    surgery = gem.GEM(clip, method="clip_surgery", feature_surgery=False)(x, text)
    for i in range(2):
        want = reference_patch_logits(
            clip, x[i], text, iterations=0, temperature=d**-0.5, ensemble=("v",), l2_norm=False
        )
        torch.testing.assert_close(surgery[i], want, atol=1e-5, rtol=0)
    # CLIP: plain final-layer tokens through ln_post and proj
    model = gem.GEM(clip, method="clip")
    tokens = model._embed(x)
    for block in clip.visual.transformer.resblocks:
        tokens = block(tokens)
    patches = clip.visual.ln_post(tokens[:, 1:]) @ clip.visual.proj
    want = gem.patch_logits(patches.reshape(2, 8, 6, -1), text)
    torch.testing.assert_close(model(x, text), want, atol=1e-5, rtol=0)
    # MaskCLIP: residual + out_proj(v) on the last block, no MLP
    blocks = clip.visual.transformer.resblocks
    tokens = model._embed(x)
    for block in blocks[:-1]:
        tokens = block(tokens)
    last = blocks[-1]
    v = F.linear(
        last.ln_1(tokens),
        *(p[2 * 64 :] for p in (last.attn.in_proj_weight, last.attn.in_proj_bias)),
    )
    z = tokens + last.attn.out_proj(v)
    want = gem.patch_logits(
        (clip.visual.ln_post(z[:, 1:]) @ clip.visual.proj).reshape(2, 8, 6, -1), text
    )
    torch.testing.assert_close(gem.GEM(clip, method="maskclip")(x, text), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(32, 32), (64, 64), (40, 72), (72, 40)], ids=str)
@torch.no_grad()
def test_any_input_size(clip, text, size):
    model = gem.GEM(clip)
    logits = model(images(1, size), text)
    assert logits.shape == (1, len(TEXT_CLASSES), size[0] // 8, size[1] // 8)
    maps = gem.heatmaps(logits, size)
    assert maps.shape == (1, len(TEXT_CLASSES), *size)
    assert maps.min() >= 0 and maps.max() <= 1


@torch.no_grad()
def test_patch_embedding_is_the_convolution():
    """`patch_embed` (a matrix product over unfolded patches) gives the convolution's
    tokens, with a bias too and for sizes that leave pixels over (the convolution drops
    them); a ViT whose patches overlap is refused."""
    conv = torch.nn.Conv2d(3, 24, kernel_size=(8, 6), stride=(8, 6), bias=True)
    x = images(2, (37, 50), seed=4)
    want = conv(x)
    got, grid = gem.model.patch_embed(conv, x)
    assert grid == tuple(want.shape[-2:]) == (4, 8)
    torch.testing.assert_close(got, want.flatten(2).transpose(1, 2), atol=1e-5, rtol=0)
    config = open_clip.get_model_config("gemlabel-tiny")
    clip = open_clip.CLIP(**config)
    clip.visual.conv1.stride = (4, 4)
    with pytest.raises(TypeError, match="non-overlapping"):
        gem.GEM(clip)


@torch.no_grad()
def test_per_image_text_subsets(clip, text):
    """Heatmaps against a per-image subset of classes equal the same columns of the full map."""
    model = gem.GEM(clip)
    x = images(2, (64, 48), seed=6)
    features = model.encode_image(x)
    full = gem.patch_logits(features.patch_embeds, text)
    picks = torch.tensor([[4, 0], [1, 3]])
    subset = gem.patch_logits(features.patch_embeds, text[picks])
    for i in range(2):
        torch.testing.assert_close(subset[i], full[i, picks[i]])


def test_bf16_autocast_runs_close_to_fp32(clip, text):
    x = images(2, (64, 64), seed=7)
    model = gem.GEM(clip)
    with torch.no_grad():
        fp32 = gem.heatmaps(model(x, text), (64, 64))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = gem.heatmaps(model(x, text).float(), (64, 64))
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().mean() < 0.05


def test_gradients_flow_through_the_pathway(clip, text):
    """Training code (e.g. a dense alignment loss) can backpropagate through GEM."""
    model = gem.GEM(clip)
    model(images(1, (32, 32)), text).sum().backward()
    grad = clip.visual.transformer.resblocks[-1].attn.in_proj_weight.grad
    assert grad is not None and grad.abs().sum() > 0
    clip.zero_grad(set_to_none=True)
