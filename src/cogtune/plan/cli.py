"""`cogtune plan CONFIG [--gpu-memory 24GB] [key=value ...]`: the memory table of a run and the cheapest switches
that fit a GPU. `python -m cogtune.plan.cli --write-presets configs` regenerates the presets under configs/."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import yaml

from ..errors import CogtuneError
from .memory import GiB, HEADROOM, PARTS, MemoryPlan, Switches, plan_memory

NOTES = {
    "frozen": "base weights in their storage dtype",
    "trainable": "fp32 (DeepSpeed: bf16 module + fp32 master shard)",
    "gathered": "ZeRO-3/FSDP2 blocks being used, block-offload blocks on the GPU",
    "copies": "compute-dtype weights autograd keeps until backward",
    "grads": "fp32",
    "optimizer": "states of the trainable parameters on this GPU",
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


def _cmd_plan(args) -> None:
    from ..config import load_config

    cfg = load_config(args.config, [*args.overrides, *args.late_overrides])
    gpu = parse_size(args.gpu_memory) if args.gpu_memory else None
    plan = plan_memory(cfg, args.variant, gpu, world_size=args.world_size)
    print(format_plan(plan))
    if gpu is not None:
        print(format_proposal(plan))


class _ValueThenOverrides(argparse.Action):
    """`--gpu-memory 24GB lora.rank=16`: the first value is the option's, the rest are key=value overrides (argparse
    cannot give positionals back once an option came between them)."""

    def __call__(self, parser, namespace, values, option_string=None):
        value, *rest = values
        setattr(namespace, self.dest, self.type(value) if self.type else value)
        namespace.late_overrides = [*getattr(namespace, "late_overrides", []), *rest]


def register_cli(subparsers) -> None:
    """Adds `cogtune plan CONFIG [--gpu-memory 24GB] [key=value ...]` to the top-level subparsers."""
    from ..cli_types import int_range

    p = subparsers.add_parser("plan", help="predict peak GPU and host memory of a run; propose switches that fit a GPU")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    extra = dict(nargs="+", action=_ValueThenOverrides)
    p.add_argument("--gpu-memory", metavar="SIZE", help="e.g. 24GB, 48GB, 80GB: propose the cheapest switches that fit",
                   **extra)
    p.add_argument("--variant", help="plan for this variant (default: model.variant or the model folder's configs)",
                   **extra)
    p.add_argument("--world-size", type=int_range(1, 65536), help="processes in all (default: $WORLD_SIZE or 1)",
                   **extra)
    p.set_defaults(func=_cmd_plan, late_overrides=[])


# --- presets ------------------------------------------------------------------------------------------------------
PRESET_GPUS = {"24gb": 24.0, "48gb": 48.0, "80gb": 80.0}


def _folder_name(facts) -> str:
    return facts.hub_id.rsplit("/", 1)[-1] or facts.name


def preset_tree(variant: str, method: str) -> dict:
    from ..models import get_variant

    v = get_variant(variant)
    tree = {
        "model": {"path": f"/path/to/{_folder_name(v)}", "variant": variant},
        "data": {"root": "/path/to/dataset", "frames": v.native_frames, "height": v.native_height,
                 "width": v.native_width},
        "method": method,
        "optimizer": {"lr": 1.0e-4 if method == "lora" else 1.0e-5},
        "lr_scheduler": {"name": "constant_with_warmup", "warmup_steps": 100},
        "max_steps": 2000, "batch_size": 1, "gradient_accumulation_steps": 1,
        "mixed_precision": v.release_dtype,  # e.g. CogVideoX-2B was trained and released in fp16
        "output_dir": f"runs/{variant}-{method}",
        "checkpoint": {"every_steps": 250},
    }
    if method == "lora":
        tree["lora"] = {"rank": 64, "alpha": 64}
    return tree


def apply_switches(tree: dict, s: Switches, base: Switches) -> dict:
    for pair in s.overrides(base):
        key, value = pair.split("=", 1)
        node = tree
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)
    return tree


def write_presets(out_dir: str | Path) -> list[tuple[str, ...]]:
    """Write configs/<variant>/<method>_<gpu>.yaml for every combination that fits; return README table rows
    (variant, method, gpu, what happened)."""
    from ..config import load_config
    from ..models import all_variants, family

    rows = []
    for variant, facts in all_variants().items():
        for method in ("lora", "sft"):
            if family(facts.family).memory_configs(variant) is None:  # no memory profile: one unpriced preset
                path = Path(out_dir) / variant / f"{method}.yaml"
                path.parent.mkdir(parents=True, exist_ok=True)
                tree = preset_tree(variant, method) | {"memory": {"gradient_checkpointing": True}}
                path.write_text(f"# {variant} {method}: not priced (`cogtune plan` has no memory profile for "
                                f"{facts.family} models yet); gradient checkpointing on as a safe start.\n"
                                f"# Regenerate with: python -m cogtune.plan.cli --write-presets configs\n"
                                + yaml.safe_dump(tree, sort_keys=False))
                rows.append((variant, method, "any", "(not priced)", "-", "-"))
                continue
            for gpu_name, gib in PRESET_GPUS.items():
                tree = preset_tree(variant, method)
                cfg = load_config(None, base=tree)
                plan = plan_memory(cfg, gpu_memory=gib, world_size=1)
                p = plan.proposal
                path = Path(out_dir) / variant / f"{method}_{gpu_name}.yaml"
                if not p.fits:
                    path.unlink(missing_ok=True)
                    rows.append((variant, method, gpu_name, f"does not fit (smallest: {p.total / GiB:.1f} GiB)",
                                 "-", "-"))
                    continue
                tree = apply_switches(tree, p.switches, plan.switches)
                chosen = plan_memory(cfg, world_size=1, switches=p.switches, propose=False)
                moment, training = chosen.training_peak
                figures = (f"training {training / GiB:.1f} GiB ({moment}), encoding "
                           f"{chosen.phases['encoding'] / GiB:.1f} GiB, host {chosen.host_total / GiB:.0f} GiB")
                path.parent.mkdir(parents=True, exist_ok=True)
                head = (f"# {variant} {method} on one {gib:g} GiB GPU: the cheapest switches that fit by `cogtune plan "
                        f"--gpu-memory {gpu_name}`\n# (step time ×{p.cost:.2f} of none). Predicted: {figures}.\n"
                        f"# Fits a {_folder_name(facts)} folder: model.variant is checked against the folder's "
                        f"configs, so another variant's folder is refused.\n"
                        f"# Regenerate with: python -m cogtune.plan.cli --write-presets configs\n")
                path.write_text(head + yaml.safe_dump(tree, sort_keys=False))
                rows.append((variant, method, gpu_name, " ".join(p.overrides) or "(none)", f"×{p.cost:.2f}", figures))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write-presets", metavar="DIR", required=True)
    args = ap.parse_args(argv)
    print("| variant | method | GPU | switches (over the defaults) | step time | predicted |")
    print("|---|---|---|---|---|---|")
    for row in write_presets(args.write_presets):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
