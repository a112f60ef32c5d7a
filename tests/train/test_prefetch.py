"""The training loop's prefetch: batches in sampler order, each with the sampler state of 'this batch done' (what a
checkpoint must save), whether the next batch is read ahead on a thread or not; loader errors reach the caller."""

from __future__ import annotations

import pytest

from cogtune.data.buckets import BucketBatchSampler
from cogtune.train.loop import prefetched

BUCKETS = [("a" if i % 3 else "b") for i in range(11)]


@pytest.mark.parametrize("in_ram", [False, True])
def test_states_are_those_after_each_batch(in_ram):
    sampler = BucketBatchSampler(BUCKETS, 2, seed=3, drop_last=False)
    reference = BucketBatchSampler(BUCKETS, 2, seed=3, drop_last=False)
    seen = []
    for state, batch in prefetched(sampler, lambda ids: list(ids), lambda: in_ram):
        expected = next(iter(reference))  # the reference moves one batch at a time, never ahead
        assert batch == expected
        assert state == reference.state_dict()
        seen.append(batch)
    assert len(seen) == len(reference)
    resumed = BucketBatchSampler(BUCKETS, 2, seed=3, drop_last=False)
    resumed.load_state_dict(state)  # the last state: the epoch is over, the next one starts
    assert next(iter(resumed)) == reference.epoch_batches(1)[0]


def test_a_loader_error_reaches_the_caller():
    def load(ids):
        raise ValueError(f"cannot read batch {ids}")

    with pytest.raises(ValueError, match="cannot read batch"):
        for _ in prefetched(BucketBatchSampler(BUCKETS, 2), load):
            pass
