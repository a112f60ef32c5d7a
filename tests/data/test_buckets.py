"""cogtune.data.buckets: bucket assignment and the single-bucket, rank-split, resumable batch sampler."""

from __future__ import annotations

import itertools

import pytest

from cogtune.data.buckets import Bucket, BucketBatchSampler, assign_bucket, parse_aspect, resolutions_for_area

RESOLUTIONS = [(480, 720), (720, 480), (512, 512), (256, 256)]
FRAMES = [9, 17, 25]


def test_assign_bucket_nearest_aspect_without_upscale() -> None:
    # 1080x1920 (16:9): every bucket fits; |log(16/9) - log(3/2)| = 0.170 beats 1:1 (0.575) and 2:3 (0.981).
    # 30 frames fill 25 but not more.
    assert assign_bucket(1080, 1920, 30, RESOLUTIONS, FRAMES) == (Bucket(480, 720, 25), "")
    # portrait 1920x1080 -> the 2:3 bucket
    assert assign_bucket(1920, 1080, 25, RESOLUTIONS, FRAMES)[0] == (720, 480, 25)
    # 600x600: the 3:2 and 2:3 buckets would need upscaling (720 > 600); both square ones fit and tie on aspect,
    # so the larger wins. 20 frames fill 17.
    assert assign_bucket(600, 600, 20, RESOLUTIONS, FRAMES)[0] == (512, 512, 17)
    # 300x400 (4:3): 3:2 is nearer in aspect, but only 256x256 fits without upscaling; allow_upscale changes
    # nothing while something fits.
    assert assign_bucket(300, 400, 9, RESOLUTIONS, FRAMES)[0] == (256, 256, 9)
    assert assign_bucket(300, 400, 9, RESOLUTIONS, FRAMES, allow_upscale=True)[0] == (256, 256, 9)


def test_assign_bucket_when_nothing_fits() -> None:
    bucket, reason = assign_bucket(200, 300, 40, RESOLUTIONS, FRAMES)
    assert bucket is None and "smaller than every bucket" in reason and "200x300" in reason
    # with upscaling: nearest aspect among all buckets (3:2 exactly)
    assert assign_bucket(200, 300, 40, RESOLUTIONS, FRAMES, allow_upscale=True)[0] == (480, 720, 25)
    # 200x200: two square buckets tie on aspect; 256 needs x1.28, 512 needs x2.56 -> the least upscaling
    assert assign_bucket(200, 200, 9, RESOLUTIONS, FRAMES, allow_upscale=True)[0] == (256, 256, 9)
    bucket, reason = assign_bucket(1080, 1920, 5, RESOLUTIONS, FRAMES)
    assert bucket is None and "5 frames" in reason and "needs 9" in reason
    with pytest.raises(ValueError, match="at least one resolution"):
        assign_bucket(100, 100, 9, [], FRAMES)


def test_resolutions_for_area() -> None:
    # 3:2 -> h = sqrt(345600 / 1.5) = 480, w = 720; 1:1 -> sqrt(345600) = 587.9 -> 592 (37 x 16);
    # 16:9 -> h = 440.9 -> 448, w = 448 * 16/9 = 796.4 -> 800
    assert resolutions_for_area(480 * 720, ["3:2", "1:1", "2:3", 16 / 9, 1.5]) == [
        (720, 480), (592, 592), (480, 720), (448, 800)]
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in resolutions_for_area(480 * 720, ["16:9", "1:1"], 32))
    assert parse_aspect("16:9") == pytest.approx(16 / 9)
    with pytest.raises(ValueError, match="W:H"):
        parse_aspect("wide")


# 50 items: bucket "a" 23 items, "b" 17, "c" 7, and 3 items without a bucket
KEYS = ["a"] * 23 + ["b"] * 17 + ["c"] * 7 + [None] * 3
KEYS = [KEYS[(i * 7) % 50] for i in range(50)]  # interleave (7 is coprime to 50, so this is a permutation)


def epoch(sampler: BucketBatchSampler) -> list[list[int]]:
    return list(sampler)


