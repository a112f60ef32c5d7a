"""From a dataset folder to cached, bucketed training items, through the model spec's encoders.

Every clip is probed, given its bucket (resolution + frame count) and frame plan, then encoded once into the latent
cache. Clips with problems (missing, corrupt, uncaptioned, too short under the policy) are skipped with their
reason logged: a bad file never stops a run hours in.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..data.buckets import assign_bucket, resolutions_for_area
from ..data.cache import CacheItem, LatentCache, fingerprint_files
from ..data.captions import tag_orders, with_trigger
from ..data.frames import FramePlan, plan_bucketed
from ..data.sources import Sample, load_dataset, problem_text, without_images
from ..data.video import decode_plan, load_image, probe
from ..config import fill_native_shape
from ..errors import CogtuneError

log = logging.getLogger("cogtune")
CACHE_VERSION = 1  # bump when the meaning of cached tensors changes


@dataclass
class PreparedData:
    dataset: "CachedItems"
    buckets: list[tuple[int, int, int]]  # (height, width, frames) of each item
    skipped: list[str] = field(default_factory=list)  # "path: reason"
    report: object = None
    names: list[str] = field(default_factory=list)  # each item's dataset


class CachedItems:
    """Training items read from the cache; video entry keys are resolved once (no stat of the source per read).
    Entries read once stay in RAM while they fit in `ram_bytes` (CogVideoX at 49x480x720 in bf16: latents ~2 MB
    and text embeddings ~1.9 MB a clip), so small datasets are read from disk only in their first epoch. The tensors returned are
    the kept ones: collate copies them; do not change them in place."""

    def __init__(self, cache: LatentCache, items: list[CacheItem], listed: list[str], ram_bytes: float = 0):
        self.cache, self.items, self.listed = cache, items, listed
        self.empty_prompt: dict[str, torch.Tensor] | None = None  # the "" caption's encodings (caption dropout)
        self.tag_orders: list[list[str]] = [[] for _ in items]  # each item's captions with shuffled tags, encoded
        self.keys = [cache.video_key(item) for item in items]
        self.ram_left = ram_bytes
        self._videos: dict[int, dict] = {}
        self._prompts: dict[str, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def all_in_ram(self) -> bool:
        return len(self._videos) == len(self.items)

    def _keep(self, tensors) -> bool:
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > self.ram_left:
            return False
        self.ram_left -= size
        return True

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        video = self._videos.get(i)
        if video is None:
            video = self.cache.load_video_key(self.keys[i], self.listed[i])
            if self._keep(video.values()):
                self._videos[i] = video
        return dict(video) | self.prompt(item.caption) | {"caption": item.caption, "path": self.listed[i], "index": i}

    def prompt(self, caption: str) -> dict[str, torch.Tensor]:
        """A cached caption's text encodings (kept in RAM like the clips)."""
        prompt = self._prompts.get(caption)
        if prompt is None:
            prompt = self.cache.prompt(caption)
            if self._keep(prompt.values()):
                self._prompts[caption] = prompt
        return prompt


def collate(items: list[dict], device: torch.device) -> dict:
    batch = {k: torch.stack([it[k] for it in items]).to(device) for k, v in items[0].items() if isinstance(v, torch.Tensor)}
    batch["paths"] = [it["path"] for it in items]
    batch["items"] = [it.get("index") for it in items]
    return batch


def _frame_options(cfg, facts) -> tuple[list[int], list[tuple[int, int]]]:
    d = cfg.data
    b = d.buckets
    key = "data.buckets.frames" if b and b.frames else f"data.frames={d.frames}"
    frames = sorted(set(b.frames if b and b.frames else [d.frames]), reverse=True)
    for f in frames:
        problem = facts.check_frames(f)
        if problem:
            raise CogtuneError(f"{key}: {problem}")
    if b and b.resolutions:
        resolutions = [tuple(r) for r in b.resolutions]
    elif b and b.area:
        resolutions = resolutions_for_area(b.area, b.aspect_ratios or ["1:1"], multiple=facts.size_multiple)
    else:
        resolutions = [(d.height, d.width)]
    return frames, resolutions


def plan_sample(sample: Sample, cfg, facts, frames: list[int], resolutions, rng=None):
    """→ ((height, width, frames), plan) or (None, reason). A still image is a one-frame clip in a bucket of its
    own size (its frames are not the configured ones: the model's still-image rule decides, `check_still`)."""
    d = cfg.data
    if sample.is_image and (why := facts.check_still()):
        return None, f"no-stills: {why}; train it on videos or remove the image"
    info = probe(sample.video)
    if len(resolutions) > 1 or (d.buckets and not d.buckets.allow_upscale):
        bucket, why = assign_bucket(info.height, info.width, 10**9, resolutions, [1],
                                    allow_upscale=bool(d.buckets and d.buckets.allow_upscale))
        if bucket is None:
            return None, why
        hw = (bucket.height, bucket.width)
    else:
        hw = resolutions[0]
    if sample.is_image:
        return (*hw, 1), FramePlan((0,), span=1.0)
    target_fps = (d.target_fps or facts.fps) if d.sampling == "fps" else None
    kwargs = dict(start=sample.start, end=sample.end, target_fps=target_fps, window=d.window, rng=rng)
    allowed = frames if len(frames) > 1 else [f for f in facts.allowed_frames() if f <= frames[0]]
    plan = plan_bucketed(info.frames, info.fps, frames, d.sampling, short=d.short_clips, allowed=allowed, **kwargs)
    if not plan.ok:
        return None, plan.reason
    return (*hw, plan.frames), plan


