"""Peak memory of `cogtune convert zero` vs DeepSpeed's own zero_to_fp32.py on the same real ZeRO-2 checkpoint.

    python benchmarks/convert_memory.py [--layers 4] [--workdir /tmp/cogtune_convert_bench] [--keep]

1. Builds a CogVideoX-shaped transformer with the real CogVideoX-2B dimensions (30 heads x 64, text 4096, time 512)
   and --layers blocks (4: ~240M parameters, ~0.96 GB in fp32), trains it one bf16 step with DeepSpeed ZeRO-2 on 2 CPU
   ranks (torchrun, gloo) and saves a DeepSpeed checkpoint (latest + global_step1/, Adam moments included).
2. Runs each converter in its own subprocess and reads its peak RSS from os.wait4 (ru_maxrss):
   `convert_zero(...)` through `python -c`, and `python CKPT/zero_to_fp32.py CKPT OUT --safe_serialization`, both with
   the default 5GB max shard size.
3. Checks both outputs hold identical tensors, prints both peaks and their ratio; the last line is
   `convert_rss_ratio=X.XX` (goal <= 0.5). Machine-dependent figures belong in BENCHMARKS.md, not in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def model_config(layers: int) -> dict:
    from cogtune.models.variants import real_configs

    cfg = real_configs("cogvideox-2b")["transformer"]
    # Real 2B widths; fewer blocks; a small sample size (it shapes no parameter of the 2B layout).
    return cfg | {"num_layers": layers, "sample_frames": 9, "sample_height": 8, "sample_width": 8}


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: a real DeepSpeed ZeRO-2 bf16 step, then engine.save_checkpoint (DeepSpeed's own layout)."""
    import deepspeed
    import torch
    from diffusers import CogVideoXTransformer3DModel

    cfg = json.loads((Path(args.workdir) / "base" / "transformer" / "config.json").read_text())
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel.from_config(cfg)
    world = int(os.environ["WORLD_SIZE"])
    ds_config = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "steps_per_print": 10_000,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    gen = torch.Generator().manual_seed(engine.global_rank)
    out = engine(hidden_states=torch.randn(1, 3, 16, 8, 8, generator=gen).bfloat16(),
                 encoder_hidden_states=torch.randn(1, 226, 4096, generator=gen).bfloat16(),
                 timestep=torch.tensor([500]), return_dict=False)[0]
    engine.backward(out.float().pow(2).mean())
    engine.step()
    engine.save_checkpoint(str(Path(args.workdir) / "checkpoint"))


def make_checkpoint(workdir: Path, layers: int) -> Path:
    import diffusers

    base = workdir / "base" / "transformer"
    base.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "CogVideoXTransformer3DModel", "_diffusers_version": diffusers.__version__,
           **model_config(layers)}
    (base / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    ckpt = workdir / "checkpoint"
    if (ckpt / "latest").is_file():
        print(f"reusing the checkpoint in {ckpt}")
        return ckpt
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(port), __file__, "--worker", "--workdir", str(workdir)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    print(f"made a ZeRO-2 checkpoint with 2 CPU ranks in {time.perf_counter() - start:.0f}s")
    return ckpt


def peak_rss(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of a command run as a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{stderr[-3000:]}")
    return usage.ru_maxrss / 2**20, elapsed  # ru_maxrss is in KiB on Linux


def same_tensors(ours: Path, theirs: Path) -> int:
    from safetensors import safe_open

    def files(d: Path) -> list[Path]:
        return sorted(d.glob("*.safetensors"))

    where = {}
    for f in files(theirs):
        with safe_open(f, "pt") as h:
            where.update({k: f for k in h.keys()})
    count = 0
    for f in files(ours):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                with safe_open(where.pop(k), "pt") as other:
                    if not h.get_tensor(k).equal(other.get_tensor(k)):
                        raise SystemExit(f"outputs differ at {k}")
                count += 1
    if where:
        raise SystemExit(f"zero_to_fp32 wrote {len(where)} tensors we did not, e.g. {next(iter(where))}")
    return count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--workdir", default="/tmp/cogtune_convert_bench")
    p.add_argument("--keep", action="store_true", help="keep the workdir (checkpoint, outputs) for a rerun")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    workdir = Path(args.workdir)
    ckpt = make_checkpoint(workdir, args.layers)
    tag = ckpt / (ckpt / "latest").read_text().strip()
    sizes = {f.name: f.stat().st_size / 2**30 for f in sorted(tag.iterdir())}
    print("checkpoint files:", ", ".join(f"{n} {s:.2f} GiB" for n, s in sizes.items()))
    for out in ("ours", "theirs"):
        shutil.rmtree(workdir / out, ignore_errors=True)

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    ours_code = ("from cogtune.export.zero import convert_zero; "
                 f"convert_zero({str(ckpt)!r}, {str(workdir / 'ours')!r}, {str(workdir / 'base')!r})")
    ours_rss, ours_s = peak_rss([sys.executable, "-c", ours_code], env)
    theirs_rss, theirs_s = peak_rss([sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(workdir / "theirs"),
                                     "--safe_serialization"], env)
    n = same_tensors(workdir / "ours", workdir / "theirs")
    total = sum(f.stat().st_size for f in (workdir / "ours").glob("*.safetensors")) / 2**30
    print(f"model: CogVideoX-2B dims, {args.layers} layers, fp32 weights {total:.2f} GiB; {n} tensors identical")
    print(f"cogtune convert zero : peak RSS {ours_rss:.2f} GiB, {ours_s:.1f}s")
    print(f"deepspeed zero_to_fp32: peak RSS {theirs_rss:.2f} GiB, {theirs_s:.1f}s")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"convert_rss_ratio={ours_rss / theirs_rss:.2f}")


if __name__ == "__main__":
    main()
