"""Peak RSS and s/step of LoRA vs full SFT on the tiny CogVideoX1.5 variant, with and without gradient checkpointing.

Each configuration runs `cogtune train` in its own process (so ru_maxrss is its own peak); s/step is the median of
the per-step times in metrics.jsonl after two warm-up steps. Prints a markdown row per configuration and a ratio.
usage: python benchmarks/lora_vs_sft.py [--steps 20] [--variant cogvideox1.5-5b]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = """
import resource, sys
from cogtune.config import load_config
from cogtune.train.loop import train
train(load_config(None, sys.argv[1:], base={}))
print("RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--variant", default="cogvideox1.5-5b")
    args = ap.parse_args()
    from cogtune.data.synth import write_synth_dataset
    from cogtune.models.tiny import TINY_DEFAULTS, write_tiny_pipeline

    work = Path(tempfile.mkdtemp())
    model = write_tiny_pipeline(work / "model", args.variant)
    write_synth_dataset(work / "data", clips=6)
    size = TINY_DEFAULTS[args.variant]
    rows = {}
    for method in ("lora", "sft"):
        for ckpt in (False, True):
            out = work / f"{method}-{ckpt}"
            overrides = [f"model.path={model}", f"data.root={work / 'data'}", f"data.frames={size['frames']}",
                         f"data.height={size['height']}", f"data.width={size['width']}", f"method={method}",
                         f"memory.gradient_checkpointing={ckpt}", f"max_steps={args.steps}", "mixed_precision=no",
                         "validation.heldout_loss=false", f"output_dir={out}", "lora.rank=16", "lora.alpha=16"]
            proc = subprocess.run([sys.executable, "-c", RUN, *overrides], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{method} checkpointing={ckpt} failed:\n{proc.stderr[-2000:]}")
            rss_mb = int(proc.stdout.split("RSS_KB")[1].split()[0]) / 1024
            elapsed = [json.loads(l)["elapsed_s"] for l in (out / "logs" / "metrics.jsonl").read_text().splitlines()
                       if '"loss"' in l]
            per_step = statistics.median(b - a for a, b in zip(elapsed[2:], elapsed[3:]))
            rows[(method, ckpt)] = (rss_mb, per_step)
    today, machine = datetime.date.today().isoformat(), f"{platform.machine()} CPU"
    cmd = f"python benchmarks/lora_vs_sft.py --steps {args.steps} --variant {args.variant}"
    print("| date | machine | command | method | checkpointing | peak RSS | s/step |")
    for (method, ckpt), (rss, sps) in rows.items():
        print(f"| {today} | {machine} | `{cmd}` | {method} | {ckpt} | {rss:.0f} MB | {sps:.4f} |")
    lora, sft = rows[("lora", False)], rows[("sft", False)]
    print(f"sft_over_lora_rss={sft[0] / lora[0]:.2f} sft_over_lora_step={sft[1] / lora[1]:.2f}")


if __name__ == "__main__":
    main()