def test_every_batch_is_one_bucket_and_ranks_are_disjoint() -> None:
    ranks = [BucketBatchSampler(KEYS, batch_size=4, seed=1, rank=r, world_size=2) for r in range(2)]
    # 23//4 + 17//4 + 7//4 = 5 + 4 + 1 = 10 batches, 5 per rank
    assert [len(s) for s in ranks] == [5, 5]
    batches = [epoch(s) for s in ranks]
    assert [len(b) for b in batches] == [5, 5]
    for batch in batches[0] + batches[1]:
        assert len(batch) == 4 and len({KEYS[i] for i in batch}) == 1 and KEYS[batch[0]] is not None
    seen = [set(itertools.chain.from_iterable(b)) for b in batches]
    assert not seen[0] & seen[1]
    assert sum(len(b) for b in batches[0] + batches[1]) == len(seen[0] | seen[1]) == 40


def test_uneven_batches_pad_so_every_rank_steps_alike() -> None:
    # drop_last=False: 6 + 5 + 2 = 13 batches, short ones filled from their own bucket; padded to 14 -> 7 per rank
    ranks = [BucketBatchSampler(KEYS, batch_size=4, seed=3, rank=r, world_size=2, drop_last=False) for r in range(2)]
    batches = [epoch(s) for s in ranks]
    assert [len(s) for s in ranks] == [len(b) for b in batches] == [7, 7]
    for batch in batches[0] + batches[1]:
        assert len(batch) == 4 and len({KEYS[i] for i in batch}) == 1
    covered = set(itertools.chain.from_iterable(batches[0] + batches[1]))
    assert covered == {i for i, k in enumerate(KEYS) if k is not None}
    # 3 ranks, drop_last=True: 10 batches -> 3 per rank (one dropped); 11 ranks > 10 batches -> repeat, 1 each
    assert [len(epoch(BucketBatchSampler(KEYS, 4, 0, r, 3))) for r in range(3)] == [3, 3, 3]
    assert len(BucketBatchSampler(KEYS, 4, 0, 10, 11)) == 1
    with pytest.raises(ValueError, match="no bucket holds batch_size=30"):
        BucketBatchSampler(KEYS, batch_size=30)


def test_order_depends_on_seed_and_epoch_only() -> None:
    first = epoch(BucketBatchSampler(KEYS, 4, seed=7))
    assert epoch(BucketBatchSampler(KEYS, 4, seed=7)) == first
    assert epoch(BucketBatchSampler(KEYS, 4, seed=8)) != first
    s = BucketBatchSampler(KEYS, 4, seed=7)
    s.set_epoch(1)
    second = epoch(s)
    assert second != first and sorted(map(sorted, second)) != sorted(map(sorted, first))
    # a full pass moves on by itself: iterating again gives epoch 2, as set_epoch(2) on a fresh sampler does
    fresh = BucketBatchSampler(KEYS, 4, seed=7)
    fresh.set_epoch(2)
    assert epoch(s) == epoch(fresh) and s.epoch == 3


def test_state_dict_resumes_mid_epoch_exactly() -> None:
    run = BucketBatchSampler(KEYS, 4, seed=5, rank=1, world_size=2)
    run.set_epoch(3)
    full = run.epoch_batches(3) + run.epoch_batches(4)
    it = iter(run)
    done = [next(it), next(it)]
    state = run.state_dict()
    assert state["epoch"] == 3 and state["position"] == 2

    resumed = BucketBatchSampler(KEYS, 4, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # a loop's usual per-epoch call must not undo the resume
    assert done + epoch(resumed) + epoch(resumed) == full

    # saved after the last batch of an epoch: resumes at the start of the next one
    run.load_state_dict({"epoch": 3, "position": len(run), "seed": 5, "world_size": 2})
    assert run.state_dict()["epoch"] == 4 and epoch(run) == run.epoch_batches(4)
    with pytest.raises(ValueError, match="seed=6"):
        resumed.load_state_dict(state | {"seed": 6})


def test_resume_with_a_different_world_size_skips_nothing() -> None:
    two = [BucketBatchSampler(KEYS, 4, seed=2, rank=r, world_size=2) for r in range(2)]
    for s in two:
        it = iter(s)
        next(it), next(it)
    one = BucketBatchSampler(KEYS, 4, seed=2)
    one.load_state_dict(two[0].state_dict())
    order = two[0].global_batches(0)
    assert epoch(one) == order[4:]  # 2 steps x 2 ranks consumed
