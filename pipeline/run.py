"""`run(config)`: the Ray Data job from shards to tables, with resume and an error budget.

The chain (see docs/architecture.md):
read_datasource(ShardDatasource) -> map_batches(decode_batch) -> map_batches(Labeler, actor
pool) -> map_batches(write_batch) -> the driver iterates the write stage's summary rows,
counting them against the error budget, and writes the manifest.

Resume: the output directory is scanned first; complete shards are not read at all, and
keys already in images/ are skipped inside the other shards (see pipeline.storage.output).

Before the stream starts the run is fitted to the cluster (pipeline.cluster.fit); while it
runs, the driver watches the output lock and the stages' progress: a lost lock or a stream
that made no progress for `stall_timeout` seconds ends the run (exit 1) instead of writing
on or waiting forever.
"""

import logging
import os
import posixpath
import queue
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import ray

import gem
from pipeline.cluster import Progress, cluster_nodes, fit, resource_summary
from pipeline.config import RunConfig
from pipeline.prompts.bank import PromptBank, cached, check_model, load
from pipeline.prompts.vocab import class_names, load_vocabulary, vocabulary_hash
from pipeline.stages.decode import decode_batch
from pipeline.stages.label import Labeler
from pipeline.stages.read import ShardDatasource, expand_inputs
from pipeline.stages.write import write_batch
from pipeline.storage import output
from pipeline.storage.credentials import refuse_credentials
from pipeline.storage.lock import LockLostError, OutputLock
from pipeline.storage.store import Store

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR_BUDGET = 0, 1, 2, 3
POLL_S = 1.0  # how often the driver looks at the lock and the progress while it waits
JOURNAL_S = 60.0  # how often the driver journals the shard stats the readers reported
logger = logging.getLogger(__name__)


class StalledError(RuntimeError):
    """The stream made no progress for the stall timeout."""


@dataclass
class RunSummary:
    """What a run did. Counts are of the rows written by this run (`skipped`: rows that
    were already in the output and not redone)."""

    out: str
    status: str  # "complete", "incomplete", "aborted" (error budget), "stalled" or "lock lost"
    ok: int = 0
    errors: int = 0
    masks: int = 0
    dropped_empty: int = 0  # kept classes whose mask covered no pixel: not written
    skipped: int = 0
    seconds: float = 0.0
    message: str = ""
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
        budget, 1 anything else left unfinished."""
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
        if self.top_errors:
            lines.append("most common errors:")
            lines += [f"  {n:6d} x {message}" for message, n in self.top_errors]
        if self.damaged_shards:
            lines.append(f"unreadable or damaged shards ({len(self.damaged_shards)}):")
            lines += [f"  {shard}" for shard in self.damaged_shards[:10]]
        if self.message:
            lines.append(self.message)
        return "\n".join(lines)


def _versions() -> dict[str, str]:
    found = {}
    for package in ("gemlabel", "torch", "open_clip_torch", "ray", "pyarrow"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


def _init_ray(config: RunConfig) -> bool:
    """Connect to `config.address` or start a quiet local Ray; True if this call started it."""
    if ray.is_initialized():
        return False
    if config.address:
        ray.init(address=config.address, logging_level=logging.WARNING)
    else:
        # keep Ray's token authentication default, without the warning that announces it
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
        ray.init(num_cpus=config.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return True


def _error_kind(error: str) -> str:
    """An error message without its parenthesized, sample-specific details, for grouping."""
    return re.sub(r"\s*\(.*", "", error)[:100]


def run(config: RunConfig) -> RunSummary:
    """Label `config.inputs` into `config.out` and return the summary (see RunConfig).

    Raises ValueError (or OSError, gem.WeightsUnavailableError) for unusable
    configurations (no shards, missing vocabulary, unknown model or weights, an output made
    with other settings or being written by another run) before anything is written."""
    started = time.time()
    refuse_credentials(
        [
            *config.inputs,
            config.vocab,
            config.out,
            config.pretrained,
            config.bank,
            config.bank_cache,
        ]
    )
    store = Store(config.out)
    shards = expand_inputs(config.inputs)
    # the driver builds or loads the bank first: a bad model, weights or template fail here
    bank, bank_path = _prompt_bank(config)
    settings = config.output_settings()
    settings["vocabulary"] = {"hash": bank.vocabulary_hash, "classes": len(bank.names)}
    settings["prompt_bank"] = bank.key
    with store.lock() as lock:  # one run at a time: a second would relabel the same keys
        return _label(config, store, lock, shards, bank, bank_path, settings, started)


class ShardStats:
    """The stats of the shards read to their end, as the readers report them to the
    Progress actor, journaled into the output every JOURNAL_S (one file each time, however
    many shards: a crash loses at most that much, and those shards are read again on
    resume, their done keys skipped)."""

    def __init__(self, store: Store, progress):
        self.store, self.progress = store, progress
        self.pending: list[dict] = []
        self.files: dict[str, str] = {}  # journal files written: name -> text
        self.written = time.time()

    def poll(self) -> float:
        """Collect what the readers reported; journal it when due. Returns the time of
        the stages' last progress."""
        last, new = ray.get(self.progress.poll.remote(), timeout=60)
        self.pending += new
        if self.pending and time.time() - self.written > JOURNAL_S:
            self.flush()
        return last

    def flush(self) -> None:
        """Journal the stats not written yet."""
        if self.pending:
            name, text = output.write_shard_stats(self.store, self.pending)
            self.files[name] = text
            self.pending = []
        self.written = time.time()


