"""The presets under configs/: for every variant and method, the cheapest switches that fit a 16/24/48/80 GiB GPU.
`python -m cogtune.plan.presets --write-presets configs` regenerates them."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from .memory import GiB, Switches, plan_memory

PRESET_GPUS = {"16gb": 16.0, "24gb": 24.0, "48gb": 48.0, "80gb": 80.0}


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
                                f"# Regenerate with: python -m cogtune.plan.presets --write-presets configs\n"
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
                        f"# Regenerate with: python -m cogtune.plan.presets --write-presets configs\n")
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