def frame_recipe(d, native_fps: float, image: bool, seed: int) -> dict:
    """What makes a clip's frames beside its bucket, from its dataset's settings (data.* or its data.datasets
    entry). Where it differs from data.*'s (in the video fingerprint) it is in the clip's cache key: changing a
    dataset's own setting re-encodes only that dataset's clips, and a cache made before per-dataset settings
    existed stays valid."""
    recipe = {"crop": d.crop}
    if not image:  # an image is one frame: frame sampling does not apply to it
        recipe |= {"sampling": d.sampling, "short_clips": d.short_clips}
        if d.sampling == "fps":
            recipe |= {"target_fps": d.target_fps or native_fps, "window": d.window}
    if "random" in recipe.values():  # the seed only picks random windows and crops
        recipe["seed"] = seed
    return recipe


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


@dataclass
class PlannedData:
    """Every usable clip with its bucket and frame plan, before anything is encoded."""
    items: list[CacheItem]
    listed: list[str]  # each item's path as the dataset lists it
    plans: dict[int, tuple]  # id(item) -> (FramePlan, its number among the usable clips: its random streams)
    skipped: list[str]
    samples: int  # listed in all
    dataset: list[str] = field(default_factory=list)  # each item's dataset name
    tag_orders: list[list[str]] = field(default_factory=list)  # each item's captions with shuffled tags
    recipes: list[dict] = field(default_factory=list)  # each item's frame_recipe


def plan_data(facts, cfg, check_size=None) -> PlannedData:
    """The one planning path of training, `data cache` and `data preview`: frame selection, bucket and caption of
    every clip of every dataset, with the random windows and crops drawn from (seed, clip)."""
    fill_native_shape(cfg, facts)  # frames/height/width left unset: the model's native shape
    out = PlannedData([], [], {}, [], 0)
    offset = 0  # clips are numbered across datasets: the first dataset's numbers are those of a single data.root
    base = _shared_recipe(cfg.data, facts.fps, cfg.seed)
    for name, d, _ in cfg.data.entries():
        sub = cfg.model_copy(update={"data": d})
        frames, resolutions = _frame_options(sub, facts)
        for h, w in resolutions if check_size is not None else ():
            check_size(frames[0], h, w)
        samples = load_dataset(d.root, strict=False)
        if not facts.i2v:  # an optional image list (images.txt, an image column) is for I2V models only
            samples = [without_images(s) for s in samples]
        out.skipped += [f"{s.listed or s.video}: {problem_text(s.problems[0])}" for s in samples if s.problems]
        usable = [s for s in samples if not s.problems]

        def plan(i_s, sub=sub, frames=frames, resolutions=resolutions):
            i, s = i_s
            try:
                return plan_sample(s, sub, facts, frames, resolutions, _rng(cfg.seed, i))
            except CogtuneError as e:
                return None, str(e)

        with ThreadPoolExecutor(max(1, d.num_workers)) as pool:
            planned = list(pool.map(plan, enumerate(usable, start=offset)))
        for i, (s, (bucket, why)) in enumerate(zip(usable, planned), start=offset):
            listed = s.listed or str(s.video)
            if bucket is None:
                out.skipped.append(f"{listed}: {problem_text(why) if why else 'unusable'}")
                continue
            h, w, f = bucket
            image = str(s.image) if facts.i2v and s.image is not None else None  # else: the first frame conditions
            recipe = frame_recipe(d, facts.fps, s.is_image, cfg.seed)
            settings = {"frames": f, "height": h, "width": w} | {k: v for k, v in recipe.items() if base.get(k) != v}
            item = CacheItem(str(s.video), with_trigger(s.caption, d.trigger), settings, s.start, s.end, image)
            out.plans[id(item)] = (why, i)
            out.items.append(item)
            out.listed.append(listed)
            out.recipes.append(recipe)
            out.dataset.append(name)
            out.tag_orders.append(tag_orders(s.caption, d.trigger, d.tag_variants, d.keep_tokens,
                                             f"tags-{cfg.seed}-{i}") if d.shuffle_tags else [])
        offset += len(usable)
        out.samples += len(samples)
    if not out.items:
        where = cfg.data.root or ", ".join(str(e.root) for e in cfg.data.datasets)
        raise CogtuneError(f"no usable clips in {where}: all {out.samples} were skipped (first: "
                           f"{out.skipped[0] if out.skipped else 'none listed'}); run `cogtune data check {where}`")
    return out


