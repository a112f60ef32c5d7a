"""The training loop. It knows the model only through its ModelSpec and the data only through the cache.

Randomness: sample i of a global batch draws its latents, timestep and noise from a generator keyed by (seed, step,
position in the global batch), and batch order is a pure function of (seed, epoch). So a run is reproducible from its
config alone, resumes exactly, and gives the same losses on 1 process with accumulation as on N processes.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import yaml
from accelerate.utils import gather_object, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data.buckets import BucketBatchSampler
from ..errors import CogtuneError
from ..models import load_spec, resolve_variant, transformer_skeleton
from .block_offload import block_offload
from .checkpoint import (check_fresh_output, check_resumable, install_trainable_only_hooks, load_checkpoint,
                         resolve_resume, save_checkpoint)
from .distributed import is_sharded, make_accelerator, world_size
from .encode import collate, prepare_data
from .memory import check_switches, encoder_dtype, every_kth_checkpointing, fp8_storage, make_optimizer
from .metrics import MetricsLog
from .outputs import rescue, rescue_folders, save_outputs, save_rescue
from .runlock import RunLock, StopFlag, Stopped, check_not_live
from .summary import memory_forecast, run_summary

log = logging.getLogger("cogtune")
WEIGHT_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    steps: int
    clips: int
    skipped: list[str]
    outputs: dict[str, Path]
    transformer: torch.nn.Module = field(repr=False)
    spec: object = field(repr=False)
    interrupted: bool = False
    checkpoint: Path | None = None
    message: str = ""  # what an interrupted run saved and how to continue

    @property
    def lora_path(self) -> Path | None:
        return self.outputs.get("lora")


def sample_generators(seed: int, step: int, first_position: int, count: int) -> list[torch.Generator]:
    """One generator per sample, keyed by (seed, optimizer step, position in the global batch)."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + step * 8191 + first_position + i) for i in range(count)]


@torch.no_grad()
def heldout_loss(spec, transformer, items: list[dict], seed: int, loss_cfg, device) -> float:
    """Loss on fixed clips, latents, noise and timesteps: comparable across steps and runs."""
    was_training = transformer.training
    transformer.eval()
    total = 0.0
    points = spec.objective.heldout_points()  # (seed key, fixed timestep or noise level)
    for i, item in enumerate(items):
        batch = collate([item], device)
        for key, t in points:
            gens = [torch.Generator().manual_seed(seed + 1000 * i + key)]
            total += spec.training_loss(transformer, batch, gens, t, heldout=True).item()
    transformer.train(was_training)
    return total / (len(items) * len(points))


def prepare_model(spec, cfg: TrainConfig, device) -> list[torch.nn.Parameter]:
    """Make the trainable parameters (LoRA adapters or the whole transformer) and apply the memory switches."""
    transformer = spec.transformer
    if cfg.method == "lora":
        from .lora import add_lora

        add_lora(transformer, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.dropout)
    else:
        transformer.requires_grad_(True)
    dtype = WEIGHT_DTYPES[cfg.mixed_precision]
    spec.cast(dtype)
    m = cfg.memory
    if m.activation_offload and device.type != "cuda":
        log.warning("memory.activation_offload saves accelerator memory only; on %s it just copies", device.type)
    if m.gradient_checkpointing:
        every_kth_checkpointing(transformer, m.checkpointing_every, offload=m.activation_offload)
    # fp8 storage and block offload act on the host, so the full-size weights never visit the device
    if m.fp8_weights:
        fp8_storage(transformer, dtype, spec.facts.fp8_skip)
    offload = block_offload(transformer, device) if m.block_offload else None
    spec.to(device, keep_on_host=offload.host_params() if offload else ())
    keep = not m.offload_encoders
    spec.encoders_for_training(text=keep, vae=keep or spec.vae_in_training)
    return [p for p in transformer.parameters() if p.requires_grad]


