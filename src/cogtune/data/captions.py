"""Captions as training encodes them: a trigger word in every one, tags in other orders. Knows no model."""

from __future__ import annotations

import math
import random

TRIGGER_SLOT = "[trigger]"


def with_trigger(caption: str, trigger: str | None) -> str:
    """`caption` with `trigger` in it: where the caption writes [trigger], else in front ("sks, a dog runs")."""
    if not trigger:
        return caption
    if TRIGGER_SLOT in caption:
        return caption.replace(TRIGGER_SLOT, trigger)
    return f"{trigger}, {caption}" if caption else trigger


def tag_orders(caption: str, trigger: str | None, count: int, keep: int, key: str) -> list[str]:
    """`count` versions of `caption` with its comma-separated tags in other orders, all different (fewer when the
    tags have fewer orders), drawn from `key` (the same every time), each with the trigger as `with_trigger` puts
    it, so it stays first. The first `keep` tags stay where they are (kohya's keep_tokens), and so does a tag that
    holds the [trigger] slot."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    fixed = set(range(min(keep, len(tags)))) | {i for i, t in enumerate(tags) if TRIGGER_SLOT in t}
    movable = [i for i in range(len(tags)) if i not in fixed]
    rng = random.Random(key)
    out: list[str] = []
    want = min(count, math.factorial(min(len(movable), 12)))
    for _ in range(50 * count):
        if len(out) == want:
            break
        order = movable[:]
        rng.shuffle(order)
        picks = iter(order)
        text = with_trigger(", ".join(tags[i] if i in fixed else tags[next(picks)] for i in range(len(tags))), trigger)
        if text not in out:
            out.append(text)
    return out
