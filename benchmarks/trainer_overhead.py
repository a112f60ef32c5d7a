"""Time per step of cogtune's training loop against a bare loop doing the same work, on the CPU.

    python benchmarks/trainer_overhead.py [--steps 200] [--rounds 3] [--warmup 10] [--variant cogvideox-5b]

1. Writes a tiny pipeline (`write_tiny_pipeline`) and a synthetic dataset (`write_synth_dataset`), then runs
   `cogtune.train.loop.train` for --steps steps (LoRA, batch 1, fp32, log_every 1, no held-out loss) and reads the time
   of each step from the differences of `elapsed_s` in `{output_dir}/logs/metrics.jsonl`.
2. Runs a bare loop on the same tiny model with the same LoRA config, batch and inputs built by the same spec: the
   spec's `training_loss` (same generators, loss weighting and timestep sampling), backward, clip_grad_norm_,
   AdamW step, zero_grad — nothing else.
3. Does both --rounds times, alternating which goes first (a shared machine drifts by more than the overhead being
   measured), and takes the ratio of the mean step times (first --warmup steps excluded; elapsed_s has 1 ms
   resolution) within each round. Prints every round and, last, `overhead_ratio=X.XX`: the median of the rounds'
   ratios (cogtune / bare; goal <= 1.05). Machine-dependent figures belong in BENCHMARKS.md, not in tests.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def run_config(model: Path, data: Path, out: Path, args):
    from cogtune.config import load_config
    from cogtune.models.tiny import TINY_DEFAULTS

    size = TINY_DEFAULTS[args.variant]
    tree = {"model": {"path": str(model)}, "output_dir": str(out), "max_steps": args.steps, "mixed_precision": "no",
            "data": {"root": str(data), "frames": size["frames"], "height": size["height"], "width": size["width"],
                     "num_workers": 0},
            "lora": {"rank": 16, "alpha": 16}, "optimizer": {"lr": 1e-3}, "batch_size": 1, "log_every": 1,
            "validation": {"heldout_loss": False}, "checkpoint": {"every_steps": 0}, "overwrite": True}
    return load_config(None, base=tree)


def cogtune_steps(cfg) -> list[float]:
    """Per-step seconds of the real loop: differences of elapsed_s in logs/metrics.jsonl."""
    from cogtune.train.loop import train
    from cogtune.train.metrics import read_metrics

    train(cfg)
    rows = read_metrics(Path(cfg.output_dir) / "logs" / "metrics.jsonl")
    elapsed = [row["elapsed_s"] for row in rows if "elapsed_s" in row]
    return [b - a for a, b in zip([0.0, *elapsed], elapsed)]


def bare_steps(cfg, args) -> list[float]:
    """The same forward/backward/optimizer work without the trainer around it."""
    from cogtune.models.cogvideox import CogVideoXSpec
    from cogtune.train.lora import add_lora
    from cogtune.train.loop import sample_generators

    torch.manual_seed(cfg.seed)
    spec = CogVideoXSpec.load(cfg.model.path, cfg.model.variant)
    gen = torch.Generator().manual_seed(0)
    video = torch.rand(1, cfg.data.frames, 3, cfg.data.height, cfg.data.width, generator=gen) * 2 - 1
    batch = {k: v for k, v in spec.encode_videos(video).items()}
    batch |= spec.encode_prompts(["a red circle moving left on a white background"])
    transformer = spec.transformer
    add_lora(transformer, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.dropout)
    spec.cast(torch.float32)
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    o = cfg.optimizer
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        gens = sample_generators(cfg.seed, step, 0, 1)
        loss = spec.training_loss(transformer, batch, gens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--variant", default="cogvideox-5b")
    ap.add_argument("--workdir", help="default: a temporary folder")
    args = ap.parse_args()
    logging.getLogger("cogtune").setLevel(logging.WARNING)
    from cogtune.data.synth import write_synth_dataset
    from cogtune.models.tiny import write_tiny_pipeline

    w = args.warmup
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        model = write_tiny_pipeline(work / "model", args.variant, seed=0)
        write_synth_dataset(work / "data", clips=4, seed=0, overwrite=True)
        bare_steps(run_config(model, work / "data", work / "warmup", args), args)  # warms the process up
        for r in range(args.rounds):
            cfg = run_config(model, work / "data", work / f"run-{r}", args)
            if r % 2:
                trainer, bare = cogtune_steps(cfg), bare_steps(cfg, args)
            else:
                bare, trainer = bare_steps(cfg, args), cogtune_steps(cfg)
            rounds.append((statistics.fmean(trainer[w:]), statistics.fmean(bare[w:])))
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"steps: {args.steps} per loop and round (first {w} excluded), tiny {args.variant}, LoRA rank 16, batch 1, "
          "fp32, log_every 1")
    for r, (trainer_s, bare_s) in enumerate(rounds):
        first = "cogtune" if r % 2 else "bare"
        print(f"round {r + 1} ({first} first): cogtune {trainer_s * 1000:.2f} ms/step, bare {bare_s * 1000:.2f} ms/step, "
              f"ratio {trainer_s / bare_s:.3f}")
    print(f"overhead_ratio={statistics.median(t / b for t, b in rounds):.2f}")


if __name__ == "__main__":
    main()
