"""Captions as training encodes them: a trigger word in every one."""

from __future__ import annotations

TRIGGER_SLOT = "[trigger]"


def with_trigger(caption: str, trigger: str | None) -> str:
    """`caption` with `trigger` in it: where the caption writes [trigger], else in front ("sks, a dog runs")."""
    if not trigger:
        return caption
    if TRIGGER_SLOT in caption:
        return caption.replace(TRIGGER_SLOT, trigger)
    return f"{trigger}, {caption}" if caption else trigger
