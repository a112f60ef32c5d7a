"""What a run is about to do, printed once before the first step: worth reading before hours of training."""

from __future__ import annotations

from collections import Counter

SWITCHES = ("gradient_checkpointing", "activation_offload", "fp8_weights", "nf4_weights", "block_offload",
            "optimizer_in_backward", "stream_text_encoder")


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _shapes(buckets: list) -> str:
    """'frames×height×width: clips' per bucket, the fullest first; a one-frame bucket holds still images (no video
    frame rule allows 1 frame) and says so."""
    counts = Counter(buckets)
    return ", ".join(f"{f}×{h}×{w}: {n}" + (f" image{'s' if n > 1 else ''}" if f == 1 else "")
                     for (h, w, f), n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _images(buckets: list) -> str:
    n = sum(1 for _, _, f in buckets if f == 1)
    return f" ({n} of them still image{'s' if n > 1 else ''}, 1 frame each)" if n else ""


def data_summary(cfg, variant: str, buckets: list, skipped: int, world: int, resume_from=None,
                 native: list[str] = (), held: int = 0, names: list[str] = (), mix=None) -> str:
    """The data, steps and output lines, said once the clips are planned and before any is encoded (a wrong size
    shows before hours of caching). `buckets`: (height, width, frames) of each planned clip; `native`: which of
    data.frames/height/width were unset and took the model's native value; `held`: clips set aside; `mix`: the
    epoch's slots (cogtune.data.mixing.EpochMix), None: every clip once."""
    shapes = _shapes(buckets)
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * world
    per_epoch = mix.size if mix is not None else len(buckets) - held
    epochs = cfg.max_steps * per_step / max(per_epoch, 1)
    every = cfg.checkpoint.every_steps
    result = "lora/ (pytorch_lora_weights.safetensors for diffusers, lora_comfyui.safetensors for ComfyUI core)" \
        if cfg.method == "lora" else "transformer/"
    result += ", lora_ema/" if cfg.ema.decay and cfg.method == "lora" else ", transformer_ema/" if cfg.ema.decay else ""
    start = f"; resuming from {resume_from}" if resume_from else ""
    sets, frames = [], []
    if cfg.data.datasets:  # clips, repeats or weight, and frame settings per dataset, in the config's order
        weights = cfg.data.weights()
        for name, d, r in cfg.data.entries():
            n = sum(1 for x in names if x == name)
            slots = mix.per_dataset.get(name, 0) if mix is not None else n * r
            share = (", held out" if name in cfg.data.heldout_names() else
                     f", weight {weights[name]:g}: {slots} of {per_epoch} per epoch" if name in weights
                     else f" ×{r}" if r > 1 else "")
            sets.append(f"{name}: {n} clips{share} ({_shapes([b for b, x in zip(buckets, names) if x == name])})")
            frames.append(f"{name}: {d.frames_line()}")
    else:
        frames.append(cfg.data.frames_line())
    return "\n".join(([f"datasets {'; '.join(sets)}"] if sets else []) + [f"frames  {'; '.join(frames)}"] + [
        f"data    {len(buckets)} clips planned{_images(buckets)}, {skipped} skipped; frames×height×width: {shapes}"
        + (f" ({variant}'s native {'/'.join(native)}: data.{', data.'.join(native)} not set)" if native else "")
        + (f"; {held} held out (never trained on, their loss is heldout_loss)" if held else ""),
        f"steps   {cfg.max_steps}, {per_step} clip{'s' if per_step > 1 else ''} each (batch {cfg.batch_size} × accumulation "
        f"{cfg.gradient_accumulation_steps} × {world} process{'es' if world > 1 else ''}) ≈ {epochs:.1f} epochs{start}",
        f"output  {cfg.output_dir}/: {result}, "
        + (f"checkpoint-N/ every {every} steps" if every else "no checkpoints (checkpoint.every_steps: 0)")
        + ", logs/ (metrics.jsonl, TensorBoard)" + (", validation/" if cfg.validation.prompts else ""),
    ])


def model_summary(cfg, variant: str, transformer, device) -> str:
    """The model and memory lines, once the trained parameters exist."""
    trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    total = sum(p.numel() for p in transformer.parameters())
    if cfg.method == "lora":
        method = f"LoRA rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g} on {', '.join(cfg.lora.target_modules)}"
    else:
        method = "full fine-tune"
    m = cfg.memory
    switches = [name for name in SWITCHES if getattr(m, name)]
    if m.gradient_checkpointing and m.checkpointing_every > 1:
        switches[0] += f" (every {m.checkpointing_every})"
    switches += [cfg.optimizer.name] if cfg.optimizer.name != "adamw" else []
    switches += [f"ema {cfg.ema.decay}"] if cfg.ema.decay else []
    table = ", without its learned positional table" if cfg.model.drop_learned_positions else ""
    speed = (["compiled blocks (the first steps, and the first at each new size, wait for the compiler)"]
             if cfg.speed.compile == "blocks" else []) + (
        [f"attention {cfg.speed.attention}"] if cfg.speed.attention != "sdpa" else [])
    return "\n".join([
        f"model   {variant}{table}, {method}: {_count(trainable)} of {_count(total)} parameters train",
        f"memory  {', '.join(switches) or 'no switches'}; {device.type}, mixed precision {cfg.mixed_precision}, "
        f"strategy {cfg.distributed.strategy}",
    ] + ([f"speed   {', '.join(speed)}"] if speed else []))


def memory_forecast(cfg, world: int, gpu_bytes: int) -> tuple[str, bool] | None:
    """(one line, fits) of the planner's peak for this run against the GPU's memory, said before any loading or
    caching; None if the planner cannot tell (it must never stop a run)."""
    from ..plan import GiB, plan_memory

    try:
        plan = plan_memory(cfg, world_size=world, device="cuda", propose=False)
    except Exception:  # noqa: BLE001 - a forecast, not a gate
        return None
    gpu = gpu_bytes / GiB
    line = f"plan    predicted peak {plan.total / GiB:.1f} GiB per GPU ({plan.phase}); this GPU has {gpu:.1f} GiB"
    if plan.fits(gpu):
        return line, True
    return (line + f": it will likely run out of memory; `cogtune plan CONFIG --gpu-memory {gpu:.0f}GB` proposes "
                   "switches that fit"), False