def _stream(ds, lock: OutputLock, stats: ShardStats, stall_timeout: float) -> Iterator:
    """The write stage's summary batches, from a thread that drives the stream, while this
    thread checks the lock and the progress (collecting the shard stats) every POLL_S.
    Raises LockLostError or StalledError."""
    batches: queue.Queue = queue.Queue(maxsize=4)
    done = object()

    def drive() -> None:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                batches.put(batch)
            batches.put(done)
        except BaseException as err:  # noqa: BLE001 - handed to the driver's thread
            batches.put(err)

    threading.Thread(target=drive, daemon=True, name="gemlabel-stream").start()
    last = time.time()
    while True:
        lock.check()
        try:
            item = batches.get(timeout=POLL_S)
        except queue.Empty:
            last = max(last, stats.poll())
            if time.time() - last > stall_timeout:
                raise StalledError(
                    f"no progress for {time.time() - last:.0f} s (nothing read, labeled or "
                    f"written; --stall-timeout {stall_timeout:g}). Ray: {resource_summary()}. "
                    "Tasks waiting for resources that never free, or a source that does not "
                    "answer, stall a run: check `ray status` and the inputs; the rows written "
                    "so far are valid and a rerun resumes."
                ) from None
            continue
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        last = time.time()
        yield item


def _label(
    config: RunConfig,
    store: Store,
    lock: OutputLock,
    shards: list[str],
    bank: PromptBank,
    bank_path: str,
    settings: dict,
    started: float,
) -> RunSummary:
    """The body of `run` once `store` is claimed: prepare, scan, label, write the manifest."""
    resumed = output.prepare(store, settings, overwrite=config.overwrite)
    state = output.scan(store, save=True) if resumed else output.OutputState()
    todo = [shard for shard in shards if not state.complete(shard)]
    skipped = sum(state.rows.get(shard, 0) for shard in shards)
    manifest = {
        "config": settings,
        "vocabulary_file": (
            f"{config.vocab}:{config.vocab_column}" if config.vocab_column else config.vocab
        ),
        "prompt_bank_file": bank_path,
        "weights": gem.describe_weights(config.model, config.pretrained, config.seed),
        "inputs": config.inputs,
        "status": "incomplete",
        "versions": _versions(),
        "timings": {"started": started},
    }
    output.write_manifest(store, manifest)

    summary = RunSummary(out=store.display(), status="complete", skipped=skipped)
    errors, nodes = Counter(), Counter()
    written: dict[str, Counter] = {}  # files this run wrote -> their counts (output.scan)
    stats = None  # ShardStats of the stream
    started_ray = _init_ray(config)
    try:
        placement = fit(
            cluster_nodes(), config.actors, config.cpus_per_actor, config.gpus_per_actor
        )
        if placement.message:
            logger.warning("gemlabel: %s", placement.message)
        if todo:
            progress = Progress.remote()
            stats = ShardStats(store, progress)
            ds = ray.data.read_datasource(
                ShardDatasource(todo, state.done, progress=progress),
                override_num_blocks=len(todo),
                ray_remote_args={"num_cpus": placement.task_cpus},
            )
            ds = ds.map_batches(
                decode_batch,
                fn_kwargs={
                    "image_size": config.image_size,
                    "max_pixels": config.max_pixels,
                    "resize": config.resize_stage == "decoder",
                    "jpegs": config.jpeg_stage == "actor",
                },
                batch_size=config.decode_batch_size,
                num_cpus=placement.task_cpus,
            )
            ds = ds.map_batches(
                Labeler,
                fn_constructor_kwargs={
                    "model": config.model,
                    "pretrained": config.pretrained,
                    "method": config.method,
                    "gem_options": config.gem_options,
                    "bank": _bank_for_actors(bank, bank_path),
                    "top_k": config.top_k,
                    "score_threshold": config.score_threshold,
                    "image_size": config.image_size,
                    "precision": config.precision,
                    "seed": config.seed,
                    "compile": config.compile,
                    "background": config.background if config.mask_mode == "background" else (),
                    "templates": bank.templates,
                    "masks": (
                        (config.mask_threshold, config.mask_mode)
                        if config.mask_stage == "actor"
                        else None
                    ),
                    "resize": config.resize_stage == "actor",
                    "jpeg": config.jpeg_stage == "actor",
                    "refine": config.refine,
                    "progress": progress,
                },
                # concurrent calls: one batch on the device while others are batched by
                # Ray, copied to pinned memory or fetched back (Labeler.label's lock)
                compute=ray.data.ActorPoolStrategy(
                    size=placement.actors,
                    max_concurrent_calls_per_actor=config.actor_concurrency,
                    enable_true_multi_threading=config.actor_concurrency > 1,
                ),
                num_gpus=placement.gpus_per_actor,
                num_cpus=placement.cpus_per_actor,
                batch_size=config.batch_size,
            )
            ds = ds.map_batches(
                write_batch,
                fn_kwargs={
                    "out": store,
                    "class_names": class_names(bank.names),
                    "mask_threshold": config.mask_threshold,
                    "mask_mode": config.mask_mode,
                },
                batch_size=config.rows_per_file,
                num_cpus=placement.task_cpus,
            )
            for batch in _stream(ds, lock, stats, config.stall_timeout):
                _count_written(batch, written)
                status = batch["status"]
                summary.ok += int((status == "ok").sum())
                summary.errors += int((status != "ok").sum())
                summary.masks += int(batch["masks"].sum())
                summary.dropped_empty += int(batch["dropped_empty"].sum())
                errors.update(_error_kind(e) for e in batch["error"] if isinstance(e, str))
                nodes.update(batch["node"].tolist())
                if _budget_exceeded(config, summary):
                    summary.status = "aborted"
                    summary.message = (
                        f"error budget exceeded: {summary.errors} of {summary.images} samples "
                        f"failed ({summary.errors / summary.images:.1%}), more than "
                        f"--max-error-rate {config.max_error_rate:g}. Stopped; the rows "
                        "written so far are valid and a rerun resumes. Check the inputs and "
                        "settings (most common errors above)."
                    )
                    break
    except LockLostError as err:  # another run owns the output now: write nothing more
        summary.status, summary.message = "lock lost", str(err)
    except StalledError as err:
        summary.status, summary.message = "stalled", str(err)
    finally:
        if stats is not None and summary.status != "lock lost":
            try:
                stats.poll()  # what the last readers reported
                stats.flush()
            except Exception as err:  # noqa: BLE001 - those shards are read again on resume
                logger.warning("gemlabel: could not journal the last shard stats: %s", err)
        if started_ray:
            ray.shutdown()  # ends this run's actors and tasks, stalled ones included

    summary.seconds = time.time() - started
    summary.top_errors = errors.most_common(5)
    if summary.status == "lock lost":
        return summary
    # every writer is done (the stream ran to its end, or this call's Ray is shut down): what
    # writers that died left behind (temp files, orphan masks) goes now, not at the next run
    journals = stats.files if stats is not None else {}
    listing = None
    if summary.status == "complete" or started_ray:
        listing = output.remove_leftovers(store)
    final = output.scan(
        store, known=written, stats=journals, save=True, listing=listing, fresh=not resumed
    )
    report = output.shard_report(final, shards)
    summary.damaged_shards = [shard for shard, r in report.items() if r["damaged"]]
    if summary.status == "complete" and not all(r["complete"] for r in report.values()):
        summary.status = "incomplete"
        summary.message = "some shards are incomplete (see manifest.json); rerun to resume"
    manifest.update(
        status=summary.status,
        message=summary.message,
        shards=report,
        totals=output.totals(final),
        run={
            "images": summary.images,
            "ok": summary.ok,
            "errors": summary.errors,
            "masks": summary.masks,
            "dropped_empty": summary.dropped_empty,  # empty masks, not written
            "skipped": summary.skipped,
            "actors": placement.actors,
            "gpus_per_actor": placement.gpus_per_actor,
            "task_cpus": placement.task_cpus,
            "fit": placement.message,
            "batch_size": config.batch_size,
            "actor_concurrency": config.actor_concurrency,
            "nodes": dict(nodes),  # Ray node id of the labeling actor -> images
        },
        timings={
            "started": started,
            "seconds": summary.seconds,
            "images_per_second": summary.images_per_second,
        },
    )
    output.write_manifest(store, manifest)
    return summary


