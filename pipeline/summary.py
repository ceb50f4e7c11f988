"""What a run did, counted as the write stage's summary rows come back: `RunSummary` (and
its end-of-run text), `Tally` (the counters), `ErrorBudget`, and the final status rules.
Plain Python: no Ray."""

import posixpath
from collections import Counter
from dataclasses import dataclass, field

from pipeline.errors import error_kind
from pipeline.exit_codes import EXIT_ERROR_BUDGET, EXIT_FAILED, EXIT_OK
from pipeline.storage import output

TOP_ERRORS = 5  # error kinds listed in the summary and the failure message


@dataclass
class RunSummary:
    """What a run did. Counts are of the rows written by this run (`skipped`: rows that
    were already in the output and not redone)."""

    out: str
    # "complete", "incomplete", "failed" (nothing could be labeled), "aborted" (error
    # budget), "stalled" or "lock lost"
    status: str
    ok: int = 0
    errors: int = 0
    masks: int = 0
    dropped_empty: int = 0  # kept classes whose mask covered no pixel: not written
    skipped: int = 0
    seconds: float = 0.0
    message: str = ""
    random_weights: bool = False  # labeled with seeded random weights (a test or a demo)
    damaged_shards: list[str] = field(default_factory=list)
    top_errors: list[tuple[str, int]] = field(default_factory=list)

    @property
    def images(self) -> int:
        return self.ok + self.errors

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 complete (bad samples within the budget included), 3 aborted by the error
        budget, 1 anything else: failed or left unfinished."""
        return {"complete": EXIT_OK, "aborted": EXIT_ERROR_BUDGET}.get(self.status, EXIT_FAILED)

    def format(self) -> str:
        """The end-of-run summary block."""
        lines = [
            f"gemlabel run {self.status}: {self.images} images ({self.ok} ok, {self.errors} "
            f"error), {self.masks} masks"
            + (f" ({self.dropped_empty} empty, not written)" if self.dropped_empty else "")
            + f" in {self.seconds:.1f} s "
            f"({self.images_per_second:.1f} images/s)"
            + (f"; {self.skipped} already done" if self.skipped else ""),
            f"output: {self.out}",
        ]
        if self.random_weights:
            lines.append("weights: seeded random (--pretrained random): the masks mean nothing")
        if self.top_errors:
            lines.append("most common errors:")
            lines += [f"  {n:6d} x {message}" for message, n in self.top_errors]
        if self.damaged_shards:
            lines.append(f"unreadable or damaged shards ({len(self.damaged_shards)}):")
            lines += [f"  {shard}" for shard in self.damaged_shards[:10]]
        if self.message:
            lines.append(self.message)
        return "\n".join(lines)


class Tally:
    """The counters of a stream: `add` each write-stage summary batch (shard, status,
    error, masks, dropped_empty, file, node columns). Each batch comes back once, even
    when its write task ran again (a re-run rewrites the same file); what lost nodes cost
    is noted for the summary (`redone`)."""

    def __init__(self, summary: RunSummary):
        self.summary = summary
        self.errors: Counter = Counter()  # error kind -> rows
        self.nodes: Counter = Counter()  # Ray node id of the labeling actor -> images
        self.written: dict[str, Counter] = {}  # files this run wrote -> counts (output.scan)
        self.lost_nodes: list[str] = []  # nodes that died during the stream
        self.reread_shards = 0  # shards whose read ran to its end more than once
        self.discarded: list[str] = []  # files of lost tasks, never reported: deleted

    def add(self, batch: dict) -> None:
        count_written(batch, self.written)
        status, s = batch["status"], self.summary
        s.ok += int((status == "ok").sum())
        s.errors += int((status != "ok").sum())
        s.masks += int(batch["masks"].sum())
        s.dropped_empty += int(batch["dropped_empty"].sum())
        self.errors.update(error_kind(e) for e in batch["error"] if isinstance(e, str))
        self.nodes.update(batch["node"].tolist())

    def top_errors(self) -> list[tuple[str, int]]:
        return self.errors.most_common(TOP_ERRORS)


def count_written(batch: dict, written: dict[str, Counter]) -> None:
    """Add a write-stage summary batch's files to `written`: per images file its rows per
    (shard, status), per masks file its rows per shard (what output.scan would count)."""
    for name, shard, status, masks in zip(
        batch["file"], batch["shard"], batch["status"], batch["masks"], strict=True
    ):
        images = written.setdefault(posixpath.join(output.IMAGES_DIR, name), Counter())
        images[(shard, status)] += 1
        if masks:
            masks_file = written.setdefault(posixpath.join(output.MASKS_DIR, name), Counter())
            masks_file[(shard,)] += int(masks)


@dataclass(frozen=True)
class ErrorBudget:
    """At most `max_rate` of the samples may be error rows, once `min_samples` were seen."""

    max_rate: float
    min_samples: int

    def exceeded(self, summary: RunSummary) -> bool:
        return (
            summary.images >= self.min_samples and summary.errors > self.max_rate * summary.images
        )

    def abort(self, summary: RunSummary) -> None:
        """Mark `summary` aborted, with the numbers and the flag."""
        summary.status = "aborted"
        summary.message = (
            f"error budget exceeded: {summary.errors} of {summary.images} samples "
            f"failed ({summary.errors / summary.images:.1%}), more than "
            f"--max-error-rate {self.max_rate:g}. Stopped; the rows "
            "written so far are valid and a rerun resumes. Check the inputs and "
            "settings (most common errors above)."
        )


def redone(tally: Tally) -> str:
    """What nodes lost during the run cost, for the summary ("" when nothing was redone)."""
    if not (tally.lost_nodes or tally.reread_shards or tally.discarded):
        return ""
    return (
        f"{len(tally.lost_nodes)} node(s) lost during the run"
        + (f": {', '.join(tally.lost_nodes)}" if tally.lost_nodes else "")
        + "; Ray re-ran their tasks and restarted their labeling actors; redone here: "
        f"{tally.reread_shards} shard(s) read again (journaled once), "
        f"{len(tally.discarded)} output file(s) of lost tasks discarded (their rows were "
        "written again)"
    )


def settle(summary: RunSummary, report: dict[str, dict]) -> None:
    """The final status of a run that went to its end, from the final scan's `report` of
    its shards (output.shard_report): "failed" when they hold no labeled image (every input
    missing, broken or empty), "incomplete" when some shard is not done, else as it is."""
    if summary.status != "complete":
        return
    labeled = sum(r["images"] - r["errors"] for r in report.values())
    if labeled == 0:
        summary.status = "failed"
        found = sum(r["images"] for r in report.values())
        why = (
            f"all {found} images of the inputs are error rows (most common errors above)"
            if found
            else "the inputs hold no image"
        )
        summary.message = f"nothing could be labeled: {why}; check the inputs and their paths"
    elif not all(r["complete"] for r in report.values()):
        summary.status = "incomplete"
        summary.message = "some shards are incomplete (see manifest.json); rerun to resume"
