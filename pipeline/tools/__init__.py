"""Tools that work on finished outputs: filter, labeled shards and their training loader,
report, gallery, COCO export."""