def _count_written(batch: dict, written: dict[str, Counter]) -> None:
    """Add a write-stage summary batch's files to `written`: per images file its rows per
    (shard, status), per masks file its rows per shard (what output.scan would count)."""
    for name, shard, status, masks in zip(
        batch["file"], batch["shard"], batch["status"], batch["masks"], strict=True
    ):
        written.setdefault(posixpath.join(output.IMAGES_DIR, name), Counter())[(shard, status)] += 1
        if masks:
            written.setdefault(posixpath.join(output.MASKS_DIR, name), Counter())[(shard,)] += int(
                masks
            )


def _prompt_bank(config: RunConfig) -> tuple[PromptBank, str]:
    """The run's bank and its file: `config.bank` (checked against the model and, with
    `config.vocab`, the vocabulary), else the cache's (built there on first use)."""
    names = load_vocabulary(config.vocab, config.vocab_column) if config.vocab else None
    if config.bank is None:
        return cached(
            names,
            config.model,
            config.pretrained,
            config.templates,
            config.seed,
            config.bank_cache,
        )
    bank = load(config.bank)
    check_model(bank, config.model, config.pretrained, config.seed, config.bank)
    if names is not None and vocabulary_hash(names) != bank.vocabulary_hash:
        raise ValueError(
            f"prompt bank {config.bank} holds another vocabulary than {config.vocab} "
            f"({len(bank.names)} vs {len(names)} classes); leave out --vocab to use the bank's"
        )
    return bank, config.bank


def _bank_for_actors(bank: PromptBank, path: str) -> str | ray.ObjectRef:
    """What the Labeler actors load the bank from: the file itself when they can all see it
    (a URL, or every Ray node is this machine), else one copy in the object store."""
    if "://" in path and not path.startswith("file://"):
        return path
    here = ray.util.get_node_ip_address()
    if all(n["NodeManagerAddress"] == here for n in ray.nodes() if n["Alive"]):
        return os.path.abspath(path)
    return ray.put(bank.embeddings)


def _budget_exceeded(config: RunConfig, summary: RunSummary) -> bool:
    return (
        summary.images >= config.min_error_samples
        and summary.errors > config.max_error_rate * summary.images
    )
