"""What `cogtune plan` prints: the memory table of a run and the cheapest switches that fit a GPU."""

from __future__ import annotations

import re

from ..errors import CogtuneError
from .memory import GiB, HEADROOM, PARTS, MemoryPlan

NOTES = {
    "frozen": "base weights in their storage dtype",
    "trainable": "fp32 (DeepSpeed: bf16 module + fp32 master shard)",
    "gathered": "ZeRO-3/FSDP2 blocks being used, block-offload blocks on the GPU",
    "copies": "compute-dtype weights autograd keeps until backward",
    "grads": "fp32",
    "optimizer": "states of the trainable parameters on this GPU (and ema.decay's fp32 average)",
    "activations": "saved by autograd (checkpointed blocks keep their input)",
    "workspace": "transients, recomputed block, optimizer scratch",
    "encoders": "T5 and VAE in memory.encoder_dtype while on the GPU",
    "context": "not in torch.cuda.max_memory_allocated",
}


def parse_size(text: str) -> float:
    """'24GB', '24G', '24GiB', '80' → GiB. GPU sizes are sold in GiB-sized memories (an RTX 4090 has 24 GiB), so
    GB is read as GiB; MB/MiB count 1/1024 of that."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m)?\s*", str(text).lower())
    if not m:
        raise CogtuneError(f"--gpu-memory {text!r}: expected a size like 24GB, 80GiB or 48")
    value = float(m.group(1))
    if not value > 0:
        raise CogtuneError(f"--gpu-memory {text!r}: give a size above zero, like 24GB")
    return value / 1024 if (m.group(2) or "g").startswith("m") else value


def format_plan(plan: MemoryPlan) -> str:
    s, d = plan.switches, plan.details
    lora = f" (LoRA {d['trainable_params'] / 1e6:.1f}M params)" if plan.method == "lora" else ""
    what = (f"{plan.variant}, {plan.method}{lora}, {plan.tokens:,} tokens/sample, batch {s.batch_size}, "
            f"{plan.world_size} process(es), strategy {s.strategy}, optimizer {s.optimizer}")
    if plan.method == "lora" and (s.nf4_weights or s.fp8_weights):
        what += f", frozen Linear weights in {'NF4' if s.nf4_weights else 'fp8'}"
    moments = list(dict.fromkeys([plan.phase, plan.training_peak[0]]))  # the peak, and training's own if different
    columns = [plan.phase_parts[m] for m in moments]
    rows = [f"memory plan: {what}", f"{'GiB at the moment of:':<34}" + "".join(f"{m:>16}" for m in moments) + "  note"]
    rows += [f"{label:<34}" + "".join(f"{c[k] / GiB:16.2f}" for c in columns) + f"  {NOTES[k]}"
             for k, label in PARTS.items() if any(c[k] > 0 for c in columns)]
    rows.append(f"{'total (peak: ' + plan.phase + ')':<34}" + "".join(f"{sum(c.values()) / GiB:16.2f}" for c in columns)
                + "  per accelerator")
    others = ", ".join(f"{k} {v / GiB:.1f}" for k, v in plan.phases.items() if k not in moments)
    rows.append(f"{'other moments':<34}  {others}")
    host = ", ".join(f"{k} {v / GiB:.1f}" for k, v in plan.host.items() if v > 0)
    rows.append(f"{'host memory per process':<34}{plan.host_total / GiB:16.2f}  {host}")
    rows += [f"note: {n}" for n in plan.notes]
    return "\n".join(rows)


def format_proposal(plan: MemoryPlan) -> str:
    p, budget = plan.proposal, plan.gpu_memory
    if p is None:
        return ""
    head = f"GPU {budget:g} GiB (plan to {budget * (1 - HEADROOM):.1f} GiB, {HEADROOM:.0%} kept for fragmentation): "
    switches = " ".join(p.overrides) or "(as configured)"
    if not p.fits and p.note:
        return (head + f"{p.note}: encode on a larger GPU first (`cogtune data cache`, same config), then train "
                       f"here with:\n  {switches}")
    if not p.fits:
        return (head + f"nothing fits; the smallest is {p.total / GiB:.1f} GiB with\n  {switches}\n  "
                "→ fewer frames, a smaller size, more GPUs (--world-size with zero3 or fsdp2), or a larger GPU")
    if not p.overrides:
        return head + f"the run as configured is the cheapest setting that fits ({plan.total / GiB:.1f} GiB)"
    verb = "fits" if plan.fits(budget) else "does not fit"
    return (head + f"as configured it {verb} ({plan.total / GiB:.1f} GiB); the cheapest switches that fit "
            f"({p.total / GiB:.1f} GiB, step time ×{p.cost:.2f}):\n  " + " ".join(p.overrides))