def load_planned(planned: PlannedData, item: CacheItem, cfg) -> torch.Tensor | dict:
    """The pixels training encodes for `item`: its planned frames resized and cropped, and its image if listed."""
    plan, index = planned.plans[id(item)]
    st = item.settings
    crop = st.get("crop", cfg.data.crop)  # its dataset's own crop, else data.crop
    video = decode_plan(item.video, plan, st["height"], st["width"], crop, _rng(cfg.seed + 1, index))
    if item.image is None:
        return video
    image = load_image(item.image, st["height"], st["width"], crop, _rng(cfg.seed + 2, index))
    return {"video": video, "images": image}


def prepare_data(spec, cfg, accelerator=None, progress: bool = True, on_planned=None) -> PreparedData:
    """Plan every clip (frames, bucket), then encode what the cache lacks. `on_planned(buckets, skipped, dataset
    names)` hears the plan before any clip is encoded."""
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    d = cfg.data
    planned = plan_data(spec.facts, cfg, spec.check_size)
    items, listed, skipped = planned.items, planned.listed, planned.skipped
    load_video = partial(load_planned, planned, cfg=cfg)
    if on_planned is not None:
        on_planned([(it.settings["height"], it.settings["width"], it.settings["frames"]) for it in items], skipped,
                   planned.dataset)
    cache = LatentCache(cache_root(cfg), video_fingerprint(spec, cfg), text_fingerprint(spec))
    report = cache.build(items, load_video, spec.encode_videos, spec.encode_prompts, rank=rank, world_size=world,
                         progress=progress and rank == 0)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    check = cache.check(items)
    for i, why in check.problems.items():
        skipped.append(f"{listed[i]}: {why}")
    if check.problems and on_planned is not None and rank == 0:
        log.warning("%d of the %d planned clips could not be encoded and are skipped (see above)",
                    len(check.problems), len(items))
    ready = check.ready
    for line in skipped:
        log.warning("skipping %s", line)
    if not ready:
        raise CogtuneError(f"no clip could be encoded (first problem: {skipped[0] if skipped else 'unknown'})")
    dataset = CachedItems(cache, [items[i] for i in ready], [listed[i] for i in ready], d.ram_cache_gb * 2**30)
    # the empty caption (caption dropout) and every shuffled-tag caption, encoded once like the others
    extra = ([""] if d.caption_dropout else []) + [c for i in ready for c in planned.tag_orders[i]]
    if extra:
        more = cache.build_prompts(extra, spec.encode_prompts, rank, world, progress=progress and rank == 0)
        report = report.merge(more)
        if accelerator is not None:
            accelerator.wait_for_everyone()
    if d.caption_dropout:
        dataset.empty_prompt = cache.prompt("")
    dataset.tag_orders = [[c for c in planned.tag_orders[i] if cache.has_prompt(c)] for i in ready]
    lost = sum(len(planned.tag_orders[i]) for i in ready) - sum(map(len, dataset.tag_orders))
    if lost:
        log.warning("%d shuffled-tag captions could not be encoded; their clips train on the others", lost)
    buckets = [(items[i].settings["height"], items[i].settings["width"], items[i].settings["frames"]) for i in ready]
    return PreparedData(dataset, buckets, skipped, report, [planned.dataset[i] for i in ready])


def cache_root(cfg) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    root = cfg.data.first_root
    folder = root if root.is_dir() else root.parent
    if os.access(folder, os.W_OK):
        return folder / ".cogtune_cache"
    return Path(cfg.output_dir) / "cache"


def _shared_recipe(d, native_fps: float, seed: int) -> dict:
    """data.*'s frame settings as the video fingerprint holds them (a clip's key adds where its own differ)."""
    return {"sampling": d.sampling, "target_fps": d.target_fps or native_fps, "window": d.window,
            "short_clips": d.short_clips, "crop": d.crop,
            # the seed only picks random windows and crops
            "seed": seed if "random" in (d.sampling, d.window, d.crop) else None}


def video_fingerprint(spec, cfg) -> dict:
    return {"v": CACHE_VERSION, "variant": spec.variant_name, "vae": fingerprint_files([Path(spec.model_path) / "vae"]),
            **_shared_recipe(cfg.data, spec.facts.fps, cfg.seed), "i2v": spec.facts.i2v,
            "tiling": cfg.memory.vae_tiling} | _dtype_key(spec)


def text_fingerprint(spec) -> dict:
    path = Path(spec.model_path)
    return {"v": CACHE_VERSION, "text_encoder": fingerprint_files([path / "text_encoder", path / "tokenizer"])
            } | spec.text_fingerprint() | _dtype_key(spec)


def _dtype_key(spec) -> dict:
    """Encoders in another dtype give other tensors; fp32 (the first dtype) adds no key, so older caches stay valid."""
    dtype = spec.encoder_dtype
    return {} if dtype == torch.float32 else {"encoder_dtype": str(dtype).removeprefix("torch.")}
