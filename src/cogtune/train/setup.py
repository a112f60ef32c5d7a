"""Everything a run does before its first step, and can fail at: read as setup(cfg) → Run, then loop.py trains it.

The order matters: every check that needs no weights runs before any process group exists, the output folder is
changed only once every rank has looked at it, and nothing is trained before the cache is complete.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from ..config import STRATEGIES, TrainConfig, fill_native_shape
from ..data.buckets import BucketBatchSampler
from ..data.mixing import EpochMix, epoch_mix
from ..data.split import holdout_indices
from ..dtypes import MIXED_PRECISION as WEIGHT_DTYPES  # mixed_precision -> the frozen weights' dtype
from ..errors import CogtuneError
from ..files import write_text_atomic
from ..models import family_options, load_spec, resolve_variant, transformer_skeleton
from .block_offload import block_offload
from .checkpoint import (check_fresh_output, check_resumable, install_trainable_only_hooks, load_checkpoint,
                         resolve_resume)
from .distributed import is_sharded, make_accelerator, world_size
from .ema import EMA
from .encode import PreparedData, prepare_data
from .memory import (check_switches, encoder_dtype, every_kth_checkpointing, fp8_storage, make_optimizer,
                     nf4_storage)
from .metrics import MetricsLog, check_reporting
from .runlock import RunLock, StopFlag
from .speed import compile_blocks, speed_conflicts
from .summary import data_summary, memory_forecast, model_summary

log = logging.getLogger("cogtune")


@dataclass
class Run:
    """A run ready for its first step. `step` and `last_checkpoint` move as it trains."""
    cfg: TrainConfig
    out: Path
    accelerator: object
    spec: object
    data: PreparedData
    validator: object | None
    model: torch.nn.Module  # as accelerate prepared it (wrapped for DDP/DeepSpeed/FSDP2)
    transformer: torch.nn.Module  # the same, unwrapped
    params: list[torch.nn.Parameter]
    optimizer: object
    lr_scheduler: object
    sampler: BucketBatchSampler
    sharded: tuple | None  # FSDP2: (model, optimizer, scheduler), saved through torch.distributed.checkpoint
    run_config: dict
    metrics: MetricsLog
    heldout: list[dict]  # the clips of the fixed-point loss
    fixed_loss: str  # its metric: heldout_loss (clips never trained on) or train_fixed_loss (training clips)
    step: int = 0
    last_checkpoint: Path | None = None
    ema: EMA | None = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def everyone(self) -> bool:
        """Sharded weights: every rank must run each forward pass (validation included)."""
        return is_sharded(self.cfg) and self.world > 1


def check_before_loading(cfg: TrainConfig):
    """The model-vs-config rules, from the folder's configs alone, before any process group or weight."""
    facts = resolve_variant(cfg.model.path, cfg.model.variant, drop_positions=cfg.model.drop_learned_positions)
    fill_native_shape(cfg, facts)
    for name, d, _ in cfg.data.entries():  # every dataset's own frames and size
        problem = facts.check_size(d.frames, d.height, d.width)
        if problem:
            raise CogtuneError(problem if cfg.data.root is not None else f"data.datasets ({name}): {problem}")
    if cfg.method == "lora":  # a name that matches nothing (or a LayerNorm): one line now, not after caching
        from .lora import check_targets

        check_targets(transformer_skeleton(cfg.model.path), cfg.lora.target_modules)
    family_options(cfg, facts)  # another family's options are refused, not ignored
    check_switches(cfg, world_size())
    check_reporting(cfg.logging.report_to)
    speed = speed_conflicts(cfg, facts, torch.cuda.is_available())
    if speed:
        raise CogtuneError(speed[0])
    if cfg.ema.decay and STRATEGIES[cfg.distributed.strategy].sharded:
        raise CogtuneError(f"ema.decay with distributed.strategy={cfg.distributed.strategy}: the parameters are split "
                           "across ranks, which the average does not follow yet; use zero2, ddp or one process")
    return facts


