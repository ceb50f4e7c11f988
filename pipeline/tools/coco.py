"""`export_coco(out, path)`: an output's masks as a COCO-format JSON file.

`images` (one per ok image: `id`, `file_name` = key, `width`, `height`, `shard`),
`categories` (the run's vocabulary: `id` = label_id + 1, as COCO ids start at 1) and
`annotations` (one per non-empty mask: `segmentation` as compressed COCO RLE, `area`,
`bbox`, `iscrowd` 0, and the label's `score`). Loads with `pycocotools.coco.COCO`.
"""

import json

import pyarrow.compute as pc

from pipeline.storage.output import IMAGES_DIR, MASKS_DIR
from pipeline.storage.store import Store, as_store, split_file
from pipeline.storage.tables import class_names, read_table


def coco_dict(out: Store | str) -> dict:
    """The COCO dataset dict of the output `out`."""
    out = as_store(out)
    images = read_table(out, IMAGES_DIR, ["shard", "key", "width", "height", "status"])
    images = images.filter(pc.equal(images["status"], "ok")).sort_by(
        [("shard", "ascending"), ("key", "ascending")]
    )
    ids = {}
    coco_images = []
    for row in images.to_pylist():
        ids[(row["shard"], row["key"])] = len(ids) + 1
        coco_images.append(
            {
                "id": len(ids),
                "file_name": row["key"],
                "width": row["width"],
                "height": row["height"],
                "shard": row["shard"],
            }
        )
    masks = read_table(
        out, MASKS_DIR, ["shard", "key", "label_id", "score", "mask", "bbox", "area"]
    )
    annotations = []
    for row in masks.to_pylist():
        image_id = ids.get((row["shard"], row["key"]))
        if image_id is None or row["area"] == 0:
            continue
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": row["label_id"] + 1,
                "segmentation": {
                    "size": list(row["mask"]["size"]),
                    "counts": row["mask"]["counts"],
                },
                "area": int(row["area"]),
                "bbox": [float(v) for v in row["bbox"]],
                "iscrowd": 0,
                "score": float(row["score"]),
            }
        )
    categories = [
        {"id": i + 1, "name": name, "supercategory": "gemlabel"}
        for i, name in sorted(class_names(out).items())
    ]
    return {
        "info": {"description": f"gemlabel masks of {out.display()}"},
        "images": coco_images,
        "categories": categories,
        "annotations": annotations,
    }


def export_coco(out: Store | str, path: str) -> dict:
    """Write the COCO JSON of `out` to `path` (a local path or URL); return counts."""
    out = as_store(out)
    data = coco_dict(out)
    store, name = split_file(path)
    store.write_text(name, json.dumps(data))
    return {k: len(data[k]) for k in ("images", "categories", "annotations")}
