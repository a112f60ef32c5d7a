"""Which source frames make a training clip: pure arithmetic on frame counts and rates, no decoding. Knows no model.

The model's frame rule arrives as numbers (`allowed_frame_counts(8, 6)` for CogVideoX 1.0, `(16, 10)` for 1.5).

Sampling modes (how `want` frames are taken from a clip, or from its start/end segment):
    uniform  spread evenly over the segment, first and last frame included
    head     the first `want` frames
    random   `want` consecutive frames from a random start (`rng`)
    fps      resample to `target_fps` (source frame of output k = round(k * src_fps / target_fps)), then take a
             window of `want` resampled frames, centred (window="center") or at a random place (window="random")

Short-clip policies (the segment is too short for `want` frames, or in `fps` mode its rate is below the target):
    skip         the plan carries a reason and no frames (the default)
    pad_last     the frames there are, then the last one repeated
    loop         the frames there are, repeated from the start
    slow         frames repeated to stretch time: resample at a lower rate so `want` frames cover the segment
    interpolate  like slow, but each frame is a linear blend of its two neighbours (`upper`, `weights`)
    smaller      the largest count in `allowed` (<= want) the segment can fill without repeats
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cogtune.errors import CogtuneError

SAMPLING_MODES = ("uniform", "head", "random", "fps")
SHORT_POLICIES = ("skip", "pad_last", "loop", "slow", "interpolate", "smaller")
WINDOWS = ("center", "random")
_RATE_TOLERANCE = 0.01  # 23.976 fps counts as 24: a frame repeats only every ~100 output frames


@dataclass(frozen=True)
class FramePlan:
    """Source frames (indices into the whole clip) for each output frame.

    Output frame k is frame `indices[k]`, or with blending (1 - weights[k]) * indices[k] + weights[k] * upper[k].
    `span` is the share of the segment's duration from the first chosen frame to the end of the last one.
    A clip that cannot be used has no indices and a `reason` starting with a problem keyword ("too-short: ...").
    """

    indices: tuple[int, ...]
    span: float = 0.0
    upper: tuple[int, ...] | None = None
    weights: tuple[float, ...] | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def frames(self) -> int:
        return len(self.indices)

    @property
    def needed(self) -> list[int]:
        """The distinct source frames to decode, ascending."""
        return sorted(set(self.indices) | set(self.upper or ()))


def allowed_frame_counts(step: int, max_n: int, min_n: int = 1) -> list[int]:
    """[step*N + 1 for N in min_n..max_n], ascending: e.g. (8, 6) -> [9, 17, 25, 33, 41, 49]."""
    if step < 1 or max_n < min_n:
        raise CogtuneError(f"allowed_frame_counts needs step >= 1 and max_n >= min_n (got {step}, {max_n}, {min_n})")
    return [step * n + 1 for n in range(max(min_n, 0), max_n + 1)]


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def segment_frames(total: int, fps: float, start: float | None, end: float | None) -> int | None:
    """How many of a clip's `total` frames lie in its start/end segment (None if they cannot be told)."""
    seg = _segment(total, fps, start, end)
    return None if isinstance(seg, str) else seg[1]


def _segment(total: int, fps: float, start: float | None, end: float | None) -> tuple[int, int] | str:
    """-> (first frame, frame count) of the frames with start <= i / fps < end, or a reason."""
    if start is None and end is None:
        return 0, total
    if fps <= 0:
        return "bad-time: the clip's frame rate is unknown, so start/end cannot be mapped to frames; re-encode it"
    s0 = max(0, math.ceil((start or 0.0) * fps - 1e-6))
    s1 = total if end is None else min(total, math.ceil(end * fps - 1e-6))
    if s0 >= total:
        return (f"bad-time: start {start:g}s is at or past the clip's end ({total / fps:.2f}s); "
                "fix start in the dataset table")
    if s1 <= s0:
        return f"bad-time: segment {start or 0:g}s-{end:g}s holds no frames; fix start/end in the dataset table"
    return s0, s1 - s0


