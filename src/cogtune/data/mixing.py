"""How the clips of several datasets make one epoch: repeats or a weight per dataset. Knows no model.

An epoch is a fixed list of slots, each with a bucket; the bucket sampler batches and shuffles the slots, and which
clip fills a slot is a pure function of (seed, epoch). So every epoch has the same batches per bucket (the sampler's
length never changes) and a resume continues exactly.

- A dataset with `repeats: r` (the default r = 1) has r slots per trained clip, each clip always its own.
- A dataset with `weight: w` has round(w * E) slots (at least one), E the epoch's size:
  E = (slots of the repeats datasets) / (1 - sum of weights), or, when every trained dataset has a weight (they
  then add up to 1), E = the trained clips of all datasets. Its slots are shared out over its buckets in proportion
  to the clips there (largest remainder, ties to the bucket seen first), so batches stay within one bucket.
  Within a bucket of n clips and k slots, epoch e takes the k clips at positions e*k ... e*k + k - 1 (mod n) of a
  permutation of them drawn from the seed: a dataset shown less than once an epoch goes through all its clips
  before it repeats one, and one shown more than once shows each clip floor(k/n) or ceil(k/n) times.
A bucket whose share of a weighted dataset rounds to 0 slots is not drawn from (the run summary says how many slots
each dataset has).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class EpochMix:
    slots: list[Hashable]  # the bucket of each slot
    per_dataset: dict[str, int]  # slots per epoch of each trained dataset
    _fixed: list[int | None] = field(default_factory=list)  # slot -> its clip, for the repeats datasets
    _cycles: list[tuple[list[int], int, list[int]]] = field(default_factory=list)  # (slots, k, permuted clips)

    @property
    def size(self) -> int:
        return len(self.slots)

    def items(self, epoch: int) -> list[int]:
        """slot -> the clip it holds in `epoch`."""
        out = list(self._fixed)
        for slots, k, clips in self._cycles:
            n = len(clips)
            for j, slot in enumerate(slots):
                out[slot] = clips[(epoch * k + j) % n]
        return out


def _shares(total: int, sizes: list[int]) -> list[int]:
    """`total` split in proportion to `sizes`, by largest remainder (ties: the first)."""
    exact = [total * s / sum(sizes) for s in sizes]
    parts = [int(x) for x in exact]
    by_rest = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in by_rest[:total - sum(parts)]:
        parts[i] += 1
    return parts


def epoch_mix(names: Sequence[str], buckets: Sequence[Hashable], trained: Sequence[bool],
              repeats: dict[str, int], weights: dict[str, float], seed: int) -> EpochMix:
    """The epoch of these clips (`names`: each clip's dataset, `trained`: False for held-out clips) when the
    datasets in `weights` take that share of it and the others appear `repeats[name]` times (default 1)."""
    clips: dict[str, list[int]] = {}
    for i, (name, keep) in enumerate(zip(names, trained)):
        if keep:
            clips.setdefault(name, []).append(i)
    slots: list[Hashable] = []
    fixed: list[int | None] = []
    per: dict[str, int] = {}
    for name, members in clips.items():
        if name not in weights:
            r = repeats.get(name, 1)
            for i in members:
                slots += [buckets[i]] * r
                fixed += [i] * r
            per[name] = len(members) * r
    weighted = [n for n in clips if n in weights]
    total_w = sum(weights[n] for n in weighted)
    if len(weighted) == len(clips):
        epoch = sum(len(m) for m in clips.values())
    else:
        epoch = len(slots) / (1 - total_w) if total_w < 1 else len(slots)
    cycles = []
    for d, name in enumerate(weighted):
        k = max(1, round(weights[name] * epoch))
        per[name] = k
        groups: dict[Hashable, list[int]] = {}
        for i in clips[name]:
            groups.setdefault(buckets[i], []).append(i)
        shares = _shares(k, [len(m) for m in groups.values()])
        for g, ((bucket, members), share) in enumerate(zip(groups.items(), shares)):
            if not share:
                continue
            rng = np.random.default_rng(np.random.SeedSequence([seed, 7919, d, g]))
            order = [members[j] for j in rng.permutation(len(members))]
            cycles.append((list(range(len(slots), len(slots) + share)), share, order))
            slots += [bucket] * share
            fixed += [None] * share
    return EpochMix(slots, {n: per[n] for n in clips}, fixed, cycles)
