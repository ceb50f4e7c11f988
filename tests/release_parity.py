"""Numerical parity of `gem.GEM` against the authors' release (PyPI `gem_torch==1.0.1`).

Not a pytest module: the release needs open_clip 2.23-2.24 (sequence-first attention) and
crashes on open_clip 3.x, so it runs in a separate virtual environment. This one script
drives both sides:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install open_clip_torch==2.24.0 gem_torch==1.0.1 einops \\
        opencv-python-headless matplotlib
    .venv/bin/python tests/release_parity.py --ref-python /tmp/refvenv/bin/python

1. The reference stage (`--stage ref`, run by `--ref-python` in a subprocess) builds each
   open_clip 2.24 model with seeded random weights, saves its state_dict, random inputs and
   random normalized text embeddings, and runs the release's `GEMWrapper` (batched and one
   image at a time) for each setting: min-max normalized heatmaps at input size, the
   unnormalized upsampled maps, the raw patch logits and the GEM patch features.
2. This interpreter (open_clip 3.x, gemlabel's `gem`) loads the same state_dict, wraps it
   in `gem.GEM` with the matching options and compares.

Release `gem_depth=d` is gemlabel `depth=d-1`; release `ss_attn_temp` is gemlabel's
`temperature` (both multiply the cosine similarities); `ss_attn_iter` is `iterations`.
Exit status 1 when any normalized heatmap differs by more than `--tol` (default 1e-4).
Intermediate tensors live in a temporary folder (`--workdir` keeps them).
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "gem" / "model_configs" / "gemlabel-tiny.json"
CLASSES = ["cat", "dog", "car"]

# (gem_depth, ss_attn_iter, ss_attn_temp) as the release names them; None: adaptive.
TINY_SETTINGS = [
    (7, 1, None),
    (7, 2, None),
    (7, 3, None),
    (7, 1, 5.0),
    (7, 2, 20.0),
    (4, 1, None),
    (9, 1, None),
]
B16_SETTINGS = [(7, 1, None), (7, 2, None), (7, 1, 5.0)]


def build_spec(workdir: Path, with_b16: bool, threads: int) -> dict:
    """The models, inputs (B, H, W) and settings both stages run."""
    tiny_ls = json.loads(TINY_CONFIG.read_text())
    tiny_ls["vision_cfg"]["ls_init_value"] = 0.5
    ls_path = workdir / "gemlabel-tiny-ls.json"
    ls_path.write_text(json.dumps(tiny_ls))
    models = [
        {
            "key": "tiny",
            "name": TINY_CONFIG.stem,
            "config": str(TINY_CONFIG),
            "inputs": {
                "32x32": [2, 32, 32],
                "64x64": [2, 64, 64],
                "64x48": [2, 64, 48],
                "40x72": [2, 40, 72],
                "50x45": [2, 50, 45],
            },
            "settings": TINY_SETTINGS,
        },
        {
            "key": "tiny-layerscale",
            "name": ls_path.stem,
            "config": str(ls_path),
            "inputs": {"64x48": [2, 64, 48]},
            "settings": [(7, 1, None), (7, 2, 5.0)],
        },
    ]
    if with_b16:
        models.append(
            {
                "key": "ViT-B-16",
                "name": "ViT-B-16",
                "config": None,
                "inputs": {"448x448": [2, 448, 448]},
                "settings": B16_SETTINGS,
            }
        )
    return {"seed": 0, "classes": CLASSES, "models": models, "threads": threads}


def setting_key(setting) -> str:
    depth, iters, temp = setting
    return f"gem_depth={depth} iter={iters} temp={'adaptive' if temp is None else temp}"


# --------------------------------------------------------------------------- reference side


def fixed_text_encoder(text):
    """A stand-in for the release's `encode_text`: the given `[C, E]` embeddings as `[1, C, E]`."""

    def encode_text(_names):
        return text.unsqueeze(0)

    return encode_text