def make_validator(spec, cfg: TrainConfig):
    v = cfg.validation
    if not v.prompts:
        return None
    if spec.facts.i2v and len(v.images) != len(v.prompts):
        raise CogtuneError(f"validation.images: {spec.variant_name} needs one image per prompt "
                           f"({len(v.prompts)} prompts, {len(v.images)} images)")
    for path in v.images:
        if not Path(path).is_file():
            raise CogtuneError(f"validation.images: {path} does not exist")
    from ..infer.validate import Validator

    return Validator(spec, v, v.frames or cfg.data.frames, v.height or cfg.data.height, v.width or cfg.data.width,
                     spec.facts.fps)


def prefetched(sampler, load, in_ram=lambda: False):
    """Yields (sampler state once this batch is done, batch). While batches come from disk, the next one is read and
    collated on a thread as the caller trains on this one; once `in_ram()`, on the caller's thread (a thread only
    competes for the GIL then). The state is captured when a batch is drawn, so a checkpoint saves the position
    after the batch trained last, not after the one read ahead."""
    with ThreadPoolExecutor(1, thread_name_prefix="cogtune-prefetch") as pool:
        batches = iter(sampler)

        def draw():  # -> (state, a call that returns the batch), or None at the end of the epoch
            indices = next(batches, None)
            if indices is None:
                return None
            return sampler.state_dict(), (partial(load, indices) if in_ram() else pool.submit(load, indices).result)

        pending = draw()
        while pending is not None:
            state, batch = pending
            pending = draw()
            yield state, batch()