def _window(m: int, want: int, window: str, rng: np.random.Generator | None) -> int:
    if window == "random":
        return int((rng or np.random.default_rng()).integers(0, m - want + 1))
    return (m - want) // 2


def _resampled_count(n: int, step: float) -> int:
    """How many k have round(k * step) <= n - 1."""
    return max(1, math.ceil((n - 0.5) / step))


def _fit(n: int, want: int, mode: str, step: float | None, window: str,
         rng: np.random.Generator | None) -> list[int] | None:
    """The frames (relative to the segment) when the segment holds `want` frames without repeats, else None."""
    if mode == "fps":
        assert step is not None
        m = _resampled_count(n, step)
        if step < 1 - _RATE_TOLERANCE or m < want:
            return None
        k0 = _window(m, want, window, rng)
        return [min(n - 1, _half_up((k0 + k) * step)) for k in range(want)]
    if n < want:
        return None
    if mode == "uniform":
        # Python's round (half to even) is kept from the first release so saved runs pick the same frames
        return [0] if want == 1 else [round(i * (n - 1) / (want - 1)) for i in range(want)]
    if mode == "head":
        return list(range(want))
    start = int((rng or np.random.default_rng()).integers(0, n - want + 1))
    return list(range(start, start + want))


def _short_reason(n: int, fps: float, want: int, mode: str, target_fps: float | None, segment: bool) -> str:
    what = "segment" if segment else "clip"
    policy = "a short-clip policy (pad_last, loop, slow, interpolate, smaller)"
    if mode == "fps":
        assert target_fps is not None
        if fps / target_fps < 1 - _RATE_TOLERANCE:
            return (f"too-slow: {what} is {fps:g} fps, below the target {target_fps:g} fps, so frames would repeat; "
                    f"use {policy} or a lower target fps")
        return (f"too-short: {what} has {n} frames at {fps:g} fps ({n / fps:.2f}s) but {want} frames at "
                f"{target_fps:g} fps need {want / target_fps:.2f}s; use longer clips, fewer frames, or {policy}")
    return f"too-short: {what} has {n} frames but {want} are needed; use longer clips, fewer frames, or {policy}"


def _span(lo: int, hi: int, n: int) -> float:
    return min(1.0, (hi - lo + 1) / n)


