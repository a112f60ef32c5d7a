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
from .metrics import MetricsLog
from .outputs import save_outputs

log = logging.getLogger("cogtune")
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HELDOUT_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclass
class TrainResult:
    steps: int
    clips: int
    skipped: list[str]
    outputs: dict[str, Path]
    transformer: torch.nn.Module = field(repr=False)
    spec: object = field(repr=False)

    @property
    def lora_path(self) -> Path | None:
        return self.outputs.get("lora")


def sample_generators(seed: int, step: int, first_position: int, count: int) -> list[torch.Generator]:
    """One generator per sample, keyed by (seed, optimizer step, position in the global batch): the same sample gets
    the same latents, timestep and noise whatever the number of processes or accumulation steps."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + step * 8191 + first_position + i) for i in range(count)]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * epoch)).tolist()
    usable = (len(order) // (batch_size * world)) * batch_size * world or batch_size * world
    order = (order * math.ceil(usable / len(order)))[:usable]  # tiny datasets repeat rather than starve a rank
    batches = [order[i : i + batch_size] for i in range(0, usable, batch_size)]
    return batches[rank::world]


@torch.no_grad()
def heldout_loss(spec, transformer, items: list[dict], seed: int, loss_cfg, device) -> float:
    """Loss on fixed clips, latents, noise and timesteps: comparable across steps and runs."""
    was_training = transformer.training
    transformer.eval()
    total = 0.0
    for i, item in enumerate(items):
        batch = collate([item], device)
        for t in HELDOUT_TIMESTEPS:
            gens = [torch.Generator().manual_seed(seed + 1000 * i + t)]
            total += spec.training_loss(transformer, batch, gens, torch.tensor([t]), loss_cfg).item()
    transformer.train(was_training)
    return total / (len(items) * len(HELDOUT_TIMESTEPS))


def prepare_model(spec, cfg: TrainConfig, device) -> list[torch.nn.Parameter]:
    """Make the trainable parameters (LoRA adapters or the whole transformer) and apply the memory switches."""
    transformer = spec.transformer
    if cfg.method == "lora":
        from .lora import add_lora

        add_lora(transformer, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.dropout)
    else:
        transformer.requires_grad_(True)
    spec.to(device, WEIGHT_DTYPES[cfg.mixed_precision])
    if cfg.memory.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if cfg.memory.offload_encoders:
        spec.offload_encoders(keep_vae=spec.variant.i2v and cfg.i2v.image_noise)
    return [p for p in transformer.parameters() if p.requires_grad]


def make_validator(spec, cfg: TrainConfig):
    v = cfg.validation
    if not v.prompts:
        return None
    if spec.variant.i2v and len(v.images) != len(v.prompts):
        raise CogtuneError(f"validation.images: {spec.variant_name} needs one image per prompt "
                           f"({len(v.prompts)} prompts, {len(v.images)} images)")
    for path in v.images:
        if not Path(path).is_file():
            raise CogtuneError(f"validation.images: {path} does not exist")
    from ..infer.validate import Validator

    return Validator(spec, v, v.frames or cfg.data.frames, v.height or cfg.data.height, v.width or cfg.data.width,
                     spec.variant.fps)


def train(cfg: TrainConfig) -> TrainResult:
    variant = resolve_variant(cfg.model.path, cfg.model.variant)
    problem = variant.check_frames(cfg.data.frames)
    if problem:
        raise CogtuneError(f"data.frames={cfg.data.frames}: {problem}")
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise CogtuneError("mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU")
    set_seed(cfg.seed)
    main, device, world = accelerator.is_main_process, accelerator.device, accelerator.num_processes
    out = Path(cfg.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    spec = CogVideoXSpec.load(cfg.model.path, cfg.model.variant)
    spec.check_size(cfg.data.frames, cfg.data.height, cfg.data.width)
    spec.set_vae_memory(slicing=cfg.memory.vae_slicing, tiling=cfg.memory.vae_tiling)
    spec.encoders_to(device)
    items, skipped = encode_samples(spec, load_dataset(cfg.data.root), cfg.data, show_progress=main)
    validator = make_validator(spec, cfg)
    log.info("encoded %d clips, skipped %d", len(items), len(skipped))

    params = prepare_model(spec, cfg, device)
    transformer = spec.transformer
    o = cfg.optimizer
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor
    lr_scheduler = get_scheduler(cfg.lr_scheduler.name, optimizer, num_warmup_steps=cfg.lr_scheduler.warmup_steps * world,
                                 num_training_steps=cfg.max_steps * world)
    model, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    transformer.train()

    metrics = MetricsLog(out / "logs", enabled=main)
    heldout = items[: cfg.validation.heldout_clips]

    def validate(step: int) -> None:
        if cfg.validation.heldout_loss and main:
            metrics.log(step, heldout_loss=heldout_loss(spec, transformer, heldout, cfg.seed, cfg.loss, device))
        if validator is not None and main and step > 0:
            validator(transformer, out / "validation" / f"step-{step}", device, accelerator.autocast, metrics.tensorboard, step)

    validate(0)
    bar = tqdm(total=cfg.max_steps, desc="training", disable=not main, dynamic_ncols=True)
    step, micro, epoch, t0 = 0, 0, 0, time.perf_counter()
    while step < cfg.max_steps:
        for indices in epoch_batches(len(items), cfg.batch_size, cfg.seed, epoch, accelerator.process_index, world):
            batch = collate([items[i] for i in indices], device)
            with accelerator.accumulate(model):
                position = ((micro % cfg.gradient_accumulation_steps) * world + accelerator.process_index) * len(indices)
                gens = sample_generators(cfg.seed, step, position, len(indices))
                loss = spec.training_loss(model, batch, gens, loss_cfg=cfg.loss, i2v_cfg=cfg.i2v)
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
            lr = lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                metrics.log(step, loss=loss_value, lr=lr, grad_norm=float(grad_norm),
                            elapsed_s=round(time.perf_counter() - t0, 3))
            if cfg.validation.every_steps and step % cfg.validation.every_steps == 0 and step < cfg.max_steps:
                validate(step)
            if step >= cfg.max_steps:
                break
        epoch += 1
    bar.close()
    validate(step)

    accelerator.wait_for_everyone()
    outputs = save_outputs(accelerator, model, spec, cfg, step) if main else {}
    metrics.close()
    accelerator.end_training()
    return TrainResult(step, len(items), skipped, outputs, accelerator.unwrap_model(model), spec)
