"""data.datasets[].weight: how an epoch is formed from repeats and weights (cogtune/data/mixing.py), what the bucket
sampler makes of it, and the one-line refusals of weights that make no sense."""

from __future__ import annotations

from collections import Counter

import pytest

from cogtune.config import load_config
from cogtune.data.buckets import BucketBatchSampler
from cogtune.data.mixing import epoch_mix
from cogtune.errors import CogtuneError

A, B, IMG = (32, 48, 9), (32, 48, 17), (32, 48, 1)


def _mix(weights, repeats=None, seed=0):
    # dataset "big": 10 clips in two buckets (7 + 3); "small": 2 clips; "stills": 4 images
    names = ["big"] * 10 + ["small"] * 2 + ["stills"] * 4
    buckets = [A] * 7 + [B] * 3 + [A] * 2 + [IMG] * 4
    return names, buckets, epoch_mix(names, buckets, [True] * 16, repeats or {}, weights, seed)


def test_repeats_alone_are_fixed_slots():
    _, buckets, mix = _mix({}, {"small": 3})
    assert mix.size == 10 + 6 + 4 and mix.per_dataset == {"big": 10, "small": 6, "stills": 4}
    assert mix.items(0) == mix.items(5) and Counter(mix.items(0))[10] == 3
    assert [buckets[i] for i in mix.items(0)] == mix.slots


def test_weights_with_repeats_take_their_share_of_the_epoch():
    names, buckets, mix = _mix({"big": 0.5}, {"small": 2})
    # repeats datasets: 2 x 2 + 4 = 8 slots = the other half, so the epoch has 16 and big 8 of them
    assert mix.size == 16 and mix.per_dataset == {"big": 8, "small": 4, "stills": 4}
    seen = Counter()
    for epoch in range(5):  # 5 epochs x 8 slots = 40 = 4 passes over big's 10 clips, bucket by bucket
        items = mix.items(epoch)
        assert [buckets[i] for i in items] == mix.slots  # a slot's bucket never changes
        big = [i for i in items if names[i] == "big"]
        assert len(big) == 8 and len(set(big)) == 8  # under once an epoch: no clip twice in one
        seen.update(big)
    # 8 slots over buckets of 7 and 3 clips: 6 (5.6 rounded by largest remainder) and 2; over 5 epochs each clip
    # of a bucket is shown floor or ceil of its share
    assert sorted(seen[i] for i in range(7)) == [4, 4, 4, 4, 4, 5, 5] and sorted(seen[i] for i in range(7, 10)) == [3, 3, 4]


def test_every_dataset_weighted_splits_the_clip_count():
    _, _, mix = _mix({"big": 0.25, "small": 0.5, "stills": 0.25})
    assert mix.size == 16 and mix.per_dataset == {"big": 4, "small": 8, "stills": 4}
    assert Counter(i for i in mix.items(3) if i in (10, 11)) == {10: 4, 11: 4}  # 8 slots of 2 clips: 4 each


def test_the_draw_is_the_seeds():
    assert _mix({"big": 0.5}, seed=1)[2].items(2) == _mix({"big": 0.5}, seed=1)[2].items(2)
    assert _mix({"big": 0.5}, seed=1)[2].items(2) != _mix({"big": 0.5}, seed=2)[2].items(2)


def test_the_sampler_batches_slots_and_resumes_exactly():
    names, buckets, mix = _mix({"big": 0.5}, {"small": 2})
    whole = BucketBatchSampler(mix.slots, 2, seed=3, drop_last=False, items_of=mix.items)
    straight = [b for _ in range(3) for b in whole]  # three epochs
    assert all(len({buckets[i] for i in b}) == 1 for b in straight)  # one bucket per batch
    first = BucketBatchSampler(mix.slots, 2, seed=3, drop_last=False, items_of=mix.items)
    head = list(first)
    it = iter(first)
    head += [next(it) for _ in range(3)]  # into the second epoch
    resumed = BucketBatchSampler(mix.slots, 2, seed=3, drop_last=False, items_of=mix.items)
    resumed.load_state_dict(first.state_dict())
    rest = [b for _ in range(2) for b in resumed][:len(straight) - len(head)]
    assert head + rest == straight
    two = [BucketBatchSampler(mix.slots, 1, seed=3, rank=r, world_size=2, drop_last=False, items_of=mix.items)
           for r in range(2)]
    one = BucketBatchSampler(mix.slots, 1, seed=3, drop_last=False, items_of=mix.items)
    assert one.global_batches(1) == two[0].global_batches(1)  # the same global order on any world size


