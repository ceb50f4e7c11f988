"""`run(config)`: the Ray Data job from shards to tables, with resume and an error budget,
as named steps:

1. open the output and plan the work (`open_output`): prepare it (refusing other
   settings), scan what is done, list the shards to do, write the manifest "incomplete";
2. fit the run to the cluster (`fit_to_cluster`, pipeline.cluster.fit);
3. build the dataset (pipeline.dataset) from the stage options of pipeline.config;
4. drive the stream (`label`, pipeline.drive): count the rows (pipeline.summary.Tally)
   against the error budget, while a watchdog ends the run on a lost lock or a stall;
5. finish (`finish`): remove what dead writers left, scan the output, settle the status
   and write the final manifest.

Resume: complete shards are not read at all, and keys already in images/ are skipped
inside the other shards (see pipeline.storage.output).
"""

import logging
import os
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import ray

import gem
from pipeline.cluster import Fit, NodeWatch, place, resource_summary, start_progress
from pipeline.config import RunConfig
from pipeline.console import quiet_progress
from pipeline.dataset import build_dataset
from pipeline.drive import ShardStats, StalledError, Watchdog, stream
from pipeline.prompts.bank import PromptBank, cached, check_model, check_weights, load
from pipeline.prompts.vocab import BUILTIN, class_names, load_vocabulary, vocabulary_hash
from pipeline.ray_session import ray_session
from pipeline.stages.read import expand_inputs
from pipeline.storage import output
from pipeline.storage.credentials import check_writable, refuse_credentials
from pipeline.storage.lock import LockLostError, OutputLock
from pipeline.storage.store import Store
from pipeline.summary import ErrorBudget, RunSummary, Tally, redone, settle
from pipeline.tools.progress import ProgressLog

logger = logging.getLogger(__name__)


@dataclass
class Plan:
    """The work of a run, once its output is open."""

    shards: list[str]  # every input shard
    todo: list[str]  # those not complete yet
    done: dict  # keys already labeled, per shard (output.OutputState.done)
    skipped: int  # rows already in the output for these shards
    resumed: bool  # the output held an earlier run's results
    existing: frozenset[str]  # its images files then (the others are this run's)
    manifest: dict  # written "incomplete" now, completed by `finish`


def run(config: RunConfig) -> RunSummary:
    """Label `config.inputs` into `config.out` and return the summary (see RunConfig).

    Raises ValueError (or OSError, gem.WeightsUnavailableError) for unusable
    configurations (no shards, missing vocabulary, unknown model or weights, an output made
    with other settings or being written by another run) before anything is written."""
    started = time.time()
    config_urls = [config.vocab, config.out, config.pretrained, config.bank, config.bank_cache]
    refuse_credentials([*config.inputs, *config_urls])
    store = Store(config.out)
    check_writable(store)  # credentials, endpoint, bucket: one line now, not a traceback later
    shards = expand_inputs(config.inputs)
    # the driver builds or loads the bank first: a bad model, weights or template fail here
    bank, bank_path = _prompt_bank(config)
    with OutputLock(store) as lock:  # one run at a time: a second would relabel the same keys
        plan = open_output(config, store, shards, bank, bank_path, started)
        summary = RunSummary(
            out=store.display(),
            status="complete",
            skipped=plan.skipped,
            random_weights=config.random_weights,
        )
        tally = Tally(summary)
        with ray_session(config.address, config.num_cpus) as started_ray:
            placement = fit_to_cluster(config, static=_embedded(config))
            journals = label(config, store, lock, plan, (bank, bank_path), placement, tally)
        finish(config, store, plan, tally, journals, placement, started_ray, started)
        return summary


def open_output(
    config: RunConfig,
    store: Store,
    shards: list[str],
    bank: PromptBank,
    bank_path: str,
    started: float,
) -> Plan:
    """Prepare the output for this run's settings, scan what is done (on resume), and
    write the class names (readers of the tables need nothing else) and the manifest with
    status "incomplete"."""
    settings = config.output_settings()
    settings["vocabulary"] = {"hash": bank.vocabulary_hash, "classes": len(bank.names)}
    settings["prompt_bank"] = bank.key
    resumed = output.prepare(store, settings, overwrite=config.overwrite)
    listing = output.table_files(store) if resumed else ([], [])
    state = output.scan(store, save=True, listing=listing) if resumed else output.OutputState()
    manifest = {
        "config": settings,
        "vocabulary_file": (
            f"{config.vocab}:{config.vocab_column}" if config.vocab_column else config.vocab
        ),
        "prompt_bank_file": bank_path,
        "weights": gem.describe_weights(config.model, config.weights, config.seed),
        "inputs": config.inputs,
        "status": "incomplete",
        "versions": _versions(),
        "timings": {"started": started},
    }
    output.write_classes(store, class_names(bank.names))  # "sofa; couch" -> "sofa"
    output.write_manifest(store, manifest)
    return Plan(
        shards=shards,
        todo=[shard for shard in shards if not state.complete(shard)],
        done=state.done,
        skipped=sum(state.rows.get(shard, 0) for shard in shards),
        resumed=resumed,
        existing=frozenset(listing[0]),
        manifest=manifest,
    )


