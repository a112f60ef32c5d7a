"""A torch Dataset of decoded clips. Knows no model."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cogtune.data.sources import Sample
from cogtune.data.video import load_clip


class VideoClips(Dataset):
    """Item i: {"video": float32 [F, 3, H, W] in [-1, 1], "caption": str, "index": i, "path": as listed}.

    With `seed` set, frame sampling and crops are the same for an index every time (seed, index);
    without it, "random" modes draw fresh each time.
    """

    def __init__(self, samples: Sequence[Sample], frames: int, height: int, width: int, mode: str = "uniform",
                 crop: str = "center", seed: int | None = None) -> None:
        self.samples = list(samples)
        self.frames, self.height, self.width = frames, height, width
        self.mode, self.crop, self.seed = mode, crop, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        seed = None if self.seed is None else int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
        video: torch.Tensor = load_clip(s.video, self.frames, self.height, self.width, self.mode, self.crop, seed)
        return {"video": video, "caption": s.caption, "index": index, "path": s.listed or str(s.video)}
