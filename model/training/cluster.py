"""Hosts and replicas: the strategy, each worker's share of the data, and values all workers share.

Each worker builds its own input pipeline (`distribute_datasets_from_function`), so
a resumed epoch skips exactly the steps it did, counted in this worker's own batches:

- DATA (`--shard_policy data`, or `auto` with fewer than 4 shard files per worker):
  every worker reads every file in the same seeded order, forms the global batches a
  single process forms, and keeps its replicas' slices of each. One step is one global
  batch, so N replicas update exactly as one device on it.
- FILE (`auto` with 4 or more files per worker): worker w reads files w, w + W, ...
  (shuffled by the epoch's seed) in batches of its share of the global batch. A worker
  whose files are done gets empty batches until every worker is done.

Either way a step consumes one element of each worker's pipeline (R per-replica
slices), so resuming at position p is `skip(p)` on it. (`experimental_distribute_dataset`
splits every global batch of a worker's files into W steps under FILE sharding, and a
`skip` before it drops W times too much.)

Decisions (which epoch is best, when to stop) must be the same on every worker, or
the collectives of the next step wait forever: `from_chief` hands every worker the
chief's numbers, `sum_over_workers` adds up each worker's share of a result.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf

SHARDS_PER_WORKER_FOR_FILE = 4  # `auto` splits whole files from this many per worker on


def choose_strategy() -> tuple[tf.distribute.Strategy, bool]:
    """(strategy, is_chief): MultiWorker when TF_CONFIG names several tasks, else Mirrored."""
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    jobs = resolver.cluster_spec().as_dict()
    tasks = sum(len(v) for k, v in jobs.items() if k in ("worker", "chief"))
    if tasks > 1:
        strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
        kind, index = resolver.task_type, resolver.task_id
        chief = kind == "chief" or (kind == "worker" and index == 0 and "chief" not in jobs)
        return strategy, chief
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy([d.name for d in gpus] or ["/cpu:0"]), True


def num_workers(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec().as_dict() if resolver is not None else {}
    return max(1, sum(len(v) for k, v in spec.items() if k in ("worker", "chief")))


def task_id(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(resolver.task_id or 0) if resolver is not None else 0


def splits_files(policy: str, files: int, workers: int) -> bool:
    """Whether workers read whole shard files (FILE) rather than slices of every batch;
    never when some worker would get no file."""
    if workers == 1 or files < workers:
        return False
    return policy == "file" or (policy == "auto" and files >= SHARDS_PER_WORKER_FOR_FILE * workers)


def split_sizes(total: int, parts: int) -> list[int]:
    """`total` rows in `parts` pieces that differ by at most one, the larger first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def slices(
    features: tf.Tensor, tokens: tf.Tensor, parts: int, first: int, count: int
) -> tf.data.Dataset:
    """Pieces first .. first + count - 1 of a batch cut into `parts` (`split_sizes`), as a
    dataset of `count` elements (some maybe empty)."""
    n = tf.shape(tokens)[0]
    i = tf.range(parts + 1)
    bounds = i * (n // parts) + tf.minimum(i, n % parts)
    pieces = tf.data.Dataset.range(first, first + count)
    return pieces.map(
        lambda k: (features[bounds[k] : bounds[k + 1]], tokens[bounds[k] : bounds[k + 1]])
    )


def replica_images(images: int, replicas: int) -> list[tuple[int, int]]:
    """The self-critical step's split of a batch of `images`: replica r takes images
    [lo, hi) (contiguous, ceil(images / replicas) each, the last ones maybe empty), with
    all K samples of each, so an image's mean baseline stays on one replica. Replica ids
    run worker by worker, so a worker's share is contiguous too."""
    per = -(-images // replicas)
    return [(min(r * per, images), min((r + 1) * per, images)) for r in range(replicas)]


def distribute_batches(
    strategy: tf.distribute.Strategy,
    batches: Callable[[list[str], int], tf.data.Dataset],
    files: list[str],
    global_batch: int,
    policy: str,
    skip: int = 0,
) -> tf.distribute.DistributedDataset:
    """Each worker's pipeline (see the module's docstring), `skip` steps in.

    `batches(files, batch_size)` -> (features, tokens) batches in a fixed order."""
    workers = num_workers(strategy)
    by_file = splits_files(policy, len(files), workers)

    def worker_dataset(context: tf.distribute.InputContext) -> tf.data.Dataset:
        w = context.input_pipeline_id
        replicas = context.num_replicas_in_sync // context.num_input_pipelines
        if by_file:
            share = sum(split_sizes(global_batch, workers * replicas)[w * replicas :][:replicas])
            ds = batches(files[w::workers], share)
            parts, first = replicas, 0
        else:
            ds = batches(files, global_batch)
            parts, first = workers * replicas, w * replicas
        ds = ds.skip(skip).flat_map(lambda f, t: slices(f, t, parts, first, replicas))
        return ds.prefetch(replicas)

    return strategy.distribute_datasets_from_function(worker_dataset)


def local_replica_ids(strategy: tf.distribute.Strategy) -> list[int]:
    """The ids (in the sync group) of this worker's replicas."""
    ids: list[int] = []

    def record(ctx: tf.distribute.experimental.ValueContext) -> tf.Tensor:
        ids.append(ctx.replica_id_in_sync_group)
        return tf.constant(0)

    strategy.experimental_distribute_values_from_function(record)
    return sorted(ids)


def sum_over_workers(strategy: tf.distribute.Strategy, values: np.ndarray) -> np.ndarray:
    """Each worker's `values` (float64, same shape everywhere) summed over the workers in
    one all-reduce; every worker gets the same array."""
    values = np.asarray(values, np.float64)
    first = local_replica_ids(strategy)[0]

    def value(ctx: tf.distribute.experimental.ValueContext) -> tf.Tensor:
        mine = ctx.replica_id_in_sync_group == first
        return tf.constant(values if mine else np.zeros_like(values))

    per_replica = strategy.experimental_distribute_values_from_function(value)
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()


def from_chief(strategy: tf.distribute.Strategy, values: np.ndarray, chief: bool) -> np.ndarray:
    """The chief's `values` on every worker, bit for bit (the others add zeros)."""
    values = np.asarray(values, np.float64)
    return sum_over_workers(strategy, values if chief else np.zeros_like(values))


def worker_index(strategy: tf.distribute.Strategy) -> int:
    """This worker's place among the workers, in the order of the replicas' ids."""
    per_worker = strategy.num_replicas_in_sync // num_workers(strategy)
    return local_replica_ids(strategy)[0] // per_worker
