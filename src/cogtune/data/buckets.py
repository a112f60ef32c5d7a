"""Resolution/length buckets and a batch sampler that keeps every batch inside one bucket. Knows no model.

A bucket is (height, width, frames). Clips are assigned to the bucket whose aspect ratio is nearest to theirs
(distance |log(w/h) - log(W/H)|, so 2:1 and 1:2 are equally far from 1:1), scaled to cover it and cropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import NamedTuple

import numpy as np


class Bucket(NamedTuple):
    height: int
    width: int
    frames: int


def parse_aspect(ratio: float | str) -> float:
    """Width / height from a float (1.777) or a "W:H" string ("16:9")."""
    if isinstance(ratio, str):
        w, sep, h = ratio.partition(":")
        try:
            value = float(w) / float(h) if sep else float(ratio)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"aspect ratio {ratio!r}: write it as W:H (e.g. 16:9) or as a number") from None
    else:
        value = float(ratio)
    if not value > 0 or math.isinf(value):
        raise ValueError(f"aspect ratio {ratio!r} must be a positive finite number")
    return value


def resolutions_for_area(area: int, aspect_ratios: Sequence[float | str], multiple: int = 16) -> list[tuple[int, int]]:
    """One (height, width) per aspect ratio (width / height), both multiples of `multiple`, area close to `area`.

    height = nearest multiple to sqrt(area / ratio), width = nearest multiple to height * ratio (each at least
    `multiple`). Duplicates are dropped; the result is sorted by aspect ratio, tall to wide.
    E.g. area=480*720, ratios ["3:2", "1:1", "2:3"] -> [(720, 480), (592, 592), (480, 720)].
    """
    if area <= 0 or multiple <= 0:
        raise ValueError(f"area ({area}) and multiple ({multiple}) must be positive")

    def snap(x: float) -> int:
        return max(multiple, int(round(x / multiple)) * multiple)

    out: set[tuple[int, int]] = set()
    for ratio in aspect_ratios:
        r = parse_aspect(ratio)
        h = snap(math.sqrt(area / r))
        out.add((h, snap(h * r)))
    return sorted(out, key=lambda hw: hw[1] / hw[0])


def _check_resolutions(resolutions: Sequence[tuple[int, int]], frame_counts: Sequence[int]) -> None:
    if not resolutions or not frame_counts:
        raise ValueError("buckets need at least one resolution and one frame count")
    for h, w in resolutions:
        if h <= 0 or w <= 0:
            raise ValueError(f"bucket resolution {h}x{w} must be positive")
    if any(f <= 0 for f in frame_counts):
        raise ValueError(f"bucket frame counts {list(frame_counts)} must be positive")


def assign_bucket(clip_h: int, clip_w: int, clip_frames_available: int, resolutions: Sequence[tuple[int, int]],
                  frame_counts: Sequence[int], allow_upscale: bool = False) -> tuple[Bucket | None, str]:
    """The bucket for one clip: (Bucket, "") or (None, reason).

    Resolution: a bucket (H, W) "fits" when the clip covers it without upscaling (H <= clip_h and W <= clip_w).
    Among the fitting buckets -- or among all buckets if none fits and `allow_upscale` -- pick the nearest
    log aspect ratio; ties go to the least upscaling, then to the largest area (the least detail thrown away).
    If none fits and upscaling is not allowed: None, because an upscaled clip teaches the model blur.
    Frames: the largest frame count <= clip_frames_available; None if even the smallest is longer.
    """
    _check_resolutions(resolutions, frame_counts)
    if clip_h <= 0 or clip_w <= 0:
        return None, f"clip size {clip_h}x{clip_w} is not a valid video size"
    fitting = [(h, w) for h, w in resolutions if h <= clip_h and w <= clip_w]
    if not fitting and not allow_upscale:
        smallest = min(resolutions, key=lambda hw: hw[0] * hw[1])
        return None, (f"clip is {clip_h}x{clip_w}, smaller than every bucket (e.g. {smallest[0]}x{smallest[1]}) "
                      "and upscaling is off; add a smaller resolution or allow upscaling")
    aspect = math.log(clip_w / clip_h)

    def key(hw: tuple[int, int]) -> tuple[float, float, int]:
        h, w = hw
        upscale = max(1.0, h / clip_h, w / clip_w)
        # rounding makes buckets of the same aspect ratio tie exactly despite float noise
        return round(abs(math.log(w / h) - aspect), 9), round(upscale, 9), -h * w

    h, w = min(fitting or resolutions, key=key)
    usable = [f for f in frame_counts if f <= clip_frames_available]
    if not usable:
        return None, (f"clip has {clip_frames_available} frames but the shortest bucket needs {min(frame_counts)}; "
                      "use longer clips or add a shorter frame count")
    return Bucket(h, w, max(usable)), ""


class BucketBatchSampler:
    """Batches of dataset indices, every batch from one bucket, split across ranks with equal step counts.

    bucket_of[i] is item i's bucket key (any hashable, e.g. a Bucket); items whose key is None are left out.
    One epoch, a pure function of (seed, epoch):
      1. group the items by bucket (buckets in order of first appearance) and shuffle each group;
      2. cut each group into batches of `batch_size`. A group's short last batch is dropped (drop_last=True) or
         filled up to batch_size with items of the same group, from its start (drop_last=False);
      3. shuffle the batches of all buckets together;
      4. make the count a multiple of world_size: drop the last (count % world_size) batches (drop_last=True, and
         at least world_size batches exist) or else repeat batches from the start of the list;
      5. rank r takes batches r, r + world, r + 2*world, ...: disjoint across ranks (up to the repeats of 4).
    Every batch therefore has exactly batch_size indices, and every rank len(self) batches per epoch.

    Iterating continues where the last iteration stopped; a full pass moves on to the next epoch by itself, so
    `for batch in sampler` inside a `while step < max_steps` loop just works. `set_epoch(e)` jumps to the start of
    epoch e; calling it with the current epoch keeps the position (so a conventional per-epoch `set_epoch` call
    after `load_state_dict` does not undo the resume). `state_dict()` counts batches *yielded*; a DataLoader that
    prefetches runs ahead of the training step, so there save {"epoch", "position": batches consumed} yourself
    (with the other keys from state_dict()) or keep the DataLoader from prefetching the sampler.

    With `items_of`, the indices are slots (e.g. of `cogtune.data.mixing.EpochMix`) and batches hold
    `items_of(epoch)[slot]` instead: what fills a slot may change per epoch, its bucket may not.
    """

    def __init__(self, bucket_of: Sequence[Hashable | None], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True,
                 items_of: Callable[[int], Sequence[int]] | None = None) -> None:
        self.items_of = items_of
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        self.batch_size, self.seed, self.rank, self.world_size, self.drop_last = (
            batch_size, seed, rank, world_size, drop_last)
        groups: dict[Hashable, list[int]] = {}
        for index, key in enumerate(bucket_of):
            if key is not None:
                groups.setdefault(key, []).append(index)
        self._groups = list(groups.values())
        full = sum(len(g) // batch_size for g in self._groups)
        self._global_batches = full if drop_last else sum(math.ceil(len(g) / batch_size) for g in self._groups)
        if self._global_batches == 0:
            sizes = sorted((len(g) for g in self._groups), reverse=True)[:3]
            raise ValueError(f"no bucket holds batch_size={batch_size} items (largest buckets: {sizes}); "
                             "lower the batch size, use fewer buckets, or set drop_last=False")
        self.epoch, self.position = 0, 0

    @property
    def num_buckets(self) -> int:
        return len(self._groups)

    def __len__(self) -> int:
        """Batches per rank per epoch."""
        if self.drop_last and self._global_batches >= self.world_size:
            return self._global_batches // self.world_size
        return math.ceil(self._global_batches / self.world_size)

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of `epoch` in order, after step 4 (rank r's are [r::world_size])."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        batches: list[list[int]] = []
        for group in self._groups:
            order = [group[i] for i in rng.permutation(len(group))]
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                if len(batch) < self.batch_size:
                    if self.drop_last:
                        continue
                    batch = batch + (order * self.batch_size)[:self.batch_size - len(batch)]
                batches.append(batch)
        batches = [batches[i] for i in rng.permutation(len(batches))]
        total = len(self) * self.world_size
        batches = (batches * math.ceil(total / len(batches)))[:total]
        if self.items_of is not None:
            items = self.items_of(epoch)
            batches = [[items[i] for i in b] for b in batches]
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order (a pure function; does not move the sampler)."""
        return self.global_batches(epoch)[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        self._roll_over()
        epoch = self.epoch
        batches = self.epoch_batches(epoch)
        while self.epoch == epoch and self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        self._roll_over()

    def _roll_over(self) -> None:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "position" (next batch of this rank), "seed", "world_size", "batches" (per epoch, all ranks)}."""
        epoch, position = (self.epoch + 1, 0) if self.position >= len(self) else (self.epoch, self.position)
        return {"epoch": epoch, "position": position, "seed": self.seed, "world_size": self.world_size,
                "batches": self._global_batches}

    def load_state_dict(self, state: dict[str, int], strict: bool = True) -> None:
        """Continue at the saved batch. A different world_size continues at the same point of the epoch's global
        order (floor: at most world_size - 1 batches are seen twice, none skipped). With strict, a different seed
        or batch count (the data or batch size changed, so the order would differ) raises ValueError."""
        if strict:
            for name, mine in (("seed", self.seed), ("batches", self._global_batches)):
                if name in state and state[name] != mine:
                    raise ValueError(f"sampler state has {name}={state[name]} but this sampler has {mine}; "
                                     "the seed, data or batch size changed, so the saved order cannot be resumed")
        consumed = int(state["position"]) * int(state.get("world_size", self.world_size))
        self.epoch, self.position = int(state["epoch"]), consumed // self.world_size
        self._roll_over()
