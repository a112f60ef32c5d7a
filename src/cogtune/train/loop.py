"""The training loop: setup (train/setup.py) makes a Run, `train` steps it. It knows the model only through its
ModelSpec and the data only through the cache.

Randomness: sample i of a global batch draws its latents, timestep and noise from a generator keyed by (seed, step,
position in the global batch), and batch order is a pure function of (seed, epoch). So a run is reproducible from its
config alone, resumes exactly, and gives the same losses on 1 process with accumulation as on N processes.
"""

from __future__ import annotations

import logging
import math
import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..errors import CogtuneError
from ..export.shards import new_file_mode, save_safetensors
from .checkpoint import save_checkpoint
from .ema import FILE as EMA_FILE
from .encode import collate
from .outputs import lora_files_into, rescue, rescue_folders, save_outputs, save_rescue
from .plot import write_loss_plot
from .runlock import RunLock, StopFlag, Stopped, check_not_live
from .setup import WEIGHT_DTYPES, Run, make_validator, prepare_model, setup  # noqa: F401 (their old home)
from .speed import attention_kernel

log = logging.getLogger("cogtune")


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
            run = setup(cfg, out, lock, stop)
            try:
                with attention_kernel(cfg.speed.attention):  # after every check: the kernels are there
                    return train_run(run, stop)
            finally:
                run.metrics.close()
        except Stopped:
            again = "resume=latest continues from the last checkpoint" if cfg.resume else "run it again to start"
            return TrainResult(0, 0, [], {}, None, None, True, None,
                               f"stopped before any new step was trained (clips cached so far stay cached); {again}")
        finally:
            lock.release()


def train_run(run: Run, stop: StopFlag) -> TrainResult:
    cfg = run.cfg
    if run.step == 0:
        validate(run, stop, 0)
    stop.at_once(False)
    steps = StepAccumulator(run)
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="training", disable=not run.main, dynamic_ncols=True)
    interrupted, trained_to = False, run.sampler.state_dict()  # the sampler's position after the last batch trained
    while run.step < cfg.max_steps and not interrupted:
        for sampler_state, batch in prefetched(run.sampler, partial(load_batch, run),
                                               lambda: run.data.dataset.all_in_ram):
            done, trained_to = steps.micro_step(batch), sampler_state
            if done is None:  # accumulating
                continue
            run.step += 1
            if run.ema is not None:
                run.ema.update(run.step)
            log_step(run, bar, done, steps.t0)
            if cfg.validation.every_steps and run.step % cfg.validation.every_steps == 0 and run.step < cfg.max_steps:
                validate(run, stop, run.step)
            if any_rank(run.accelerator, stop.requested):
                checkpoint(run, sampler_state)
                interrupted = True
                break
            if cfg.checkpoint.every_steps and run.step % cfg.checkpoint.every_steps == 0:
                checkpoint(run, sampler_state)
            if run.step >= cfg.max_steps:
                break
    bar.close()
    if interrupted:
        return result(run, interrupted=True, message=f"stopped at step {run.step}; checkpoint: {run.last_checkpoint} "
                                                     "(resume=latest continues it)")
    validate(run, stop, run.step)  # a signal here skips the videos; the outputs are saved all the same
    run.accelerator.wait_for_everyone()
    outputs = save_final(run, trained_to)
    if run.validator is not None and (run.out / "validation").is_dir():
        outputs["validation"] = run.out / "validation"
    if run.main:
        run.metrics.flush()
        if write_loss_plot(run.out / "logs" / "metrics.jsonl", run.out / "loss.png"):
            outputs["loss plot"] = run.out / "loss.png"
    run.accelerator.end_training()
    return result(run, outputs=outputs)


def result(run: Run, outputs: dict | None = None, interrupted: bool = False, message: str = "") -> TrainResult:
    return TrainResult(run.step, len(run.data.dataset), run.data.skipped, outputs or {}, run.transformer, run.spec,
                       interrupted, run.last_checkpoint, message)


# --- one micro-batch, one optimizer step --------------------------------------------------------------------------

@dataclass
class StepDone:
    loss: float  # the mean over the whole global batch: every micro-batch of every rank
    lr: float
    grad_norm: float | None
    skipped: bool