def run_reference(workdir: Path) -> None:
    """In the reference venv: open_clip 2.24 models, inputs, and the release's outputs."""
    # The release's package is also called `gem`: make sure it is not the repo's.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (REPO, REPO / "tests")]
    import open_clip
    import torch
    import torch.nn.functional as F
    from einops import rearrange

    import gem as release

    if not hasattr(release, "GEMWrapper") and not hasattr(release, "create_gem_model"):
        raise SystemExit(f"`gem` at {release.__file__} is not the gem_torch release")
    from gem.gem_wrapper import GEMWrapper
    from open_clip.version import __version__ as oc_version

    spec = json.loads((workdir / "spec.json").read_text())
    torch.set_num_threads(spec["threads"])
    versions = {"torch": torch.__version__, "open_clip": oc_version, "gem": release.__file__}
    (workdir / "ref_versions.json").write_text(json.dumps(versions))
    torch.set_grad_enabled(False)

    for m in spec["models"]:
        if m["config"]:
            open_clip.add_model_config(m["config"])
        torch.manual_seed(spec["seed"])
        base = open_clip.create_model(m["name"], pretrained=None, precision="fp32")
        if "layerscale" in m["key"]:
            # Non-uniform layer scales so that ls_1 on the GEM path is really exercised.
            for name, p in base.visual.named_parameters():
                if name.endswith(".gamma"):
                    p.copy_(torch.rand(p.shape) + 0.25)
        base.eval()
        tokenizer = open_clip.get_tokenizer(m["name"])
        gen = torch.Generator().manual_seed(spec["seed"] + 1)
        embed_dim = base.visual.output_dim
        text = F.normalize(torch.randn(len(spec["classes"]), embed_dim, generator=gen), dim=-1)
        inputs = {k: torch.randn(*s[:1], 3, *s[1:], generator=gen) for k, s in m["inputs"].items()}
        out = {"state_dict": base.state_dict(), "inputs": inputs, "text": text, "results": {}}

        for setting in m["settings"]:
            depth, iters, temp = setting = tuple(setting)
            wrapper = GEMWrapper(
                copy.deepcopy(base), tokenizer, depth=depth, ss_attn_iter=iters, ss_attn_temp=temp
            ).eval()
            real_encode_text = wrapper.encode_text
            fixed_text = fixed_text_encoder(text)
            wrapper.encode_text = fixed_text
            p = wrapper.patch_size
            for in_key, x in inputs.items():
                feat_gem, feat_ori = wrapper.model.visual(x)
                rows, cols = x.shape[-2] // p, x.shape[-1] // p
                logits = F.normalize(feat_gem, dim=-1)[:, 1:] @ text.T
                logits = rearrange(logits, "b (w h) c -> b c w h", w=rows, h=cols)
                res = {
                    "maps": wrapper(x, spec["classes"]),
                    "maps_single": torch.cat([wrapper(xi[None], spec["classes"]) for xi in x]),
                    "raw": wrapper(x, spec["classes"], normalize=False),
                    "patch_logits": logits,
                    "patch_feats": feat_gem[:, 1:],
                    "clip_cls": feat_ori[:, 0],
                }
                if setting == (7, 1, None):
                    # The whole release path, text tower included.
                    wrapper.encode_text = real_encode_text
                    res["text_tower"] = real_encode_text(spec["classes"])[0]
                    res["maps_text_tower"] = wrapper(x, spec["classes"])
                    wrapper.encode_text = fixed_text
                out["results"][f"{in_key}|{setting_key(setting)}"] = res
        torch.save(out, workdir / f"ref_{m['key']}.pt")
        print(f"[ref] {m['key']}: done", flush=True)


# --------------------------------------------------------------------------------- our side


def max_diff(a, b) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.double() - b.double()).abs().max().item()


