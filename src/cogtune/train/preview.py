"""`cogtune data preview`: exactly what training will encode, for a look before hours of caching.

For each chosen clip: `<name>.mp4` holding the frames training encodes (frame selection, fps resampling, resize and
crop, in the clip's bucket), `<name>.png` a contact sheet of them, and one `index.json` listing per clip its source,
bucket [frames, height, width], its dataset, how its frames were chosen (`frames_from`: sampling, fps, crop of its
dataset), the source frame of every output frame (a blend of two where frames are interpolated), the caption as it
will be encoded (and its shuffled-tag versions), and its kind ("video", or "image": a still image, one frame).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..config import TrainConfig
from ..data.sources import is_image
from ..data.video import to_uint8_frames, write_mp4
from ..errors import CogtuneError
from ..files import write_text_atomic
from ..infer.validate import contact_sheet
from ..models import resolve_variant
from .encode import load_planned, plan_data


def _frames_of(plan) -> list:
    if not plan.weights:
        return list(plan.indices)
    return [i if not w else {"from": i, "to": j, "weight": round(w, 6)}
            for i, j, w in zip(plan.indices, plan.upper, plan.weights)]


def _name(n: int, listed: str, start, end) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(listed).stem)[:60] or "clip"
    seg = f"_{start or 0:g}-{end:g}s" if end is not None else (f"_{start:g}s-" if start else "")
    return f"{n:04d}_{stem}{seg}"


def write_preview(cfg: TrainConfig, out: str | Path, clips: int | None = 8) -> Path:
    """The first `clips` clips of each dataset. Writes into `out` (created; an existing index.json there is
    replaced) and returns the index path."""
    facts = resolve_variant(cfg.model.path, cfg.model.variant, weights=False,
                            drop_positions=cfg.model.drop_learned_positions)
    planned = plan_data(facts, cfg, lambda f, h, w: _refuse(facts.check_size(f, h, w)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries, shown = [], {}
    for n, (item, listed, dataset) in enumerate(zip(planned.items, planned.listed, planned.dataset)):
        shown[dataset] = shown.get(dataset, 0) + 1
        if clips is not None and shown[dataset] > clips:  # the first clips of every dataset
            continue
        plan, _ = planned.plans[id(item)]
        pixels = load_planned(planned, item, cfg)
        video = pixels["video"] if isinstance(pixels, dict) else pixels
        name = _name(n, listed, item.start, item.end)
        st = item.settings
        recipe = planned.recipes[n]
        fps = recipe.get("target_fps", facts.fps)  # its dataset's fps sampling, else the model's rate
        write_mp4(video, out / f"{name}.mp4", fps)
        contact_sheet([to_uint8_frames(video)], [name], out / f"{name}.png")
        entries.append({"name": name, "dataset": dataset, "source": item.video, "listed": listed,
                        "start": item.start, "end": item.end, "bucket": [st["frames"], st["height"], st["width"]],
                        "source_frames": _frames_of(plan), "caption": item.caption,
                        "tag_orders": planned.tag_orders[n], "image": item.image, "fps": fps,
                        "frames_from": recipe,
                        "kind": "image" if is_image(item.video) else "video"})
    index = {"variant": facts.name, "clips_planned": len(planned.items), "skipped": planned.skipped,
             "clips": entries}
    return write_text_atomic(out / "index.json", json.dumps(index, indent=1, ensure_ascii=False) + "\n")


def _refuse(problem: str | None) -> None:
    if problem:
        raise CogtuneError(problem)