class StepAccumulator:
    """Runs micro-batches; every `gradient_accumulation_steps`-th completes an optimizer step (or skips it)."""

    def __init__(self, run: Run):
        self.run = run
        self.micro, self.loss, self.skip, self.skipped_steps = 0, 0.0, False, 0
        self.t0 = time.perf_counter()
        self.deepspeed = run.accelerator.distributed_type.name == "DEEPSPEED"  # clips and skips on its own

    def micro_step(self, batch: dict) -> StepDone | None:
        run, cfg, acc = self.run, self.run.cfg, self.run.accelerator
        accum, size = cfg.gradient_accumulation_steps, len(batch["paths"])
        with acc.accumulate(run.model):
            position = ((self.micro % accum) * run.world + acc.process_index) * size
            gens = sample_generators(cfg.seed, run.step, position, size)
            if cfg.data.shuffle_tags or any(e.shuffle_tags for e in cfg.data.datasets):
                show_tag_orders(batch, run.data.dataset, cfg.seed, run.step, position)
            if cfg.data.caption_dropout:
                drop_captions(batch, run.data.dataset.empty_prompt, cfg.data.caption_dropout, cfg.seed, run.step,
                              position)
            loss = run.spec.training_loss(run.model, batch, gens)
            loss_f = loss.item()  # the step's one host sync
            if any_rank(acc, not math.isfinite(loss_f)):
                loss, loss_f = self.nonfinite_loss(loss, loss_f, batch)
            if not (self.skip and cfg.memory.optimizer_in_backward):  # in backward, the step happens in there
                acc.backward(loss)
            grad_norm = self.clip(batch) if acc.sync_gradients else None
            if acc.sync_gradients and self.skip and not self.deepspeed:
                self.skipped_steps += 1  # no optimizer or schedule step: the weights stay as they were
            else:
                run.optimizer.step()
                run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        self.micro += 1
        self.loss += loss_f / accum
        if not acc.sync_gradients:
            return None
        loss_value = self.loss if run.world == 1 else acc.reduce(
            torch.tensor(self.loss, device=acc.device), reduction="mean").item()
        done = StepDone(loss_value, run.lr_scheduler.get_last_lr()[0], grad_norm, self.skip)
        self.loss, self.skip = 0.0, False
        return done

    def nonfinite_loss(self, loss: torch.Tensor, loss_f: float, batch: dict) -> tuple[torch.Tensor, float]:
        """A NaN/inf loss on any rank: stop (naming the clips), or skip the step with every rank still running the
        same collectives."""
        run = self.run
        mine = batch["paths"] if not math.isfinite(loss_f) else []
        where = f"non-finite loss at step {run.step + 1} on {', '.join(sorted(set(gather_object(mine))))}"
        if run.cfg.on_nonfinite == "stop":
            keep = f"last good checkpoint: {run.last_checkpoint}" if run.last_checkpoint else "no checkpoint was written"
            raise CogtuneError(f"{where}; {keep} (on_nonfinite: skip_step skips such steps)")
        log.warning("%s: step skipped", where)
        self.skip = True
        return loss.nan_to_num(0.0, 0.0, 0.0) * 0.0, 0.0

    def clip(self, batch: dict) -> float | None:
        run, max_norm = self.run, self.run.cfg.optimizer.max_grad_norm
        if self.deepspeed or not max_norm:
            return None
        grad_norm = run.accelerator.clip_grad_norm_(run.params, max_norm)
        grad_norm = None if grad_norm is None else float(grad_norm)
        if grad_norm is not None and not math.isfinite(grad_norm):
            if run.cfg.on_nonfinite == "stop":
                raise CogtuneError(f"non-finite gradient at step {run.step + 1} (clips {', '.join(batch['paths'])}); "
                                   "the weights were not updated")
            self.skip = True
        return grad_norm