def _load(datasets):
    return load_config(None, base={"model": {"path": "m"}, "data": {"datasets": datasets}})


@pytest.mark.parametrize("datasets,message", [
    ([{"root": "a", "repeats": 2, "weight": 0.5}, {"root": "b"}], "give repeats .* or weight .*, not both"),
    ([{"root": "a", "weight": 0.3}, {"root": "b", "weight": 0.3}], r"0.3 \+ 0.3 = 0.6\) .* must add up to 1"),
    ([{"root": "a", "weight": 0.6}, {"root": "b", "weight": 0.4}, {"root": "c"}], "must add up to less than 1"),
    ([{"root": "a", "weight": 0}, {"root": "b"}], "greater than 0"),
    ([{"root": "a", "weight": 1.5}, {"root": "b"}], "less than or equal to 1"),
    ([{"root": "a"}, {"root": "b", "weight": 0.5, "heldout": True}], "heldout dataset is never trained on"),
    ([{"root": "x/a"}, {"root": "y/a"}], "two entries of data.datasets are named 'a'"),
])
def test_weights_that_make_no_sense_are_one_line(datasets, message):
    with pytest.raises(CogtuneError, match=message) as e:
        _load(datasets)
    assert "\n" not in str(e.value)


def test_sensible_weights_load():
    cfg = _load([{"root": "a", "weight": 0.3}, {"root": "b", "repeats": 3}, {"root": "c", "heldout": True}])
    assert cfg.data.weights() == {"a": 0.3} and [r for _, _, r in cfg.data.entries()] == [1, 3, 1]
    assert _load([{"root": "a", "weight": 0.7}, {"root": "b", "weight": 0.3}]).data.weights() == {"a": 0.7, "b": 0.3}


def test_resume_refuses_a_changed_mix_and_takes_an_older_checkpoints_entries(tmp_path):
    from cogtune.train.checkpoint import check_compatible

    def dump(datasets, **data):
        return load_config(None, base={"model": {"path": "m"}, "data": {"datasets": datasets, **data}}).model_dump(
            mode="json")

    now = dump([{"root": "a", "weight": 0.3}, {"root": "b"}])
    check_compatible(now, dump([{"root": "a", "weight": 0.3}, {"root": "b", "repeats": 1}]), tmp_path)
    with pytest.raises(CogtuneError, match=r"data.datasets.0.weight=0.3, this run has data.datasets.0.weight=0.4"):
        check_compatible(now, dump([{"root": "a", "weight": 0.4}, {"root": "b"}]), tmp_path)
    with pytest.raises(CogtuneError, match="data.shuffle_tags=False, this run has data.shuffle_tags=True"):
        check_compatible(now, dump([{"root": "a", "weight": 0.3}, {"root": "b"}], shuffle_tags=True), tmp_path)
    older = dump([{"root": "a", "repeats": 2}, {"root": "b"}])  # as a checkpoint of the release before weights
    for key in ("shuffle_tags", "keep_tokens", "tag_variants"):
        del older["data"][key]
    for entry in older["data"]["datasets"]:
        for key in ("weight", "sampling", "target_fps", "window", "short_clips", "crop", "shuffle_tags",
                    "keep_tokens", "tag_variants"):
            del entry[key]
    older["data"]["datasets"][1]["repeats"] = 1  # then the default was written out
    check_compatible(older, dump([{"root": "a", "repeats": 2}, {"root": "b"}]), tmp_path)
