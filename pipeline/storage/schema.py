"""Fixed pyarrow schemas: the rows the reader yields and the two output tables
(docs/architecture.md)."""

import pyarrow as pa

READ_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("key", pa.string()),
        ("image", pa.binary()),
        ("image_ext", pa.string()),
        ("error", pa.string()),
    ]
)
"""Rows of `pipeline.stages.read.read_shard`: one per sample (error rows carry no image)."""

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("scores", pa.list_(pa.float32()), nullable=False),
    ]
)
"""`images/*.parquet`: exactly one row per input sample, identity (shard, key).

`status` is "ok" or "error"; `error` is "<stage>: <message>" for error rows and null
otherwise; `labels`/`scores` are the top-k class ids (into the vocabulary) and their
image-level scores, best first (empty for error rows). `width`/`height` are the original
image size after EXIF orientation (null when unknown)."""

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

MASKS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("label_id", pa.int32(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("mask", RLE_TYPE, nullable=False),
        pa.field("bbox", pa.list_(pa.float32()), nullable=False),
        pa.field("area", pa.int64(), nullable=False),
    ]
)
"""`masks/*.parquet`: one row per (image, kept class).

`mask` is COCO RLE at the original resolution (`size` [h, w], compressed `counts`, decode
with `pycocotools.mask.decode`), `bbox` is [x, y, w, h] in pixels, `area` the mask's pixel
count, `score` the class's image-level score."""
