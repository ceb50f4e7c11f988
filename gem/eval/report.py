"""Evaluation results as a printed table and as JSON."""

import json
from pathlib import Path


def format_results(result: dict) -> str:
    """Per-class IoU (percent), mIoU, counts and analysis metrics as a plain-text table."""
    protocol = result["protocol"]
    lines = [
        f"dataset {result['dataset']}  method {result['method']['method']}  "
        f"protocol {protocol['name']} (short side {protocol['short_side']}"
        + (
            f", window {protocol['window']}, stride {protocol['stride']})"
            if protocol["window"]
            else ")"
        )
        + (f"  refine {result['refine']}" if result.get("refine") else ""),
        f"{'class':<28}{'IoU':>8}",
    ]
    for name, iou in result["per_class_iou"].items():
        lines.append(f"{name:<28}{'-' if iou is None else f'{100 * iou:.2f}':>8}")
    miou = result["miou"]
    lines.append(f"{'mIoU':<28}{'-' if miou is None else f'{100 * miou:.2f}':>8}")
    lines.append(
        "counts: "
        + ", ".join(f"{k} {v}" for k, v in result["counts"].items() if not isinstance(v, dict))
    )
    for name, value in result.get("analysis", {}).items():
        lines.append(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    return "\n".join(lines)


def write_results(result: dict, path: str | Path) -> None:
    """`result` as indented JSON at `path` (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