def metrics_log(cfg: TrainConfig, out: Path, main: bool, run_config: dict) -> MetricsLog:
    init = {"project": cfg.logging.wandb_project, "name": cfg.logging.wandb_name or out.resolve().name,
            "config": run_config}
    return MetricsLog(out / "logs", enabled=main, report_to=cfg.logging.report_to, wandb_init=init)


def prepare_output(cfg: TrainConfig, out: Path, lock: RunLock, accelerator, run_config: dict) -> Path | None:
    """The checkpoint to resume from (checked), and the output folder made ready; returns the checkpoint."""
    resume_from = resolve_resume(cfg.resume, out)  # before anything is written: a bad path fails fast
    if resume_from is not None:
        check_resumable(resume_from, run_config)
    stale = check_fresh_output(out, cfg.overwrite) if resume_from is None else []  # resume=auto without one too
    accelerator.wait_for_everyone()  # every rank has looked before the main one changes anything
    if accelerator.is_main_process:
        lock.acquire()
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in run_config.items() if k != "world_size"}  # `cogtune train` takes it back as is
        write_text_atomic(out / "config.yaml", f"# the whole config of this run ({run_config['world_size']} process(es)); "
                          f"`cogtune train` takes it as it is\n" + yaml.safe_dump(settings, sort_keys=False))
    return resume_from


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
    # NF4 weights are quantised on the device layer by layer (after the adapters exist: peft wraps plain Linears)
    placed = nf4_storage(transformer, device, spec.facts.fp8_skip) if m.nf4_weights else []
    spec.to(device, keep_on_host=[*(offload.host_params() if offload else ()), *placed])
    keep = not m.offload_encoders
    spec.encoders_for_training(text=keep, vae=keep or spec.vae_in_training)
    if cfg.speed.compile == "blocks":  # last: the compiled code sees the adapters, checkpointing and final devices
        compile_blocks(spec.blocks())
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


def load_model(cfg: TrainConfig, device, facts):
    """The model's spec, each part read in the dtype it trains or encodes in (a 5B LoRA run needs ~20 GB of host
    RAM, not ~40), checked at the data's size and configured for the run."""
    enc = encoder_dtype(cfg, device)
    frozen = WEIGHT_DTYPES[cfg.mixed_precision] if cfg.method == "lora" else torch.float32
    spec = load_spec(cfg.model.path, facts, {"transformer": frozen, "text_encoder": enc, "vae": enc})
    spec.check_size(cfg.data.frames, cfg.data.height, cfg.data.width)
    spec.configure(cfg.loss, family_options(cfg, spec.facts))
    spec.set_vae_memory(slicing=cfg.memory.vae_slicing, tiling=cfg.memory.vae_tiling)
    spec.encoders_to(device, enc, stream_text=cfg.memory.stream_text_encoder)
    return spec


def held_out(cfg: TrainConfig, names: list[str]) -> list[int]:
    """The clips never trained on: those of the datasets marked heldout, or validation.holdout of them all."""
    sets = cfg.data.heldout_names()
    if sets:
        if cfg.validation.holdout:
            raise CogtuneError("validation.holdout and a heldout dataset (data.datasets[].heldout) both set the "
                               "held-out clips: keep one")
        return [i for i, n in enumerate(names) if n in sets]
    return holdout_indices(len(names), cfg.validation.holdout, cfg.seed)


def dataset_mix(cfg: TrainConfig, names: list[str], buckets: list, held: list[int]) -> EpochMix:
    """The slots of an epoch: each dataset's repeats or weight (data/mixing.py), held-out clips left out."""
    held_set = set(held)
    repeats = {name: r for name, _, r in cfg.data.entries()}
    return epoch_mix(names, buckets, [i not in held_set for i in range(len(names))], repeats, cfg.data.weights(),
                     cfg.seed)