def fit_to_cluster(config: RunConfig, static: bool) -> Fit:
    """The run's placement on the connected cluster, once it holds the run (pipeline.cluster
    .place: on an autoscaling cluster, waiting up to `config.scale_timeout` for the nodes,
    saying what it waits for; `static`: nothing can add nodes). Raises ResourcesError when
    it cannot fit or the nodes did not come; says what it adjusted."""
    placement = place(
        config.actors,
        config.cpus_per_actor,
        config.gpus_per_actor,
        config.scale_timeout,
        static,
        say=logger.warning,
    )
    if placement.message:
        logger.warning("gemlabel: %s", placement.message)
    return placement


def label(
    config: RunConfig,
    store: Store,
    lock: OutputLock,
    plan: Plan,
    bank: tuple[PromptBank, str],
    placement: Fit,
    tally: Tally,
) -> dict[str, str]:
    """Label `plan.todo` into `store`, counting into `tally` until the stream ends, the
    error budget is exceeded (status "aborted"), the lock is lost or the stream stalls.
    Returns the shard-stats journal files written (name -> text)."""
    if not plan.todo:
        return {}
    summary = tally.summary
    progress = start_progress()  # on this node: losing another loses none of its stats
    watch = NodeWatch()
    stats = ShardStats(store, progress, watch)
    counts = _progress_log(store, plan)
    ds = _dataset(config, store, plan, bank, placement, progress)
    watchdog = Watchdog(lock, config.stall_timeout, describe=resource_summary)
    budget = ErrorBudget(config.max_error_rate, config.min_error_samples)
    try:
        for batch in stream(ds, watchdog, stats):
            tally.add(batch)
            counts.update(summary.ok, summary.errors, summary.masks, tally.written, stats.samples)
            if budget.exceeded(summary):
                budget.abort(summary)
                break
    except LockLostError as err:  # another run owns the output now: write nothing more
        summary.status, summary.message = "lock lost", str(err)
    except StalledError as err:
        summary.status, summary.message = "stalled", str(err)
    finally:
        if summary.status != "lock lost":
            try:
                stats.poll()  # what the last readers reported
                stats.flush()
                counts.update(
                    summary.ok, summary.errors, summary.masks, tally.written, stats.samples, True
                )
            except Exception as err:  # noqa: BLE001 - those shards are read again on resume
                logger.warning("gemlabel: could not journal the last shard stats: %s", err)
        tally.lost_nodes = watch.lost()
        try:
            tally.reread_shards = ray.get(progress.rereads.remote(), timeout=60)
        except ray.exceptions.RayError as err:  # the count is for the user only
            logger.warning("gemlabel: could not count the shards read again: %s", err)
    return stats.files


def _progress_log(store: Store, plan: Plan) -> ProgressLog:
    """What `gemlabel status OUT` reads while the run goes on, written once now."""
    already = {shard: len(keys) for shard, keys in plan.done.items()}
    complete = len(plan.shards) - len(plan.todo)
    counts = ProgressLog(store, len(plan.shards), complete, plan.skipped, already)
    counts.update(force=True)
    return counts


def _dataset(
    config: RunConfig,
    store: Store,
    plan: Plan,
    bank: tuple[PromptBank, str],
    placement: Fit,
    progress,
):
    """The read -> decode -> label -> write dataset of `plan.todo`, its stages' options
    built from `config`."""
    prompt_bank, bank_path = bank
    stages = (
        config.decode_options(),
        config.label_options(),
        config.write_options(class_names(prompt_bank.names)),
    )
    bank_source = (_bank_for_actors(prompt_bank, bank_path), prompt_bank.templates)
    quiet_progress()  # bars on a terminal, a line a minute in a log (read as ds is built)
    return build_dataset(
        plan.todo, plan.done, store, stages, bank_source, config.batching(), placement, progress
    )


