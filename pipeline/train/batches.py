"""The data side of a training pass: collated batches from a worker's dataset shard, fetched early."""

from __future__ import annotations

import concurrent.futures
import threading

from pipeline.shards import ShardCollate
from pipeline.train.plan import TrainingRun

_END = object()  # the end of an iterator


def epoch_batches(runs: list[TrainingRun], shard):
    """A function of the epoch giving that epoch's collated batches from this worker's dataset shard: the
    columns every model of the pass needs (soft targets when one distils, groups when one is listwise)."""
    lead = runs[0]
    distilled = next((r for r in runs if r.distill is not None), None)
    listwise = any(r.distill is not None and r.distill.listwise_weight > 0 for r in runs)
    collate = arrow_collate(ShardCollate(lead.layout, lead.label, distilled.targets if distilled else None,
                                          lead.group if listwise else None, lead.task))
    train = lead.train

    def batches(epoch: int):
        return shard.iter_torch_batches(
            batch_size=train.batch_size, collate_fn=collate, prefetch_batches=train.prefetch_batches,
            local_shuffle_buffer_size=train.shuffle_buffer_rows or None,
            local_shuffle_seed=train.seed + epoch if train.shuffle_buffer_rows else None,
        )

    return batches


def arrow_collate(inner: ShardCollate):
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _Collate(ArrowBatchCollateFn):  # Ray hands Arrow batches only to this subclass
        def __call__(self, batch):
            return inner(batch)

    return _Collate()


def asked_early(batches):
    """Iterates `batches`, having started to fetch the first one on a background thread right away."""
    iterator, first = iter(batches), concurrent.futures.Future()

    def fetch():
        try:
            first.set_result(next(iterator, _END))
        except BaseException as error:  # re-raised in the training loop, where it is handled
            first.set_exception(error)

    threading.Thread(target=fetch, name="first-batch", daemon=True).start()

    def all_batches():
        batch = first.result()
        if batch is not _END:
            yield batch
            yield from iterator

    return all_batches()