def setup(cfg: TrainConfig, out: Path, lock: RunLock, stop: StopFlag) -> Run:
    native = [k for k in ("frames", "height", "width") if getattr(cfg.data, k) is None]
    facts = check_before_loading(cfg)  # fills those with the model's native shape
    accelerator = make_accelerator(cfg, facts.block_classes)
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise CogtuneError("mixed_precision=fp16 needs a CUDA device; use bf16 or no on CPU")
    set_seed(cfg.seed)
    device, world = accelerator.device, accelerator.num_processes
    if accelerator.is_main_process and device.type == "cuda":
        forecast = memory_forecast(cfg, world, torch.cuda.get_device_properties(device).total_memory)
        if forecast:
            (tqdm.write if forecast[1] else log.warning)(forecast[0])
    run_config = cfg.model_dump(mode="json") | {"world_size": world}
    resume_from = prepare_output(cfg, out, lock, accelerator, run_config)

    stop.at_once(True)  # until the first step nothing new is trained: a signal stops at once
    if accelerator.is_main_process:  # lines where the bar does not move for a while
        tqdm.write(f"loading {facts.name} from {cfg.model.path}")
    spec = load_model(cfg, device, facts)
    def planned(buckets: list, skipped: list, names: list) -> None:  # before any clip is encoded
        if accelerator.is_main_process:
            held = held_out(cfg, names)
            tqdm.write(data_summary(cfg, spec.variant_name, buckets, len(skipped), world, resume_from, native,
                                    len(held), names, dataset_mix(cfg, names, buckets, held)))

    data = prepare_data(spec, cfg, accelerator, on_planned=planned)
    validator = make_validator(spec, cfg)
    params = prepare_model(spec, cfg, device)
    held = held_out(cfg, data.names)
    if accelerator.is_main_process:
        tqdm.write(model_summary(cfg, spec.variant_name, spec.transformer, device))
    optimizer = make_optimizer(params, cfg.optimizer, cfg.memory.optimizer_in_backward)
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor
    lr_scheduler = get_scheduler(cfg.lr_scheduler.name, optimizer, num_warmup_steps=cfg.lr_scheduler.warmup_steps * world,
                                 num_training_steps=cfg.max_steps * world)
    model, optimizer, lr_scheduler = accelerator.prepare(spec.transformer, optimizer, lr_scheduler)
    if not STRATEGIES[cfg.distributed.strategy].own_state:
        install_trainable_only_hooks(accelerator, model)
    transformer = accelerator.unwrap_model(model)
    transformer.train()
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaced them with sharded ones

    mix = dataset_mix(cfg, data.names, data.buckets, held)
    sampler = BucketBatchSampler(mix.slots, cfg.batch_size, cfg.seed, accelerator.process_index, world,
                                 drop_last=False, items_of=mix.items)
    sharded = (model, optimizer.optimizer, lr_scheduler) if cfg.distributed.strategy == "fsdp2" else None
    step = 0
    e = cfg.ema
    ema = EMA({n: p for n, p in transformer.named_parameters() if p.requires_grad}, e.decay, e.start_step, e.every,
              e.on_host) if e.decay else None
    if resume_from is not None:
        state = load_checkpoint(accelerator, resume_from, run_config, sharded)
        step = state["step"]
        sampler.load_state_dict(state["sampler"])
        if ema is not None:
            ema.load(resume_from)
        log.info("resumed from %s at step %d", resume_from, step)
    fixed = held or list(range(len(data.dataset)))  # without a holdout: training clips (train_fixed_loss)
    heldout = [data.dataset[i] for i in fixed[:cfg.validation.heldout_clips or (len(held) if held else 2)]]
    return Run(cfg, out, accelerator, spec, data, validator, model, transformer, params, optimizer, lr_scheduler,
               sampler, sharded, run_config, metrics_log(cfg, out, accelerator.is_main_process, run_config), heldout,
               "heldout_loss" if held else "train_fixed_loss", step, resume_from, ema)
