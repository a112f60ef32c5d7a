"""The training loop. It knows the model only through its ModelSpec.

Randomness: every micro-step draws its latents, noise and timesteps from a generator seeded by (seed, micro-step,
rank), and batch order is a pure function of (seed, epoch), so a run is reproducible from its config alone.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data.sources import load_dataset
from ..errors import CogtuneError
from ..models.cogvideox import CogVideoXSpec, resolve_variant
from .encode import collate, encode_samples
from .lora import add_lora, save_lora
from .metrics import MetricsLog

log = logging.getLogger("cogtune")
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HELDOUT_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclass
class TrainResult:
    steps: int
    clips: int
    skipped: list[str]
    lora_path: Path | None
    transformer: torch.nn.Module = field(repr=False)
    spec: object = field(repr=False)


def step_generator(seed: int, micro_step: int, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + micro_step * 4099 + rank)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch)).tolist()
    usable = (len(order) // (batch_size * world)) * batch_size * world or batch_size * world
    order = (order * math.ceil(usable / len(order)))[:usable]  # tiny datasets repeat rather than starve a rank
    batches = [order[i : i + batch_size] for i in range(0, usable, batch_size)]
    return batches[rank::world]


@torch.no_grad()
def heldout_loss(spec, transformer, items: list[dict], seed: int, weighting: str, device) -> float:
    """Loss on fixed clips, latents, noise and timesteps: comparable across steps and runs."""
    was_training = transformer.training
    transformer.eval()
    total = 0.0
    for i, item in enumerate(items):
        batch = collate([item], device)
        for t in HELDOUT_TIMESTEPS:
            gen = torch.Generator().manual_seed(seed + 1000 * i + t)
            total += spec.training_loss(transformer, batch, gen, torch.tensor([t]), weighting).item()
    transformer.train(was_training)
    return total / (len(items) * len(HELDOUT_TIMESTEPS))


def train(cfg: TrainConfig) -> TrainResult:
    variant = resolve_variant(cfg.model.path, cfg.model.variant)
    problem = variant.check_frames(cfg.data.frames)
    if problem:
        raise CogtuneError(f"data.frames={cfg.data.frames}: {problem}")
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps
    )
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise CogtuneError("mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU")
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    out = Path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    spec = CogVideoXSpec.load(cfg.model.path, cfg.model.variant)
    spec.check_size(cfg.data.frames, cfg.data.height, cfg.data.width)
    samples = load_dataset(cfg.data.root)
    items, skipped = encode_samples(spec, samples, cfg.data, show_progress=main)
    log.info("encoded %d clips, skipped %d", len(items), len(skipped))

    transformer = spec.transformer
    add_lora(transformer, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.dropout)
    spec.to(accelerator.device, WEIGHT_DTYPES[cfg.mixed_precision])
    params = [p for p in transformer.parameters() if p.requires_grad]
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor
    world = accelerator.num_processes
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler.name, optimizer, num_warmup_steps=cfg.lr_scheduler.warmup_steps * world,
        num_training_steps=cfg.max_steps * world,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    transformer.train()

    metrics = MetricsLog(out / "logs", enabled=main)
    heldout = items[: cfg.validation.heldout_clips]
    device, weighting = accelerator.device, cfg.loss.weighting

    def log_heldout(step: int) -> None:
        if cfg.validation.heldout_loss and main:
            metrics.log(step, heldout_loss=heldout_loss(spec, transformer, heldout, cfg.seed, weighting, device))

    log_heldout(0)
    bar = tqdm(total=cfg.max_steps, desc="training", disable=not main, dynamic_ncols=True)
    step, micro, epoch, t0 = 0, 0, 0, time.perf_counter()
    while step < cfg.max_steps:
        for indices in epoch_batches(len(items), cfg.batch_size, cfg.seed, epoch, accelerator.process_index, accelerator.num_processes):
            batch = collate([items[i] for i in indices], device)
            with accelerator.accumulate(model):
                gen = step_generator(cfg.seed, micro, accelerator.process_index)
                loss = spec.training_loss(model, batch, gen, weighting=weighting)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, o.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro += 1
            if not accelerator.sync_gradients:
                continue
            step += 1
            loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                metrics.log(step, loss=loss_value, lr=lr_scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                            elapsed_s=round(time.perf_counter() - t0, 3))
            if cfg.validation.every_steps and step % cfg.validation.every_steps == 0 and step < cfg.max_steps:
                log_heldout(step)
            if step >= cfg.max_steps:
                break
        epoch += 1
    bar.close()
    log_heldout(step)

    accelerator.wait_for_everyone()
    lora_path = None
    if main:
        info = {"variant": spec.variant_name, "base_model": str(Path(cfg.model.path).resolve()), "method": cfg.method,
                "frames": cfg.data.frames, "height": cfg.data.height, "width": cfg.data.width, "steps": step}
        lora_path = save_lora(accelerator.unwrap_model(model), out / "lora", info)
    metrics.close()
    accelerator.end_training()
    return TrainResult(step, len(items), skipped, lora_path, accelerator.unwrap_model(model), spec)