def run_ours(workdir: Path, tol: float) -> bool:
    import logging

    import open_clip
    import torch

    import gem

    spec = json.loads((workdir / "spec.json").read_text())
    torch.set_grad_enabled(False)
    torch.set_num_threads(spec["threads"])
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "initialized randomly"
    ok = True
    header = (
        f"{'model':16} {'input':8} {'setting':34} {'maps':>9} {'maps/1img':>9} "
        f"{'raw':>9} {'logits':>9} {'feats':>9} {'cls':>9} {'batch-inv':>9} {'logit range':>11}"
    )
    print(header)
    print("-" * len(header))
    for m in spec["models"]:
        ref = torch.load(workdir / f"ref_{m['key']}.pt", weights_only=True)
        if m["config"]:
            open_clip.add_model_config(m["config"])
        model = open_clip.create_model(m["name"], pretrained=None)
        missing, unexpected = model.load_state_dict(ref["state_dict"], strict=False)
        if missing or unexpected:
            print(f"[{m['key']}] state_dict keys: missing {missing}, unexpected {unexpected}")
            ok = False
        model.eval()
        text = ref["text"]
        for setting in m["settings"]:
            depth, iters, temp = setting = tuple(setting)
            g = gem.GEM(
                model,
                depth=depth - 1,
                iterations=iters,
                temperature="adaptive" if temp is None else temp,
            ).eval()
            for in_key, x in ref["inputs"].items():
                r = ref["results"][f"{in_key}|{setting_key(setting)}"]
                size = tuple(x.shape[-2:])
                feats = g.encode_image(x)
                logits = g(x, text)
                maps = gem.heatmaps(logits, size)
                raw = gem.heatmaps(logits, size, normalize=False)
                single = torch.cat([g(xi[None], text) for xi in x])
                d = {
                    "maps": max_diff(maps, r["maps"]),
                    "maps/1img": max_diff(maps, r["maps_single"]),
                    "raw": max_diff(raw, r["raw"]),
                    "logits": max_diff(logits, r["patch_logits"]),
                    "feats": max_diff(feats.patch_embeds.flatten(1, 2), r["patch_feats"]),
                    "cls": max_diff(feats.image_embeds, r["clip_cls"]),
                    "batch-inv": max_diff(single, logits),
                }
                span = (logits.amax(dim=(-2, -1)) - logits.amin(dim=(-2, -1))).min().item()
                bad = max(d["maps"], d["maps/1img"]) > tol
                ok &= not bad
                print(
                    f"{m['key']:16} {in_key:8} {setting_key(setting):34} "
                    + " ".join(f"{v:9.2e}" for v in d.values())
                    + f" {span:11.3e}"
                    + ("  FAIL" if bad else ""),
                    flush=True,
                )
                if "text_tower" in r:
                    ours_text = g.encode_text(spec["classes"])
                    dt = max_diff(ours_text, r["text_tower"])
                    dm = max_diff(gem.heatmaps(g(x, ours_text), size), r["maps_text_tower"])
                    bad = dm > tol
                    ok &= not bad
                    print(
                        f"{'':16} {'':8} {'+ text tower, prompts':34} {dm:9.2e}"
                        f"   (text embeds {dt:.2e})" + ("  FAIL" if bad else ""),
                        flush=True,
                    )
                    # Negative controls: the comparison must see a one-off change.
                    for label, kwargs in [
                        ("control: depth off by one", {"depth": depth}),
                        ("control: iterations+1", {"depth": depth - 1, "iterations": iters + 1}),
                    ]:
                        wrong = gem.heatmaps(gem.GEM(model, **kwargs)(x, text), size)
                        print(
                            f"{'':16} {'':8} {label:34} {max_diff(wrong, r['maps']):9.2e}"
                            "   (should be >> tol)",
                            flush=True,
                        )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--ref-python",
        default="/tmp/refvenv/bin/python",
        help="python of the venv with open_clip 2.24 and gem_torch 1.0.1",
    )
    parser.add_argument("--no-b16", action="store_true", help="skip ViT-B-16 at 448 px")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per side")
    parser.add_argument("--workdir", help="keep the intermediate tensors here")
    parser.add_argument("--stage", choices=["all", "ref"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.stage == "ref":
        run_reference(Path(args.workdir))
        return 0

    with tempfile.TemporaryDirectory(prefix="gem-parity-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        spec = build_spec(workdir, with_b16=not args.no_b16, threads=args.threads)
        (workdir / "spec.json").write_text(json.dumps(spec))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
        cmd = [
            args.ref_python,
            "-W",
            "ignore",
            str(Path(__file__).resolve()),
            "--stage",
            "ref",
            "--workdir",
            str(workdir),
        ]
        subprocess.run(cmd, check=True, cwd=workdir, env=env)
        import open_clip
        import torch

        ref_versions = json.loads((workdir / "ref_versions.json").read_text())
        print(
            f"reference: torch {ref_versions['torch']}, open_clip {ref_versions['open_clip']}, "
            f"gem_torch at {ref_versions['gem']}"
        )
        print(f"gemlabel:  torch {torch.__version__}, open_clip {open_clip.__version__}")
        print(
            "max abs diffs (gemlabel vs release); maps = min-max normalized heatmaps at input "
            "size, maps/1img = vs release fed one image at a time, raw = unnormalized "
            "upsampled,\nlogits = patch cosine logits, feats = GEM patch embeddings, cls = "
            "CLIP image embedding, batch-inv = ours batched vs one at a time\n"
        )
        ok = run_ours(workdir, args.tol)
    print(f"\n{'PASS' if ok else 'FAIL'}: normalized heatmaps within {args.tol:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
