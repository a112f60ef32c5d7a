"""Encode every clip and caption once before training, through the model spec.

Clips that cannot be read are skipped with their reason logged: a bad file never stops a run hours in.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from ..data.dataset import VideoClips
from ..data.sources import Sample
from ..errors import CogtuneError

log = logging.getLogger("cogtune")


def encode_samples(spec, samples: list[Sample], data_cfg, show_progress: bool = True) -> tuple[list[dict], list[str]]:
    """→ (items, skipped): items hold CPU tensors without a batch dimension plus `caption` and `path`."""
    clips = VideoClips(samples, data_cfg.frames, data_cfg.height, data_cfg.width, mode=data_cfg.sampling, crop=data_cfg.crop)
    prompt_cache: dict[str, torch.Tensor] = {}
    items, skipped = [], []
    for i in tqdm(range(len(clips)), desc="encoding clips", disable=not show_progress, leave=False):
        try:
            clip = clips[i]
        except (CogtuneError, OSError, ValueError, RuntimeError) as e:
            reason = str(e).splitlines()[0] if str(e) else e.__class__.__name__
            skipped.append(f"{samples[i].listed}: {reason}")
            log.warning("skipping %s: %s", samples[i].listed, reason)
            continue
        caption = clip["caption"]
        if caption not in prompt_cache:
            prompt_cache[caption] = spec.encode_prompts([caption])[0].cpu()
        tensors = spec.encode_videos(clip["video"].unsqueeze(0))
        item = {k: v[0].cpu() for k, v in tensors.items()}
        item |= {"prompt_embeds": prompt_cache[caption], "caption": caption, "path": clip["path"]}
        items.append(item)
    if not items:
        raise CogtuneError(f"no usable clips: all {len(samples)} were skipped (first reason: {skipped[0] if skipped else 'none'})")
    return items, skipped


def collate(items: list[dict], device: torch.device) -> dict:
    batch = {k: torch.stack([it[k] for it in items]).to(device) for k, v in items[0].items() if isinstance(v, torch.Tensor)}
    batch["paths"] = [it["path"] for it in items]
    return batch
