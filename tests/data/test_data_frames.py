"""Frame selection on real H.264 clips whose frames carry their own index as a grey level.

Expected frames are worked out here from each clip's length and rate, not by calling the code under test.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from cogtune.data.dataset import VideoClips
from cogtune.data.frames import allowed_frame_counts, plan_frames
from cogtune.data.sources import Sample
from cogtune.data.video import load_clip, read_frames, write_mp4
from cogtune.errors import CogtuneError

SIZE = 32


def index_clip(path: Path, n: int, fps: float, keyframe_every: int | None = None) -> Path:
    """Frame i: left half grey (i // 16) * 16, right half grey (i % 16) * 16, coarse enough to survive H.264."""
    frames = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    for i in range(n):
        frames[i, :, : SIZE // 2] = (i // 16) * 16
        frames[i, :, SIZE // 2:] = (i % 16) * 16
    if keyframe_every is None:
        return write_mp4(frames, path, fps)
    with av.open(str(path), "w") as container:  # short GOPs with B-frames, so decoding really seeks
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width = stream.height = SIZE
        stream.pix_fmt, stream.options = "yuv420p", {"g": str(keyframe_every), "bf": "2"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def levels(clip: torch.Tensor | np.ndarray) -> list[float]:
    """The (possibly fractional, for blends) frame index each output frame shows."""
    x = clip if isinstance(clip, np.ndarray) else ((clip.permute(0, 2, 3, 1) + 1) * 127.5).numpy()
    left, right = x[:, 4:-4, 2:SIZE // 2 - 4].mean(axis=(1, 2, 3)), x[:, 4:-4, SIZE // 2 + 4:-2].mean(axis=(1, 2, 3))
    return [round(float(a) / 16) * 16 + float(b) / 16 for a, b in zip(left, right)]


def indices(clip: torch.Tensor | np.ndarray) -> list[int]:
    got = levels(clip)
    assert all(abs(g - round(g)) < 0.2 for g in got), got  # whole frames, no blends
    return [round(g) for g in got]


def load(path: Path, frames: int, mode: str = "uniform", **kw) -> torch.Tensor:
    return load_clip(path, frames, SIZE, SIZE, mode, **kw)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("frames")
    return {
        "41@12": index_clip(d / "a.mp4", 41, 12),
        "60@24": index_clip(d / "b.mp4", 60, 24),
        "12@4": index_clip(d / "c.mp4", 12, 4),
        "6@4": index_clip(d / "d.mp4", 6, 4),
        "10@8": index_clip(d / "e.mp4", 10, 8),
        "20@8": index_clip(d / "f.mp4", 20, 8),
        "120@24": index_clip(d / "g.mp4", 120, 24),
        "120@24 gop 10": index_clip(d / "h.mp4", 120, 24, keyframe_every=10),
    }


def test_uniform_head_random(clips: dict[str, Path]) -> None:
    path = clips["41@12"]
    assert indices(load(path, 9)) == [5 * i for i in range(9)]  # 40 gaps / 8 = every 5th frame, 0 and 40 included
    assert indices(load(path, 9, "head")) == list(range(9))
    starts = set()
    for seed in range(6):
        got = indices(load(path, 9, "random", seed=seed))
        assert got == list(range(got[0], got[0] + 9)) and 0 <= got[0] <= 41 - 9  # contiguous, inside the clip
        assert indices(load(path, 9, "random", seed=seed)) == got  # seeded
        starts.add(got[0])
    assert len(starts) > 1


def test_fps_mode_subsamples_and_windows(clips: dict[str, Path]) -> None:
    path = clips["60@24"]
    # 24 fps -> 8 fps keeps every 3rd frame: 0, 3, ..., 57 (20 frames); 17 of them centred start at the 2nd one
    assert indices(load(path, 17, "fps", target_fps=8)) == [3 * (k + 1) for k in range(17)]
    rng_starts = set()
    for seed in range(5):
        got = indices(load(path, 17, "fps", target_fps=8, window="random", seed=seed))
        assert got == [got[0] + 3 * k for k in range(17)] and got[0] % 3 == 0 and got[-1] <= 59
        rng_starts.add(got[0])
    assert len(rng_starts) > 1
    # 24 fps -> 12 fps: every 2nd frame, 30 resampled; 25 doesn't fit in 20 at 8 fps (needs 25 * 3 source frames)
    assert indices(load(path, 25, "fps", target_fps=12)) == [2 * (k + 2) for k in range(25)]
    plan = plan_frames(60, 24, 25, "fps", target_fps=8)
    assert not plan.ok and plan.reason.startswith("too-short:") and "3.12s" in plan.reason


def test_slow_clip_needs_a_policy_and_slow_repeats(clips: dict[str, Path]) -> None:
    path = clips["12@4"]  # 4 fps, 3 s
    with pytest.raises(CogtuneError, match=r"4 fps, below the target 8 fps"):
        load(path, 9, "fps", target_fps=8)
    got = indices(load(path, 9, "fps", target_fps=8, short="slow"))
    # at 8 fps each 4 fps frame is shown twice: consecutive frames, each (but maybe the ends) repeated
    distinct = sorted(set(got))
    assert got == sorted(got) and distinct == list(range(distinct[0], distinct[-1] + 1))
    assert all(got.count(i) == 2 for i in distinct[1:-1]) and len(distinct) in (5, 6)
    # 6 frames at 4 fps last 1.5 s; 17 frames stretched over it show time k * 1.5 / 17, i.e. frame floor(k * 6 / 17)
    assert indices(load(clips["6@4"], 17, "fps", target_fps=8, short="slow")) == [k * 6 // 17 for k in range(17)]
    assert indices(load(clips["10@8"], 20, short="slow")) == [k // 2 for k in range(20)]  # 10 frames, each twice


def test_pad_last_loop_interpolate_smaller(clips: dict[str, Path]) -> None:
    path = clips["10@8"]
    with pytest.raises(CogtuneError, match="clip has 10 frames but 17 are needed"):
        load(path, 17)
    assert indices(load(path, 17, short="pad_last")) == list(range(10)) + [9] * 7
    assert indices(load(path, 17, "head", short="loop")) == [k % 10 for k in range(17)]
    # 19 frames over 10: output k sits at source position k / 2; odd k is halfway between two frames
    blended = levels(load(path, 19, short="interpolate"))
    assert np.allclose(blended, [k / 2 for k in range(19)], atol=0.1), blended
    plan = plan_frames(10, 8, 19, short="interpolate")
    assert plan.weights is not None and plan.weights[1] == pytest.approx(0.5) and plan.upper[1] == 1
    # 20 frames can't fill 33 but can fill 17: uniform 17 over 20 frames, first and last included, no repeats
    got = indices(load(clips["20@8"], 33, short="smaller", allowed=[49, 33, 17]))
    assert len(got) == 17 and got[0] == 0 and got[-1] == 19 and all(b > a for a, b in zip(got, got[1:]))
    plan = plan_frames(8, 8, 33, short="smaller", allowed=[33, 17])
    assert not plan.ok and "no allowed count (17, 33) fits" in plan.reason


def test_segment_seeks_and_span(clips: dict[str, Path]) -> None:
    path = clips["120@24"]
    # start 4 s, end 4.75 s at 24 fps: frames with 4 <= i / 24 < 4.75, i.e. 96..113 (decoding seeks to frame 96)
    assert indices(load(path, 9, "head", start=4.0, end=4.75)) == list(range(96, 105))
    assert indices(load(path, 18, start=4.0, end=4.75)) == list(range(96, 114))
    assert indices(load(path, 3, "head", start=1.0)) == [24, 25, 26]
    assert indices(read_frames(path, [119, 100, 70])) == [119, 100, 70]
    seeking = clips["120@24 gop 10"]  # keyframes every 10 frames: decoding starts at the one before frame 96
    assert indices(load(seeking, 9, "head", start=4.0, end=4.75)) == list(range(96, 105))
    assert indices(read_frames(seeking, [117, 65, 119])) == [117, 65, 119]
    assert plan_frames(120, 24, 9, "head", start=4.0, end=4.75).span == pytest.approx(9 / 18)
    assert plan_frames(41, 12, 9).span == 1.0
    assert plan_frames(60, 24, 17, "fps", target_fps=8).span == pytest.approx((51 - 3 + 1) / 60)
    assert plan_frames(10, 8, 17, short="loop").span == 1.0
    assert plan_frames(120, 24, 9, start=6.0).reason.startswith("bad-time:")
    with pytest.raises(CogtuneError, match="past the clip's end"):
        load(path, 9, start=6.0)


def test_allowed_counts_and_bad_settings() -> None:
    assert allowed_frame_counts(8, 6) == [9, 17, 25, 33, 41, 49]
    assert allowed_frame_counts(16, 10)[-1] == 161 and allowed_frame_counts(16, 10, min_n=0)[0] == 1
    with pytest.raises(CogtuneError, match="unknown frame sampling mode 'middle'"):
        plan_frames(30, 8, 9, "middle")
    with pytest.raises(CogtuneError, match="needs a target fps"):
        plan_frames(30, 8, 9, "fps")
    with pytest.raises(CogtuneError, match="needs the allowed frame counts"):
        plan_frames(30, 8, 9, short="smaller")
    with pytest.raises(CogtuneError, match="unknown short-clip policy"):
        VideoClips([], 9, 32, 32, short="stretch")


def test_rotation_metadata_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rot.mp4"
    img = np.zeros((32, 48, 3), np.uint8)
    img[:8, :8] = 255  # marker at the stored frame's top-left
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(8))
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.set_display_rotation(90)  # shown turned 90 degrees counter-clockwise
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    upright = read_frames(path, [0])[0]
    assert upright.shape == (48, 32, 3)  # portrait, as players show it
    assert upright[-8:, :8].mean() > 200 and upright[:8, :8].mean() < 50  # top-left went to bottom-left
    assert read_frames(path, [0], autorotate=False)[0].shape == (32, 48, 3)
    half = ((load_clip(path, 1, 24, 16, "head")[0].permute(1, 2, 0) + 1) * 127.5).numpy()  # resized while converted
    assert half.shape == (24, 16, 3) and half[-3:, :3].mean() > 200 and half[:4, :4].mean() < 50


def test_video_clips_epochs_and_problems(clips: dict[str, Path]) -> None:
    samples = [Sample(clips["41@12"], "a"), Sample(clips["6@4"], "b"),
               Sample(clips["41@12"], "c", "x.mp4", problems=("empty-caption: x",))]
    ds = VideoClips(samples, 9, SIZE, SIZE, mode="random", seed=3)
    first = indices(ds[0]["video"])
    assert indices(ds[0]["video"]) == first and ds[0]["span"] == pytest.approx(9 / 41)
    starts = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        starts.add(indices(ds[0]["video"])[0])
    assert len(starts) > 1  # a new window each epoch
    with pytest.raises(CogtuneError, match="clip has 6 frames but 9"):
        ds[1]
    with pytest.raises(CogtuneError, match=r"x\.mp4: empty-caption"):
        ds[2]
    looped = VideoClips(samples[:2], 17, SIZE, SIZE, mode="head", short="loop")
    assert indices(looped[1]["video"]) == [k % 6 for k in range(17)] and not math.isnan(looped[1]["span"])
