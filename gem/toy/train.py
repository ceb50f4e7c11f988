"""Train the toy `gemlabel-toy` CLIP on synthetic scenes (CPU, minutes, reproducible).

Losses, summed:
- contrastive: CLIP's symmetric InfoNCE between image embeddings and scene captions;
- image classes: image embeddings vs the class prompts, soft targets spread over the
  classes present (the pipeline ranks classes this way);
- dense alignment: patch embeddings of the GEM pathway (on the first `--gem-batch` images
  of a batch: the pathway's attention is most of a step's cost) and of the plain CLIP
  path, classified against the class prompts plus a background prompt, supervised by the
  scenes' label maps area-averaged to the patch grid. Contrastive training alone does not
  make patch tokens localize at this scale; this loss does.

The result is a toy for demos and tests: it says nothing about how GEM compares with CLIP.

    python -m gem.toy.train --out gem/weights/gemlabel-toy.pt
"""

import argparse
import io
import json
import math
import time
import zipfile

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

import gem
from gem.toy.scenes import BACKGROUND, CLASSES, render_scene

MODEL = "gemlabel-toy"
TEMPLATE = gem.SINGLE_TEMPLATE[0]


def make_data(seed: int, count: int, image_size: int, grid: int, min_size: int, max_size: int):
    """Scenes `0..count-1` of `seed`, drawn at random sizes and resized to the model input:
    uint8 images [N, S, S, 3], soft patch targets [N, C+1, g, g] (background last) and
    captions."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(min_size, max_size + 1, size=(count, 2))
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    targets = torch.empty(count, len(CLASSES) + 1, grid, grid)
    captions = []
    for i, (w, h) in enumerate(sizes):
        image, label_map, caption = render_scene(seed, i, int(w), int(h))
        images[i] = np.asarray(gem.resize_rgb(image, image_size))
        targets[i] = patch_targets(label_map, grid)
        captions.append(caption)
    return torch.from_numpy(images), targets, captions


def patch_targets(label_map: np.ndarray, grid: int) -> torch.Tensor:
    """Class fractions per patch-grid cell [C+1, g, g] (background last) of a label map."""
    height, width = label_map.shape
    cell = (np.arange(height)[:, None] * grid // height) * grid + np.arange(width) * grid // width
    classes = np.where(label_map < 0, len(CLASSES), label_map).astype(np.int64)
    counts = np.bincount(
        (classes * grid * grid + cell).ravel(), minlength=(len(CLASSES) + 1) * grid**2
    )
    counts = counts.reshape(len(CLASSES) + 1, grid, grid).astype(np.float32)
    return torch.from_numpy(counts / counts.sum(0, keepdims=True))


def encode_both(model: gem.GEM, images: torch.Tensor):
    """One image-tower pass: image embeddings [B, E], GEM-pathway and CLIP-path patch
    embeddings [B, h*w, E] (the CLIP path is the `clip` method's patch tokens)."""
    visual = model.visual
    x, z = model.encode_tokens(images)
    pooled, _ = visual._pool(x)
    proj = visual.proj
    return pooled @ proj, visual.ln_post(z[:, 1:]) @ proj, visual.ln_post(x[:, 1:]) @ proj


def dense_loss(
    patches: torch.Tensor, text: torch.Tensor, scale, targets: torch.Tensor, object_weight: float
):
    """Soft cross-entropy of each patch's class distribution (cosine x scale) vs targets,
    patches weighted by 1 + object_weight x their object fraction."""
    logits = scale * F.normalize(patches, dim=-1) @ text.T  # [B, n, C+1]
    targets = targets.flatten(2).transpose(1, 2)
    ce = -(targets * logits.log_softmax(-1)).sum(-1)
    weight = 1 + object_weight * (1 - targets[..., -1])
    return (weight * ce).sum() / weight.sum()


def train(args) -> dict:
    torch.manual_seed(args.seed)
    with torch.random.fork_rng(devices=[]):  # random init from the seed, as gem.create_clip
        torch.manual_seed(args.seed)
        model = open_clip.create_model(MODEL)
    tokenizer = open_clip.get_tokenizer(MODEL)
    wrapped = gem.GEM(model, method="gem", tokenizer=tokenizer)
    plain = gem.GEM(model, method="clip", tokenizer=tokenizer)
    model.train()
    size = model.visual.image_size[0]
    grid = wrapped.grid_size((size, size))[0]
    t0 = time.time()
    images, targets, captions = make_data(
        args.seed, args.scenes, size, grid, args.min_size, args.max_size
    )
    caption_tokens = tokenizer(captions)
    prompts = tokenizer([TEMPLATE.format(n) for n in [*CLASSES, BACKGROUND]])
    used_tokens = torch.cat([caption_tokens.flatten(), prompts.flatten()]).unique()
    full_embedding, (caption_tokens, prompts) = compact_token_embedding(
        model, used_tokens, caption_tokens, prompts
    )
    print(f"data: {args.scenes} scenes in {time.time() - t0:.0f}s", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / args.steps, 1)))
        ),
    )
    gen = torch.Generator().manual_seed(args.seed)
    n_cls = len(CLASSES)
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(len(images), (args.batch,), generator=gen)
        flip = torch.rand(args.batch, generator=gen) < 0.5
        x = gem.normalize_uint8(images[idx])
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        tgt = targets[idx]
        tgt = torch.where(flip[:, None, None, None], tgt.flip(-1), tgt)
        image_embeds, gem_patches, clip_patches = encode_both(wrapped, x[: args.gem_batch])
        if args.gem_batch < args.batch:
            rest = encode_both(plain, x[args.gem_batch :])
            image_embeds = torch.cat([image_embeds, rest[0]])
            clip_patches = torch.cat([clip_patches, rest[2]])
        text = F.normalize(model.encode_text(prompts), dim=-1)
        caps = F.normalize(model.encode_text(caption_tokens[idx]), dim=-1)
        img = F.normalize(image_embeds, dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * img @ caps.T
        labels = torch.arange(args.batch)
        contrastive = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        present = (tgt[:, :n_cls].flatten(2).sum(-1) > 0).float()
        cls_logits = (scale * img @ text[:n_cls].T).log_softmax(-1)
        classes = -(present / present.sum(-1, keepdim=True) * cls_logits).sum(-1).mean()
        dense = dense_loss(
            gem_patches, text, scale, tgt[: args.gem_batch], args.object_weight
        ) + dense_loss(clip_patches, text, scale, tgt, args.object_weight)
        loss = contrastive + classes + args.dense_weight * dense
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(
                f"step {step} loss {loss.item():.3f} contrastive {contrastive.item():.3f} "
                f"classes {classes.item():.3f} dense {dense.item():.3f} scale {scale.item():.1f} "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )
    with torch.no_grad():
        full_embedding.weight[used_tokens] = model.token_embedding.weight
    model.token_embedding = full_embedding
    model.eval()
    return {
        "train_seconds": round(time.time() - t0),
        "model": model,
        "tokenizer": tokenizer,
        "used_tokens": used_tokens,
    }


def compact_token_embedding(model, used_tokens: torch.Tensor, *tokens: torch.Tensor):
    """Swap the model's token embedding for one holding only `used_tokens`' rows (sorted, so
    the end token stays the largest id and open_clip's argmax pooling still finds it) and
    renumber `tokens` to it: the optimizer then touches a few hundred rows, not 49,408.
    Returns the full embedding (to write the trained rows back into) and the new tokens."""
    full = model.token_embedding
    index = torch.zeros(full.num_embeddings, dtype=torch.long)
    index[used_tokens] = torch.arange(len(used_tokens))
    model.token_embedding = torch.nn.Embedding.from_pretrained(
        full.weight[used_tokens].detach().clone(), freeze=False
    )
    return full, [index[t] for t in tokens]


@torch.no_grad()
def evaluate(model, tokenizer, seed: int, count: int, min_size: int, max_size: int) -> dict:
    """Zero-shot accuracy (the top class of the image embedding is in the scene) and
    per-method mIoU over classes + background (patch argmax against the class and
    background prompts, upsampled to the scene size) on held-out scenes."""
    rng = np.random.default_rng(seed)
    results = {}
    for method in ("gem", "clip", "maskclip", "clip_surgery"):
        wrapped = gem.GEM(model, method=method, tokenizer=tokenizer).eval()
        text = wrapped.encode_text([*CLASSES, BACKGROUND])
        size = model.visual.image_size[0]
        inter = np.zeros(len(CLASSES) + 1)
        union = np.zeros(len(CLASSES) + 1)
        correct = 0
        for i, (w, h) in enumerate(rng.integers(min_size, max_size + 1, size=(count, 2))):
            image, label_map, _ = render_scene(seed, i, int(w), int(h))
            x = gem.normalize_uint8(torch.tensor(np.asarray(gem.resize_rgb(image, size)))[None])
            feats = wrapped.encode_image(x)
            top = (F.normalize(feats.image_embeds, dim=-1) @ text[: len(CLASSES)].T).argmax()
            correct += int((label_map == int(top)).any())
            logits = gem.patch_logits(feats.patch_embeds, text)
            pred = gem.upsample(logits, (int(h), int(w)))[0].argmax(0).numpy()
            pred[pred == len(CLASSES)] = -1
            for c in range(-1, len(CLASSES)):
                p, g = pred == c, label_map == c
                inter[c] += (p & g).sum()
                union[c] += (p | g).sum()
        valid = union > 0
        results[method] = round(float((inter[valid] / union[valid]).mean()), 4)
        results.setdefault("zero_shot_accuracy", round(correct / count, 4))
    return results


def save_fp16(model, used_tokens: torch.Tensor, path: str) -> None:
    """fp16 state_dict; token-embedding rows of tokens never seen in training are zeroed
    (the shape stays, so open_clip's tokenizer works unchanged). Written as torch.save's
    zip archive with its records deflated, which torch.load reads as it is: 3 MB instead
    of 16 (mostly those zeros), the same bytes for the same weights."""
    state = {k: v.detach().half().clone() for k, v in model.state_dict().items()}
    keep = torch.zeros(state["token_embedding.weight"].shape[0], dtype=torch.bool)
    keep[used_tokens] = True
    state["token_embedding.weight"][~keep] = 0
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with zipfile.ZipFile(buffer) as stored, zipfile.ZipFile(path, "w") as out:
        for name in stored.namelist():
            out.writestr(
                zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)),
                stored.read(name),
                compress_type=zipfile.ZIP_DEFLATED,
                compresslevel=9,
            )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the toy gemlabel-toy CLIP on synthetic scenes.")
    p.add_argument("--out", default="gem/weights/gemlabel-toy.pt")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--gem-batch",
        type=int,
        default=16,
        help="images per batch whose GEM pathway gets the dense loss (the rest: CLIP path only)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dense-weight", type=float, default=1.0)
    p.add_argument("--object-weight", type=float, default=2.0)
    p.add_argument("--scenes", type=int, default=10000)
    p.add_argument("--min-size", type=int, default=64)
    p.add_argument("--max-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-scenes", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    if not 1 <= args.gem_batch <= args.batch:
        p.error(f"--gem-batch must be in [1, --batch={args.batch}], got {args.gem_batch}")
    torch.set_num_threads(args.threads)
    result = train(args)
    save_fp16(result["model"], result["used_tokens"], args.out)
    model, tokenizer = gem.create_clip(MODEL, pretrained=args.out)
    metrics = evaluate(
        model, tokenizer, 10_000 + args.seed, args.eval_scenes, args.min_size, args.max_size
    )
    metrics["train_seconds"] = result["train_seconds"]
    print(json.dumps({"args": vars(args), "held_out": metrics}, indent=1))


if __name__ == "__main__":
    main()