def sample_generators(seed: int, step: int, first_position: int, count: int) -> list[torch.Generator]:
    """One generator per sample, keyed by (seed, optimizer step, position in the global batch)."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + step * 8191 + first_position + i) for i in range(count)]


def drop_captions(batch: dict, empty: dict[str, torch.Tensor], p: float, seed: int, step: int, first: int) -> None:
    """In place: each sample's text encodings become the empty caption's with probability `p`, drawn from (seed,
    step, position in the global batch) like its noise, so 1 process and N give the same draws."""
    for i in range(len(batch["paths"])):
        if random.Random(f"caption-dropout-{seed}-{step}-{first + i}").random() < p:
            for key, value in empty.items():
                batch[key][i] = value.to(batch[key].device, batch[key].dtype)


def show_tag_orders(batch: dict, dataset, seed: int, step: int, first: int) -> None:
    """In place: a sample whose clip has shuffled-tag captions gets the encodings of one of them, drawn from (seed,
    step, position in the global batch) like its noise (the cache holds them all: no encoder runs here)."""
    for i, item in enumerate(batch["items"]):
        orders = dataset.tag_orders[item]
        if orders:
            pick = orders[random.Random(f"tag-order-{seed}-{step}-{first + i}").randrange(len(orders))]
            for key, value in dataset.prompt(pick).items():
                batch[key][i] = value.to(batch[key].device, batch[key].dtype)


def load_batch(run: Run, indices: list[int]) -> dict:
    """`indices`: clips of the dataset, as the sampler mapped its slots (a repeated clip fills several)."""
    return collate([run.data.dataset[i] for i in indices], run.accelerator.device)


def log_step(run: Run, bar, done: StepDone, t0: float) -> None:
    bar.set_postfix(loss=f"{done.loss:.4f}", lr=f"{done.lr:.2e}", refresh=False)
    bar.update(1)  # redraws at most every mininterval
    if run.step % run.cfg.log_every == 0 or run.step == run.cfg.max_steps:
        row = dict(loss=done.loss, lr=done.lr, elapsed_s=round(time.perf_counter() - t0, 3))
        if done.grad_norm is not None:
            row["grad_norm"] = done.grad_norm
        run.metrics.log(run.step, **row, **({"skipped": True} if done.skipped else {}))


# --- validation, checkpoints, the final save --------------------------------------------------------------------

@torch.no_grad()
def heldout_loss(spec, transformer, items: list[dict], seed: int, device) -> float:
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


def validate(run: Run, stop: StopFlag, at: int) -> None:
    """Held-out loss and validation videos; a signal abandons them (unless every rank takes part) and is noted."""
    cfg, takes_part = run.cfg, run.main or run.everyone
    averaged = run.ema.swapped_in() if run.ema is not None and cfg.ema.for_validation else nullcontext()
    try:
        with stop.abandonable(at == 0 or not run.everyone), averaged:
            if cfg.validation.heldout_loss and takes_part:
                value = heldout_loss(run.spec, run.transformer, run.heldout, cfg.seed, run.accelerator.device)
                run.metrics.log(at, **{run.fixed_loss: value})
                if run.main:
                    tqdm.write(f"step {at}: {run.fixed_loss} {value:.4f} ({len(run.heldout)} clips)")
            if run.validator is not None and at > 0 and takes_part:
                if run.main:
                    n = len(cfg.validation.prompts)
                    tqdm.write(f"step {at}: validation videos ({n} prompt{'s' if n > 1 else ''})")
                run.validator(run.transformer, run.out / "validation" / f"step-{at}", run.accelerator.device,
                              run.accelerator.autocast, run.metrics.validation_media, at, write=run.main)
    except Stopped:
        if at == 0:
            raise
        log.warning("validation at step %d abandoned", at)


def checkpoint(run: Run, sampler_state: dict) -> Path:
    """`sampler_state`: the sampler's position after the batch trained last (not after the one read ahead)."""
    run.metrics.flush()
    trainer_state = {"step": run.step, "sampler": sampler_state}
    extra = partial(checkpoint_files, run)
    run.last_checkpoint = save_checkpoint(run.accelerator, run.out, run.step, trainer_state, run.run_config,
                                          run.cfg.checkpoint.keep_last, run.sharded, extra)
    if run.main:
        write_loss_plot(run.out / "logs" / "metrics.jsonl", run.out / "loss.png")
    return run.last_checkpoint


def checkpoint_files(run: Run, folder: Path) -> None:
    """Every rank: what a checkpoint holds beside the accelerate state (the LoRA files, the average)."""
    if run.cfg.method == "lora":
        lora_files_into(run.accelerator, run.model, run.spec, run.cfg, run.step, folder)
    if run.ema is not None and run.ema.shadow and run.main:  # none before ema.start_step
        save_safetensors(run.ema.state_dict(), folder / EMA_FILE, mode=new_file_mode())


def save_final(run: Run, sampler_state: dict) -> dict[str, Path]:
    if run.main:
        tqdm.write(f"saving the outputs in {run.out}")
    try:
        outputs = save_outputs(run.accelerator, run.model, run.spec, run.cfg, run.step, clips=len(run.data.dataset))
        if run.ema is not None:
            with run.ema.swapped_in() as averaged:
                if averaged:  # lora_ema/ or transformer_ema/, in every format the plain weights have
                    outputs |= {f"{k}_ema": v for k, v in save_outputs(
                        run.accelerator, run.model, run.spec, run.cfg, run.step, clips=len(run.data.dataset),
                        suffix="_ema").items()}
        return outputs
    except OSError as e:  # on the main process: save the weights elsewhere first (one process: no collectives)
        attempts = [] if run.world > 1 else [
            ("once fixed, run the same command with resume={where} (it saves the outputs without training again)",
             partial(checkpoint, run, sampler_state))] + [
            ("use it as it is, or copy it into the output_dir",
             partial(save_rescue, run.accelerator, run.model, run.spec, run.cfg, run.step, folder))
            for folder in rescue_folders()]
        raise rescue(e, attempts, run.last_checkpoint) from None


# --- batches --------------------------------------------------------------------------------------------------------

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
