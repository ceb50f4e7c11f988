"""A PyTorch data loader for labeled shards (pipeline.tools.labeled_shards), on webdataset.

Each sample becomes `(image, target)`:

- `image`: float32 `[3, H, W]` in [0, 1], the source image decoded as the labeling job
  did (EXIF orientation applied, converted to RGB), resized bilinearly to `image_size`
  (labeled shards store images upright already; shards written before that rule keep
  the source's EXIF orientation, which is applied here);
- `target="semantic"`: int64 `[H, W]`, the `seg.png` id map at its stored bit depth (8-
  or 16-bit: never through a PIL mode conversion, which would clip ids above 255),
  resized by nearest neighbour (0 background, `label_id + 1` a class, as in the shards'
  manifest `id_map`);
- `target="masks"`: float32 `[C, H, W]`, one binary mask per id of `class_ids` (in that
  order), decoded from the RLE in `labels.json` (masks may overlap) and resized by nearest
  neighbour.

Error samples (written with `--include-errors`) are skipped; unlabeled ones (with
`--include-unlabeled`) have an all-background target. No member is unpickled.
"""

import json

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline.stages.decode import decode_image, pick_image_member
from pipeline.storage.store import Store
from pipeline.storage.tables import decode_mask
from pipeline.tools.labeled_shards import LABELS_MEMBER, SEG_MEMBER, decode_png, iter_samples

TARGETS = ("semantic", "masks")


def _size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def _nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a 2-D integer map by nearest neighbour (pixel centres, like PIL NEAREST)."""
    rows = ((np.arange(height) + 0.5) * array.shape[0] / height).astype(np.int64)
    cols = ((np.arange(width) + 0.5) * array.shape[1] / width).astype(np.int64)
    return array[rows[:, None], cols[None, :]]


def is_labeled_ok(sample: dict) -> bool:
    """Whether a raw webdataset sample is an ok sample (not an error marker)."""
    return json.loads(sample[LABELS_MEMBER])["status"] == "ok"


def decode_sample(
    sample: dict,
    image_size: int | tuple[int, int] = 224,
    target: str = "semantic",
    class_ids: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A raw webdataset sample (member name -> bytes) -> `(image, target)` (module doc)."""
    height, width = _size(image_size)
    members = {k: v for k, v in sample.items() if not k.startswith("__")}
    _, data = pick_image_member(members)
    image = decode_image(data).resize((width, height), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    if target == "semantic":
        seg = _nearest(decode_png(sample[SEG_MEMBER]).astype(np.int64), height, width)
        return pixels, torch.from_numpy(seg)
    if target != "masks" or class_ids is None:
        raise ValueError(f"target must be one of {TARGETS}; 'masks' needs class_ids")
    info = json.loads(sample[LABELS_MEMBER])
    masks = np.zeros((len(class_ids), height, width), dtype=np.float32)
    index = {c: i for i, c in enumerate(class_ids)}
    for ann in info["annotations"]:
        if ann["label_id"] in index:
            mask = decode_mask(ann["segmentation"])
            masks[index[ann["label_id"]]] = _nearest(mask, height, width)
    return pixels, torch.from_numpy(masks)


def shard_samples(shards):
    """A webdataset stage: shard entries (`{"url": ...}`) -> raw samples (member name ->
    bytes, `__key__`, `__url__`), each shard read through its Store (any fsspec URL)."""
    for shard in shards:
        url = shard["url"]
        for key, members in iter_samples(Store(url)):
            yield {"__key__": key, "__url__": url, **dict(members)}


def labeled_dataset(
    urls: str | list[str],
    image_size: int | tuple[int, int] = 224,
    target: str = "semantic",
    class_ids: list[int] | None = None,
    shuffle: int = 0,
) -> wds.DataPipeline:
    """An IterableDataset of `(image, target)` over labeled shards (local paths or URLs:
    s3://, gs://, ...; brace ranges allowed); `shuffle` > 0 shuffles shards and samples
    within a buffer of that size. With DataLoader workers, shards are split between them."""
    if target not in TARGETS or (target == "masks" and not class_ids):
        raise ValueError(f"target must be one of {TARGETS}; 'masks' needs class_ids")
    stages = [wds.SimpleShardList(urls)]
    if shuffle > 0:
        stages.append(wds.shuffle(shuffle))
    stages += [wds.split_by_worker, shard_samples]
    if shuffle > 0:
        stages.append(wds.shuffle(shuffle))
    stages += [
        wds.select(is_labeled_ok),
        wds.map(lambda s: decode_sample(s, image_size, target, class_ids)),
    ]
    return wds.DataPipeline(*stages)


def labeled_loader(
    urls: str | list[str], batch_size: int = 8, num_workers: int = 0, **options
) -> torch.utils.data.DataLoader:
    """A DataLoader of batches `(images [B, 3, H, W], targets)` (`options`: see
    `labeled_dataset`). With workers, shards are split between them."""
    dataset = labeled_dataset(urls, **options)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
