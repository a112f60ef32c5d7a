"""The held-out clips of a dataset: set aside before training, the same on every rank and at every resume."""

from __future__ import annotations

import random

from cogtune.errors import CogtuneError


def holdout_indices(n: int, holdout: float, seed: int) -> list[int]:
    """Indices of the `holdout` items (a count >= 1, or a share 0 < holdout < 1, at least one item) of `n`, chosen
    at random by `seed`; [] for 0. At least one item must stay to train on."""
    if not holdout:
        return []
    k = int(holdout) if holdout >= 1 else max(1, round(holdout * n))
    if k >= n:
        raise CogtuneError(f"validation.holdout={holdout:g} sets aside {k} of the {n} usable clips, leaving none to "
                           f"train on: hold out fewer (e.g. validation.holdout={max(1, n // 10)}) or add clips")
    return sorted(random.Random(f"holdout-{seed}").sample(range(n), k))
