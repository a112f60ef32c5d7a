"""A torch Dataset of decoded clips. Knows no model."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cogtune.data.frames import plan_frames
from cogtune.data.sources import Sample
from cogtune.data.video import decode_plan, probe
from cogtune.errors import CogtuneError


class VideoClips(Dataset):
    """Item i: {"video": float32 [F, 3, H, W] in [-1, 1], "caption": str, "index": i, "path": as listed,
    "span": share of the clip (or its start/end segment) the frames cover}.

    Frame selection follows `cogtune.data.frames.plan_frames` (mode, target_fps, short, allowed, window).
    With `seed` set, the random window and crop depend only on (seed, epoch, index): the same every time for an
    epoch, different across epochs (`set_epoch`). Without it, "random" modes draw fresh each time.
    A sample with problems, or a clip the plan can't use, raises CogtuneError naming the file and the reason.
    """

    def __init__(self, samples: Sequence[Sample], frames: int, height: int, width: int, mode: str = "uniform",
                 crop: str = "center", seed: int | None = None, *, target_fps: float | None = None,
                 short: str = "skip", allowed: Sequence[int] | None = None, window: str = "center",
                 epoch: int = 0) -> None:
        self.samples = list(samples)
        self.frames, self.height, self.width = frames, height, width
        self.mode, self.crop, self.seed = mode, crop, seed
        self.target_fps, self.short, self.window = target_fps, short, window
        self.allowed = list(allowed) if allowed else None
        self.epoch = epoch
        plan_frames(frames, target_fps or 1.0, frames, mode, target_fps=target_fps, short=short,
                    allowed=self.allowed, window=window)  # bad settings fail here, not on the first item

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def rng(self, index: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        # epoch 0 keeps the (seed, index) stream of the first release, so its seeded crops stay the same
        key = [self.seed, index] if self.epoch == 0 else [self.seed, self.epoch, index]
        return np.random.default_rng(int(np.random.SeedSequence(key).generate_state(1)[0]))

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        name = s.listed or str(s.video)
        if s.problems:
            raise CogtuneError(f"{name}: {s.problems[0]}")
        rng = self.rng(index)
        info = probe(s.video)
        plan = plan_frames(info.frames, info.fps, self.frames, self.mode, start=s.start, end=s.end,
                           target_fps=self.target_fps, short=self.short, allowed=self.allowed, window=self.window,
                           rng=rng)
        video: torch.Tensor = decode_plan(s.video, plan, self.height, self.width, self.crop, rng)
        return {"video": video, "caption": s.caption, "index": index, "path": name, "span": plan.span}
