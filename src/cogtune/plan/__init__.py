"""Memory planning: predict a run's peak accelerator and host memory from its config (`plan_memory`, in memory.py),
and pick the cheapest memory switches that fit a GPU (`propose_switches`, here).

The search tries every combination of: gradient checkpointing off / every 4th / every 2nd / every block; fp8 or NF4
storage and block offload of the frozen weights (LoRA only; NF4 without ZeRO/FSDP2 or block offload); the encoders off the GPU; 8-bit AdamW (when AdamW is chosen);
activation offload (with checkpointing); the optimizer step in backward (SFT, one process, no accumulation);
streaming T5 layer by layer while it encodes;
the distributed strategy (one process: as configured, zero2_offload, zero3_offload; several: also ddp, zero2, fsdp2,
zero3); batch 1 with gradient accumulation (when batch > 1). It keeps the combinations whose predicted peak fits the
GPU less HEADROOM and returns the one with the lowest step_cost (then the smallest). The costs are rough figures
from public reports, not measurements of this code: see COSTS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from itertools import product

from ..config import TrainConfig, compile_conflicts
from .memory import HEADROOM, GiB, MemoryPlan, Switches, model_stats, plan_memory

__all__ = ["GiB", "MemoryPlan", "Proposal", "Switches", "plan_memory", "propose_switches", "step_cost"]

# Relative step time of each switch (multiplied together). Checkpointing re-runs the forward of the checkpointed
# blocks (~1/3 of a step); fp8 casts every layer twice per step; NF4 dequantises every layer twice per step in
# several unfused torch ops (torchao; a guess until BENCHMARKS.md has a GPU row); block offload's copies are prefetched, but
# what compute does not hide waits on PCIe (an estimate, not yet measured: little at 480p, more at small sizes);
# 8-bit Adam is a fused kernel; ZeRO offload runs the optimizer on the CPU; activation offload copies one hidden
# state per checkpointed block each way; the optimizer step in backward does the same work in another order (the
# tiny cost only ranks it after the configurations that fit without it).
COSTS = {"checkpointing": 0.30, "fp8_weights": 0.08, "nf4_weights": 0.20, "block_offload": 0.25, "adamw8bit": 0.01, "micro_batch": 0.10,
         "activation_offload": 0.10, "optimizer_in_backward": 0.005, "stream_text_encoder": 0.001}
STRATEGY_COST = {"auto": 1.0, "ddp": 1.0, "zero2": 1.05, "fsdp2": 1.15, "zero3": 1.15, "zero2_offload": 1.6,
                 "zero3_offload": 2.2}


@dataclass
class Proposal:
    switches: Switches
    overrides: list[str]
    total: float  # bytes
    cost: float  # step time relative to the run as configured
    fits: bool
    note: str = ""


def step_cost(s: Switches, layers: int) -> float:
    """Step time relative to no switches at all (batch for batch)."""
    cost = STRATEGY_COST.get(s.strategy, 1.0)
    if s.gradient_checkpointing:
        cost *= 1 + COSTS["checkpointing"] * math.ceil(layers / s.checkpointing_every) / layers
    cost *= (1 + COSTS["fp8_weights"]) if s.fp8_weights else 1
    cost *= (1 + COSTS["nf4_weights"]) if s.nf4_weights else 1
    cost *= (1 + COSTS["block_offload"]) if s.block_offload else 1
    cost *= (1 + COSTS["adamw8bit"]) if s.optimizer == "adamw8bit" else 1
    cost *= (1 + COSTS["activation_offload"]) if s.activation_offload and s.gradient_checkpointing else 1
    cost *= (1 + COSTS["optimizer_in_backward"]) if s.optimizer_in_backward else 1
    cost *= (1 + COSTS["stream_text_encoder"]) if s.stream_text_encoder else 1  # slower encoding, once
    return cost * ((1 + COSTS["micro_batch"]) if s.batch_size == 1 and s.accumulation > 1 else 1)


def candidate_switches(cfg: TrainConfig, current: Switches, world: int) -> list[Switches]:
    sft = cfg.method == "sft"
    ckpt = [(False, 1)] + [(True, k) for k in (4, 2, 1)]
    opts = [current.optimizer] + (["adamw8bit"] if current.optimizer == "adamw" else [])
    strategies = ["auto", "zero2_offload", "zero3_offload"] if world == 1 else \
        ["ddp", "zero2", "fsdp2", "zero3", "zero2_offload", "zero3_offload"]
    strategies = list(dict.fromkeys([current.strategy, *strategies]))
    batches = [(current.batch_size, current.accumulation)]
    if current.batch_size > 1:
        batches.append((1, current.batch_size * current.accumulation))
    flags = [False] if sft else [False, True]
    storage = [(False, False)] if sft else [(False, False), (True, False), (False, True)]
    in_bwd = [current.optimizer_in_backward] + ([True] if sft and world == 1 else [])
    out = []
    for (gc, k), (fp8, nf4), off, enc, opt, strat, (b, a), act, ib, st5 in product(
            ckpt, storage, flags, [current.offload_encoders, True], opts, strategies, batches,
            [current.activation_offload, True], in_bwd, [current.stream_text_encoder, True]):
        if ib and (strat != "auto" or a > 1):
            continue
        if compile_conflicts(compile=cfg.speed.compile, block_offload=off, fp8_weights=fp8, strategy=strat,
                             nf4_weights=nf4):
            continue
        if nf4 and (strat not in ("auto", "ddp") or off):  # config.switch_conflicts refuses these
            continue
        out.append(replace(current, gradient_checkpointing=gc, checkpointing_every=k, fp8_weights=fp8,
                           block_offload=off, offload_encoders=enc, optimizer=opt, strategy=strat, batch_size=b,
                           accumulation=a, activation_offload=act and gc, optimizer_in_backward=ib,
                           stream_text_encoder=st5, nf4_weights=nf4))
    return list(dict.fromkeys(out))


def propose_switches(cfg: TrainConfig, plan: MemoryPlan, gpu_memory: float, **kw) -> Proposal:
    """The cheapest switches (by step_cost) whose plan fits `gpu_memory` GiB; if none does, the smallest one."""
    st_layers = model_stats(cfg, kw.get("variant"))[1].layers
    base_cost = step_cost(plan.switches, st_layers)
    budget = gpu_memory * GiB * (1 - HEADROOM)
    scored, plans = [], {}
    for s in candidate_switches(cfg, plan.switches, plan.world_size):
        p = plans[s] = plan_memory(cfg, kw.get("variant"), world_size=plan.world_size, device=kw.get("device", "cuda"),
                                   attention=kw.get("attention"), switches=s, propose=False)
        scored.append((not p.fits(gpu_memory), step_cost(s, st_layers), p.total, s))
    nothing_fits = all(unfit for unfit, *_ in scored)
    scored.sort(key=lambda x: (x[2], x[1]) if nothing_fits else (x[0], x[1], x[2]))
    unfit, cost, total, s = scored[0]  # fits first, then cheapest, then smallest
    note = ""
    training_fits = [x for x in scored if plans[x[3]].training_peak[1] <= budget]
    if nothing_fits and training_fits:  # only the move of the encoders to the GPU before training does not fit
        unfit, cost, total, s = min(training_fits, key=lambda x: (x[1], x[2]))
        note = (f"training fits with these switches ({plans[s].training_peak[1] / GiB:.1f} GiB), but before training "
                f"T5-XXL and the VAE go to the GPU for encoding ({plans[s].phases['encoding'] / GiB:.1f} GiB)")
    return Proposal(s, s.overrides(plan.switches), total, cost / base_cost, not unfit, note)
