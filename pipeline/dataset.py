"""The run's Ray Data chain, assembled from the stage options:
read_datasource(ShardDatasource) -> map_batches(decode_batch) -> map_batches(Labeler, an
actor pool) -> map_batches(write_batch), each stage asking for the resources of the run's
fit to the cluster (pipeline.cluster.Fit)."""

import functools
from dataclasses import asdict

import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.cluster import Fit
from pipeline.stages.decode import decode_batch
from pipeline.stages.label import Labeler
from pipeline.stages.options import Batching, DecodeOptions, LabelOptions, WriteOptions
from pipeline.stages.read import read_shard
from pipeline.stages.write import write_batch
from pipeline.storage.schema import READ_SCHEMA
from pipeline.storage.store import Store


class ShardDatasource(Datasource):
    """WebDataset shards as a Ray Data datasource: one read task per shard.

    `done` maps a shard to keys already in the output (skipped); pass only the shards that
    still have work. With `progress` (pipeline.cluster.Progress), each task reports its
    shard's stats there at the end."""

    def __init__(
        self,
        shards: list[str],
        done: dict[str, set[str]] | None = None,
        rows_per_block: int = 128,
        progress=None,
    ):
        super().__init__()
        self.progress = progress
        self.shards = shards
        self.done = done or {}
        self.rows_per_block = rows_per_block

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        tasks = []
        for shard in self.shards:
            done = frozenset(self.done.get(shard, ()))
            read = functools.partial(
                read_shard, shard, done, self.rows_per_block, progress=self.progress
            )
            metadata = BlockMetadata(
                num_rows=None, size_bytes=None, input_files=[shard], exec_stats=None
            )
            tasks.append(
                ReadTask(read, metadata, schema=READ_SCHEMA, per_task_row_limit=per_task_row_limit)
            )
        return tasks


def build_dataset(
    shards: list[str],
    done: dict,
    store: Store,
    stages: tuple[DecodeOptions, LabelOptions, WriteOptions],
    bank: tuple[str | ray.ObjectRef, tuple[str, ...]],
    batching: Batching,
    placement: Fit,
    progress,
) -> ray.data.Dataset:
    """The dataset whose rows are the write stage's summary rows for `shards` (keys in
    `done` skipped). `bank`: what the labeling actors load the bank from, and its
    templates; `progress`: the Progress actor the readers and actors tick."""
    decode, label, write = stages
    source, templates = bank
    ds = ray.data.read_datasource(
        ShardDatasource(shards, done, progress=progress),
        override_num_blocks=len(shards),
        num_cpus=placement.task_cpus,
    )
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs=asdict(decode),
        batch_size=batching.decode,
        num_cpus=placement.task_cpus,
    )
    ds = ds.map_batches(
        Labeler,
        fn_constructor_kwargs={
            "options": label,
            "bank": source,
            "templates": templates,
            "progress": progress,
        },
        # concurrent calls: one batch on the device while others are batched by Ray,
        # copied to pinned memory or fetched back (Labeler.label's lock)
        compute=ray.data.ActorPoolStrategy(
            size=placement.actors,
            max_concurrent_calls_per_actor=batching.actor_concurrency,
            enable_true_multi_threading=batching.actor_concurrency > 1,
        ),
        num_gpus=placement.gpus_per_actor,
        num_cpus=placement.cpus_per_actor,
        batch_size=batching.label,
    )
    return ds.map_batches(
        write_batch,
        fn_kwargs={"out": store, **asdict(write)},
        batch_size=batching.write,
        num_cpus=placement.task_cpus,
    )