def plan_frames(total: int, fps: float, want: int, mode: str = "uniform", *, start: float | None = None,
                end: float | None = None, target_fps: float | None = None, short: str = "skip",
                allowed: Sequence[int] | None = None, window: str = "center",
                rng: np.random.Generator | None = None) -> FramePlan:
    """Plan which frames of a `total`-frame clip at `fps` make a `want`-frame training clip (see the module doc).

    start/end (seconds) restrict the plan to that segment. Bad settings (unknown mode, want < 1, fps mode without
    target_fps, smaller without `allowed`) raise CogtuneError; a clip that can't be used gives a plan with a reason.
    """
    _validate(want, mode, target_fps, short, allowed, window)
    seg = _segment(total, fps, start, end)
    if isinstance(seg, str):
        return FramePlan((), reason=seg)
    s0, n = seg
    if n <= 0:
        return FramePlan((), reason="zero-frames: the video has no frames; re-encode or remove it")
    step = None
    if mode == "fps":
        assert target_fps is not None
        if fps <= 0:
            return FramePlan((), reason="unknown-fps: the clip's frame rate is unknown; re-encode it with a fixed rate")
        step = fps / target_fps
    segment = start is not None or end is not None

    def done(idx: list[int], upper: list[int] | None = None, weights: list[float] | None = None) -> FramePlan:
        hi = max(upper) if upper else max(idx)
        return FramePlan(tuple(s0 + i for i in idx), _span(min(idx), hi, n),
                         None if upper is None else tuple(s0 + i for i in upper),
                         None if weights is None else tuple(weights))

    fitted = _fit(n, want, mode, step, window, rng)
    if fitted is not None:
        return done(fitted)
    if short == "skip":
        return FramePlan((), reason=_short_reason(n, fps, want, mode, target_fps, segment))
    if short == "smaller":
        for count in sorted({c for c in allowed or () if c <= want}, reverse=True):
            fitted = _fit(n, count, mode, step, window, rng)
            if fitted is not None:
                return done(fitted)
        counts = ", ".join(str(c) for c in sorted(allowed or ()))
        reason = _short_reason(n, fps, want, mode, target_fps, segment)
        return FramePlan((), reason=f"{reason.split(';')[0]}, and no allowed count ({counts}) fits either; "
                                    "use longer clips or drop this one")

    # The frames there are: every frame, or in fps mode the resampled ones (with repeats when the clip is slow).
    m = _resampled_count(n, step) if step is not None else n
    have = [min(n - 1, _half_up(k * step)) for k in range(m)] if step is not None else list(range(n))
    slow_but_long = step is not None and m >= want  # only the rate is short: keep real time, repeat frames
    if short in ("pad_last", "loop") or (short == "slow" and slow_but_long):
        if len(have) >= want:
            k0 = _window(len(have), want, window, rng)
            return done(have[k0:k0 + want])
        if short == "pad_last":
            return done(have + [have[-1]] * (want - len(have)))
        if short == "loop":
            return done([have[k % len(have)] for k in range(want)])
    if short == "slow":
        return done([k * n // want for k in range(want)])
    # interpolate: continuous source positions, each output frame blends floor(p) and floor(p) + 1
    if slow_but_long:
        assert step is not None
        k0 = _window(m, want, window, rng)
        pos = [min(n - 1.0, (k0 + k) * step) for k in range(want)]
    else:
        pos = [0.0] * want if want == 1 else [k * (n - 1) / (want - 1) for k in range(want)]
    lower = [min(n - 1, int(math.floor(p + 1e-9))) for p in pos]
    weights = [max(0.0, p - lo) if p - lo > 1e-6 else 0.0 for p, lo in zip(pos, lower)]
    upper = [min(n - 1, lo + 1) if w > 0 else lo for lo, w in zip(lower, weights)]
    return done(lower, upper, weights)


def _validate(want: int, mode: str, target_fps: float | None, short: str, allowed: Sequence[int] | None,
              window: str) -> None:
    if want < 1:
        raise CogtuneError(f"frames must be at least 1 (got {want}); set a positive frame count")
    if mode not in SAMPLING_MODES:
        raise CogtuneError(f"unknown frame sampling mode {mode!r}; use one of {', '.join(SAMPLING_MODES)}")
    if short not in SHORT_POLICIES:
        raise CogtuneError(f"unknown short-clip policy {short!r}; use one of {', '.join(SHORT_POLICIES)}")
    if window not in WINDOWS:
        raise CogtuneError(f"unknown window {window!r}; use one of {', '.join(WINDOWS)}")
    if mode == "fps" and not (target_fps and target_fps > 0):
        raise CogtuneError("sampling mode 'fps' needs a target fps > 0 (the model's native fps, e.g. 8 or 16)")
    if short == "smaller" and not allowed:
        raise CogtuneError("short-clip policy 'smaller' needs the allowed frame counts (e.g. 49, 33, 17)")


def plan_bucketed(total: int, fps: float, counts: Sequence[int], mode: str = "uniform", *, short: str = "skip",
                  allowed: Sequence[int] | None = None, **kwargs) -> FramePlan:
    """Frame buckets `counts`: the largest one the clip fills as it is; else the smallest, under the `short` policy
    (and `allowed` counts for "smaller"). The one rule training and `data check` both plan by."""
    counts = sorted(set(counts), reverse=True)
    for count in counts[:-1]:
        plan = plan_frames(total, fps, count, mode, short="skip", **kwargs)
        if plan.ok:
            return plan
    return plan_frames(total, fps, counts[-1], mode, short=short, allowed=allowed, **kwargs)