def finish(
    config: RunConfig,
    store: Store,
    plan: Plan,
    tally: Tally,
    journals: dict[str, str],
    placement: Fit,
    started_ray: bool,
    started: float,
) -> None:
    """Remove what writers that died left behind (temp files, orphan masks: every writer
    is done, the stream ran to its end or this run's Ray is shut down), scan the output,
    settle the status and write the final manifest. Nothing with the lock lost."""
    summary = tally.summary
    summary.seconds = time.time() - started
    summary.top_errors = tally.top_errors()
    if summary.status == "lock lost":
        return
    listing = None
    if summary.status == "complete" or started_ray:
        listing = output.remove_leftovers(store)
    if summary.status == "complete":  # every row reached the driver in a reported file
        listing, tally.discarded = output.discard_unreported(
            store, listing, tally.written, plan.existing
        )
    final = output.scan(
        store,
        known=tally.written,
        stats=journals,
        save=True,
        listing=listing,
        fresh=not plan.resumed,
    )
    report = output.shard_report(final, plan.shards)
    summary.damaged_shards = [shard for shard, r in report.items() if r["damaged"]]
    settle(summary, report)
    summary.message = "\n".join(m for m in (summary.message, redone(tally)) if m)
    plan.manifest.update(
        status=summary.status,
        message=summary.message,
        shards=report,
        totals=output.totals(final),
        run=_run_record(config, tally, placement),
        timings={
            "started": started,
            "seconds": summary.seconds,
            "images_per_second": summary.images_per_second,
        },
    )
    output.write_manifest(store, plan.manifest)


def _run_record(config: RunConfig, tally: Tally, placement: Fit) -> dict:
    """The manifest's `run`: what this run did and how it was placed."""
    s = tally.summary
    return {
        "images": s.images,
        "ok": s.ok,
        "errors": s.errors,
        "masks": s.masks,
        "dropped_empty": s.dropped_empty,  # empty masks, not written
        "skipped": s.skipped,
        "actors": placement.actors,
        "gpus_per_actor": placement.gpus_per_actor,
        "task_cpus": placement.task_cpus,
        "fit": placement.message,
        "batch_size": config.batch_size,
        "actor_concurrency": config.actor_concurrency,
        "nodes": dict(tally.nodes),  # Ray node id of the labeling actor -> images
        "lost_nodes": tally.lost_nodes,  # nodes that died during the stream
        "reread_shards": tally.reread_shards,
        "discarded_files": tally.discarded,
    }


def _embedded(config: RunConfig) -> bool:
    """Whether the run starts a local Ray of its own (no cluster to connect to, so nothing
    can add nodes to it)."""
    return not (config.address or os.environ.get("RAY_ADDRESS"))


def _versions() -> dict[str, str]:
    found = {}
    for package in ("gemlabel", "torch", "open_clip_torch", "ray", "pyarrow"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "unknown"
    return found


def _prompt_bank(config: RunConfig) -> tuple[PromptBank, str]:
    """The run's bank and its file: `config.bank` (checked against the model and, with
    `config.vocab`, the vocabulary), else the cache's (built there on first use). Raises
    ValueError naming the flag for weights nobody asked for or a missing --vocab or --bank
    file; gem.WeightsUnavailableError (with a pointer to the demo model) for weights that
    cannot be had."""
    check_weights(config.model, config.pretrained)
    names = _vocabulary(config) if config.vocab else None
    if config.bank is None:
        try:
            return cached(
                names,
                config.model,
                config.weights,
                config.templates,
                config.seed,
                config.bank_cache,
            )
        except gem.WeightsUnavailableError as err:
            raise gem.WeightsUnavailableError(
                f"{str(err).rstrip('.')}. For a demo without downloads: --model gemlabel-toy"
            ) from err
    try:
        bank = load(config.bank)
    except FileNotFoundError:
        raise ValueError(f"--bank {config.bank}: no such file") from None
    check_model(bank, config.model, config.weights, config.seed, config.bank)
    if names is not None and vocabulary_hash(names) != bank.vocabulary_hash:
        raise ValueError(
            f"prompt bank {config.bank} holds another vocabulary than {config.vocab} "
            f"({len(bank.names)} vs {len(names)} classes); leave out --vocab to use the bank's"
        )
    return bank, config.bank


def _vocabulary(config: RunConfig) -> list[str]:
    """The class names of --vocab; a file that does not exist is named with the flag."""
    try:
        return load_vocabulary(config.vocab, config.vocab_column)
    except FileNotFoundError:
        raise ValueError(
            f"--vocab {config.vocab}: no such file (a file of class names, one per line, a "
            f"CSV/Parquet column, or a built-in vocabulary: {', '.join(BUILTIN)})"
        ) from None


def _bank_for_actors(bank: PromptBank, path: str) -> str | ray.ObjectRef:
    """What the Labeler actors load the bank from: the file itself when they can all see it
    (a URL, or every Ray node is this machine), else one copy in the object store."""
    if "://" in path and not path.startswith("file://"):
        return path
    here = ray.util.get_node_ip_address()
    if all(n["NodeManagerAddress"] == here for n in ray.nodes() if n["Alive"]):
        return os.path.abspath(path)
    return ray.put(bank.embeddings)
