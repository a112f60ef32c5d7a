"""Frames per second of cogtune's clip loader vs the official CogVideoX trainer's way of loading.

    python benchmarks/video_loader.py [--clips 8] [--repeats 3] [--frames 49] [--height 480] [--width 720]

Clips: 480x720 H.264 (yuv420p, 49-97 frames, moving shapes over texture), written with PyAV to a temp folder.
Both loaders end with the same thing: float32 [F, 3, H, W] in [-1, 1].

- baseline: what CogVideo's finetune/datasets/utils.py does: decord.VideoReader(uri, width, height) (the decoder
  scales every frame to the output size, stretching), indices range(0, n, n // F) from frame 0, get_batch, first F.
  Without decord (pip install decord) it falls back to PyAV decoding all frames, then the same indices and a
  stretch resize; the output says which one ran.
- cogtune, same frames: cogtune.data.video.decode_plan with the baseline's indices (decode up to the last needed
  frame, convert only those, cover-resize + centre crop). Its ratio is the `loader_speedup` on the last line.
- cogtune default: load_clip(..., mode="uniform"), frames spread over the whole clip (more decoding for long
  clips, shown for information).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from cogtune.data.frames import FramePlan
from cogtune.data.video import decode_plan, load_clip, probe, write_mp4


def make_clips(folder: Path, count: int, height: int, width: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)  # fine detail, so decoding is not trivial
    yy, xx = np.mgrid[0:height, 0:width]
    paths = []
    for i in range(count):
        n = int(rng.integers(49, 98))
        frames = np.empty((n, height, width, 3), np.uint8)
        colour = rng.integers(60, 256, 3)
        for t in range(n):
            frames[t] = np.roll(texture, 3 * t, axis=1) + np.uint8(100 + 50 * np.sin(t / 9 + i))
            cy, cx = height / 2 + height / 3 * np.sin(t / 11), (t * 9 + 80 * i) % width
            frames[t][(yy - cy) ** 2 + (xx - cx) ** 2 < (height / 8) ** 2] = colour
        paths.append(write_mp4(frames, folder / f"clip_{i}.mp4", fps=int(rng.choice([8, 16, 24])), crf=23))
    return paths


def official_indices(total: int, frames: int) -> list[int]:
    return list(range(0, total, total // frames))[:frames]


def baseline_decord(path: Path, frames: int, height: int, width: int) -> torch.Tensor:
    import decord

    reader = decord.VideoReader(uri=str(path), width=width, height=height)
    batch = reader.get_batch(official_indices(len(reader), frames)).asnumpy()
    x = torch.from_numpy(batch).float().permute(0, 3, 1, 2).contiguous()
    return x / 127.5 - 1.0


def baseline_pyav(path: Path, frames: int, height: int, width: int) -> torch.Tensor:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        every = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    x = torch.from_numpy(np.stack([every[i] for i in official_indices(len(every), frames)])).float()
    x = x.permute(0, 3, 1, 2)
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return x.contiguous() / 127.5 - 1.0


def cogtune_same_frames(path: Path, frames: int, height: int, width: int) -> torch.Tensor:
    plan = FramePlan(tuple(official_indices(probe(path).frames, frames)), span=1.0)
    return decode_plan(path, plan, height, width)


def cogtune_uniform(path: Path, frames: int, height: int, width: int) -> torch.Tensor:
    return load_clip(path, frames, height, width, "uniform")


def measure(loaders: list, clips: list[Path], frames: int, height: int, width: int,
            repeats: int) -> list[list[float]]:
    """Frames per second of each loader, one figure per pass. Loaders take turns clip by clip (order rotating),
    so a busy shared machine slows them alike and the ratios stay meaningful."""
    for fn in loaders:
        fn(clips[0], frames, height, width)  # warm up (imports, codec setup)
    rates: list[list[float]] = [[] for _ in loaders]
    for r in range(repeats):
        spent = [0.0] * len(loaders)
        for c, path in enumerate(clips):
            for j in np.roll(np.arange(len(loaders)), r + c):
                start = time.perf_counter()
                out = loaders[j](path, frames, height, width)
                spent[j] += time.perf_counter() - start
                assert out.shape == (frames, 3, height, width), out.shape
        for j in range(len(loaders)):
            rates[j].append(frames * len(clips) / spent[j])
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=720)
    args = ap.parse_args()
    try:
        import decord  # noqa: F401

        baseline, name = baseline_decord, f"decord {decord.__version__} VideoReader(uri, width, height)"
    except ImportError:
        baseline, name = baseline_pyav, "PyAV, all frames decoded (decord is not installed: pip install decord)"
    with tempfile.TemporaryDirectory() as tmp:
        clips = make_clips(Path(tmp), args.clips, 480, 720)
        lengths = [probe(p).frames for p in clips]
        print(f"{len(clips)} clips 480x720, {min(lengths)}-{max(lengths)} frames; output {args.frames}x"
              f"{args.height}x{args.width} float32; median of {args.repeats} passes; torch threads "
              f"{torch.get_num_threads()}")
        size = (args.frames, args.height, args.width)
        base, same, uniform = measure([baseline, cogtune_same_frames, cogtune_uniform], clips, *size, args.repeats)
    ratios = [s / b for s, b in zip(same, base)]
    med = statistics.median
    print(f"baseline ({name}): {med(base):.1f} frames/s")
    print(f"cogtune, the baseline's frames: {med(same):.1f} frames/s (per-pass ratios "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")
    print(f"cogtune, uniform over the whole clip (default): {med(uniform):.1f} frames/s "
          f"({med(u / b for u, b in zip(uniform, base)):.2f}x)")
    print(f"loader_speedup={med(ratios):.2f}")


if __name__ == "__main__":
    main()