def any_rank(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def train(cfg: TrainConfig) -> TrainResult:
    """SIGTERM/SIGINT never lose finished steps: before the first step (caching, loading, step-0 validation) the run
    stops at once; later, validation is abandoned and a checkpoint (or the final outputs) is saved first."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise CogtuneError(f"output_dir {out} is a file, not a folder: choose another output_dir")
    check_not_live(out)  # before anything is read, deleted or written
    lock = RunLock(out)
    with StopFlag() as stop:
        try:
            return _train(cfg, out, lock, stop)
        except Stopped:
            again = "resume=latest continues from the last checkpoint" if cfg.resume else "run it again to start"
            return TrainResult(0, 0, [], {}, None, None, True, None,
                               f"stopped before any new step was trained (clips cached so far stay cached); {again}")
        finally:
            lock.release()


def _train(cfg: TrainConfig, out: Path, lock: RunLock, stop: StopFlag) -> TrainResult:
    facts = resolve_variant(cfg.model.path, cfg.model.variant)
    problem = facts.check_size(cfg.data.frames, cfg.data.height, cfg.data.width)
    if problem:
        raise CogtuneError(problem)
    if cfg.method == "lora":  # a name that matches nothing (or a LayerNorm): one line now, not after caching
        from .lora import check_targets

        check_targets(transformer_skeleton(cfg.model.path), cfg.lora.target_modules)
    check_switches(cfg, world_size())  # before any process group exists
    accelerator = make_accelerator(cfg, facts.block_classes)
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise CogtuneError("mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU")
    set_seed(cfg.seed)
    main, device, world, rank = (accelerator.is_main_process, accelerator.device, accelerator.num_processes,
                                 accelerator.process_index)
    if main and device.type == "cuda":
        forecast = memory_forecast(cfg, world, torch.cuda.get_device_properties(device).total_memory)
        if forecast:
            (tqdm.write if forecast[1] else log.warning)(forecast[0])
    run_config = cfg.model_dump(mode="json") | {"world_size": world}
    resume_from = resolve_resume(cfg.resume, out)  # before anything is written: a bad path fails fast
    if resume_from is not None:
        check_resumable(resume_from, run_config)
    stale = check_fresh_output(out, cfg.overwrite) if resume_from is None else []  # resume=auto without one too
    accelerator.wait_for_everyone()  # every rank has looked before the main one changes anything
    if main:
        lock.acquire()
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))

    stop.at_once(True)  # until the first step nothing new is trained: a signal stops at once
    # read each part in the dtype it trains or encodes in: a 5B LoRA run needs ~20 GB of host RAM, not ~40
    enc = encoder_dtype(cfg, device)
    frozen = WEIGHT_DTYPES[cfg.mixed_precision] if cfg.method == "lora" else torch.float32
    spec = load_spec(cfg.model.path, cfg.model.variant, {"transformer": frozen, "text_encoder": enc, "vae": enc})
    spec.check_size(cfg.data.frames, cfg.data.height, cfg.data.width)
    spec.configure(cfg.loss, cfg.i2v)
    spec.set_vae_memory(slicing=cfg.memory.vae_slicing, tiling=cfg.memory.vae_tiling)
    spec.encoders_to(device, enc, stream_text=cfg.memory.stream_text_encoder)
    data = prepare_data(spec, cfg, accelerator)
    validator = make_validator(spec, cfg)

    params = prepare_model(spec, cfg, device)
    transformer = spec.transformer
    if main:
        tqdm.write(run_summary(cfg, spec.variant_name, transformer, data, world, device, resume_from))
    o, in_backward = cfg.optimizer, cfg.memory.optimizer_in_backward
    optimizer = make_optimizer(params, o, in_backward)
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor
    lr_scheduler = get_scheduler(cfg.lr_scheduler.name, optimizer, num_warmup_steps=cfg.lr_scheduler.warmup_steps * world,
                                 num_training_steps=cfg.max_steps * world)
    model, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    if cfg.distributed.strategy not in ("zero2", "zero2_offload", "zero3", "zero3_offload", "fsdp2"):
        install_trainable_only_hooks(accelerator, model)
    transformer = accelerator.unwrap_model(model)
    transformer.train()
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaced them with sharded ones

    sampler = BucketBatchSampler(data.buckets, cfg.batch_size, cfg.seed, rank, world, drop_last=False)
    # FSDP2 checkpoints go through torch.distributed.checkpoint, the rest through accelerate
    sharded = (model, optimizer.optimizer, lr_scheduler) if cfg.distributed.strategy == "fsdp2" else None
    step = 0
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, run_config, sharded)
        step = state["step"]
        sampler.load_state_dict(state["sampler"])
        log.info("resumed from %s at step %d", resume_from, step)

    metrics = MetricsLog(out / "logs", enabled=main)
    try:
        heldout = [data.dataset[i] for i in range(min(cfg.validation.heldout_clips, len(data.dataset)))]
        everyone = is_sharded(cfg)  # sharded weights: every rank must run each forward pass

        def validate(at: int) -> None:  # a signal abandons it (unless every rank takes part) and is noted
            try:
                with stop.abandonable(at == 0 or not (everyone and world > 1)):
                    if cfg.validation.heldout_loss and (main or everyone):
                        value = heldout_loss(spec, transformer, heldout, cfg.seed, cfg.loss, device)
                        metrics.log(at, heldout_loss=value)
                    if validator is not None and at > 0 and (main or everyone):
                        validator(transformer, out / "validation" / f"step-{at}", device, accelerator.autocast,
                                  metrics.tensorboard, at, write=main)
            except Stopped:
                if at == 0:
                    raise
                log.warning("validation at step %d abandoned", at)

        sampler_state = sampler.state_dict()

        def checkpoint(at: int) -> Path:
            metrics.flush()
            trainer_state = {"step": at, "sampler": sampler_state}
            return save_checkpoint(accelerator, out, at, trainer_state, run_config, cfg.checkpoint.keep_last, sharded)

        if step == 0:
            validate(0)
        stop.at_once(False)
        accum = cfg.gradient_accumulation_steps

        def load_batch(indices: list[int]) -> dict:
            return collate([data.dataset[i] for i in indices], device)

        bar = tqdm(total=cfg.max_steps, initial=step, desc="training", disable=not main, dynamic_ncols=True)
        micro, t0, interrupted, last_ckpt, skipped_steps, step_loss = 0, time.perf_counter(), False, resume_from, 0, 0.0
        deepspeed, skip = accelerator.distributed_type.name == "DEEPSPEED", False
        while step < cfg.max_steps and not interrupted:
            for sampler_state, batch in prefetched(sampler, load_batch, lambda: data.dataset.all_in_ram):
                size = len(batch["paths"])
                with accelerator.accumulate(model):
                    position = ((micro % accum) * world + rank) * size
                    gens = sample_generators(cfg.seed, step, position, size)
                    loss = spec.training_loss(model, batch, gens)
                    loss_f = loss.item()  # the step's one host sync
                    if any_rank(accelerator, not math.isfinite(loss_f)):
                        mine = batch["paths"] if not math.isfinite(loss_f) else []
                        where = f"non-finite loss at step {step + 1} on {', '.join(sorted(set(gather_object(mine))))}"
                        if cfg.on_nonfinite == "stop":
                            keep = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written"
                            raise CogtuneError(f"{where}; {keep} (on_nonfinite: skip_step skips such steps)")
                        log.warning("%s: step skipped", where)
                        skip = True
                        loss = loss.nan_to_num(0.0, 0.0, 0.0) * 0.0  # every rank still runs the same collectives
                        loss_f = 0.0
                    if not (skip and in_backward):  # in backward, the step happens in there
                        accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients and not deepspeed and o.max_grad_norm:  # DeepSpeed: its own
                        grad_norm = accelerator.clip_grad_norm_(params, o.max_grad_norm)
                        grad_norm = None if grad_norm is None else float(grad_norm)
                        if grad_norm is not None and not math.isfinite(grad_norm):
                            if cfg.on_nonfinite == "stop":
                                raise CogtuneError(f"non-finite gradient at step {step + 1} (clips "
                                                   f"{', '.join(batch['paths'])}); the weights were not updated")
                            skip = True
                    if accelerator.sync_gradients and skip and not deepspeed:
                        skipped_steps += 1  # no optimizer or schedule step: the weights stay as they were
                    else:
                        optimizer.step()
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                micro += 1
                step_loss += loss_f / accum
                if not accelerator.sync_gradients:
                    continue
                step += 1
                row_extra = {"skipped": True} if skip else {}
                skip = False
                # the mean over the whole global batch: every micro-batch of every rank
                loss_value = step_loss if world == 1 else accelerator.reduce(
                    torch.tensor(step_loss, device=device), reduction="mean").item()
                step_loss = 0.0
                lr = lr_scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
                bar.update(1)  # redraws at most every mininterval
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    row = dict(loss=loss_value, lr=lr, elapsed_s=round(time.perf_counter() - t0, 3))
                    if grad_norm is not None:
                        row["grad_norm"] = grad_norm
                    metrics.log(step, **row, **row_extra)
                if cfg.validation.every_steps and step % cfg.validation.every_steps == 0 and step < cfg.max_steps:
                    validate(step)
                if any_rank(accelerator, stop.requested):
                    last_ckpt, interrupted = checkpoint(step), True
                    break
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                    last_ckpt = checkpoint(step)
                if step >= cfg.max_steps:
                    break
        bar.close()
        if interrupted:
            return TrainResult(step, len(data.dataset), data.skipped, {}, transformer, spec, True, last_ckpt,
                               f"stopped at step {step}; checkpoint: {last_ckpt} (resume=latest continues it)")
        validate(step)  # a signal here skips the videos; the outputs are saved all the same
        accelerator.wait_for_everyone()
        try:
            outputs = save_outputs(accelerator, model, spec, cfg, step)
        except OSError as e:  # on the main process: save the weights elsewhere first (one process: no collectives)
            attempts = [] if world > 1 else [
                ("once fixed, run the same command with resume={where} (it saves the outputs without training again)",
                 lambda: checkpoint(step))] + [
                ("use it as it is, or copy it into the output_dir", partial(save_rescue, accelerator, model, spec, cfg,
                                                                           step, folder)) for folder in rescue_folders()]
            raise rescue(e, attempts, last_ckpt) from None
        accelerator.end_training()
        return TrainResult(step, len(data.dataset), data.skipped, outputs, transformer, spec, False, last_ckpt)
    finally:
        metrics.close()
