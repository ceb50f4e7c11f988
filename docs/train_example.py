"""Train a tiny segmentation head for a few steps on gemlabel's labeled shards.

    gemlabel run 'data/sample/shard-{000000..000001}.tar' --vocab data/sample/vocab.txt \
        --out out/demo --image-size 224
    gemlabel shards out/demo --out out/demo-shards
    python docs/train_example.py out/demo-shards --steps 20

Reads `out/demo-shards/manifest.json` for the id map (0 background, label_id + 1), streams
`(image, semantic map)` batches with `pipeline.tools.loader.labeled_loader` and trains a small
conv net with per-pixel cross-entropy. See docs/training.md.
"""

import argparse
import os

import torch
from torch import nn

from pipeline.storage.output import read_manifest
from pipeline.storage.store import Store
from pipeline.tools.loader import labeled_loader


def tiny_head(classes: int) -> nn.Module:
    """A few convolutions to per-pixel logits over `classes` ids (background included)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv2d(32, classes, 1),
    )


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shards", help="directory written by `gemlabel shards` (path or URL)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)

    shards = Store(args.shards)
    id_map = read_manifest(shards)["id_map"]
    classes = id_map["classes"] + 1  # + background (id 0)
    urls = [shards.display(os.path.basename(p)) for p in shards.ls("", ".tar")]
    torch.manual_seed(0)
    model = tiny_head(classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses: list[float] = []
    while len(losses) < args.steps:
        loader = labeled_loader(urls, batch_size=args.batch_size, image_size=args.image_size)
        for images, targets in loader:  # [B, 3, H, W] float, [B, H, W] int64
            loss = nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            print(f"step {len(losses):3d}  loss {loss.item():.4f}")
            if len(losses) == args.steps:
                break
    return losses


if __name__ == "__main__":
    main()
