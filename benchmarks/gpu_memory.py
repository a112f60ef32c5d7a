"""Peak memory and s/step of real CogVideoX training steps, beside the planner's prediction.

    python benchmarks/gpu_memory.py [--variant cogvideox-5b] [--method lora|sft] [--rank 64] [--frames 49]
        [--height 480] [--width 720] [--batch 1] [--steps 3] [--switches none,ckpt,fp8+ckpt,ckpt+adamw8bit]
    python benchmarks/gpu_memory.py --tiny            # CPU: 2 blocks × 4 heads, 9×128×192 (the default without CUDA)

Builds the transformer of a variant from its published config with random weights (memory and speed do not depend on
their values) — on CUDA directly on the device in bf16 — and trains it the way cogtune does: frozen weights bf16,
trainable ones fp32 (LoRA through peft `add_adapter`, or every weight for sft), bf16 autocast, inputs shaped as the
pipelines shape them (latents [B, F, C, h, w] padded for patch_size_t, 226 text tokens, rotary embeddings from
`CogVideoXSpec.rotary_embeddings`, ofs for 1.5-I2V), MSE loss in fp32, clipping, AdamW, zero_grad(set_to_none).
Switches, joined with '+', applied by cogtune's own code (cogtune.train.memory): ckpt (every block; ckptK: every
K-th), actoff (with ckpt: checkpointed blocks' inputs wait on the host), fp8 (layerwise casting, float8_e4m3fn storage,
bf16 compute), nf4 (LoRA: frozen Linear weights as torchao NF4, memory.nf4_weights), adamw8bit (bitsandbytes; skipped
if it does not import), inbwd (optimizer step in backward, no clipping),
boff (LoRA: frozen block weights on the host, copied in per block, the next block prefetched on a side stream;
boffsync: the same copied on the compute stream, no prefetch, to see what prefetch hides), compile (speed.compile:
blocks, each repeated block compiled in place; the warm-up step's seconds are reported: the compile cost), and one
attention kernel pinned as speed.attention pins it: sdpa_flash, sdpa_efficient, sdpa_cudnn, sdpa_math (the planner
counts the math kernel's N×N scores), or flash / xformers (diffusers' dispatcher; refused for CogVideoX, whose
attention calls torch's SDPA directly).

Each configuration runs in a fresh process. On CUDA it reports torch.cuda.max_memory_allocated/reserved over the
timed steps; on CPU, the peak of live tensor bytes (a dispatch-mode tracker: the CPU analog of max_memory_allocated)
and the peak RSS increase. Beside it: cogtune's planner (training moments, without the CUDA context) and the ratio.
One markdown row per configuration, ready for BENCHMARKS.md; `RESULT {json}` lines are for tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

GiB = 2**30


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages: those passed to track() plus every op output made while active."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def track(self, tensors) -> None:
        for t in tensors:
            if is_traceable_wrapper_subclass(t):  # e.g. an NF4 weight: its bytes are its inner tensors'
                self.track([getattr(t, name) for name in t.__tensor_flatten__()[0]])
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self.seen:
                continue
            self.seen.add(key)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        if key in self.seen:
            self.seen.discard(key)
            self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track([t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.device.type != "meta"])
        return out


def _status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> int:
    """Current RSS; on Linux also resets the peak (VmHWM) so that peak_rss() measures from here."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB


def model_configs(args) -> tuple[dict, dict]:
    from cogtune.models.variants import real_configs

    real = real_configs(args.variant)
    tcfg = real["transformer"]
    if args.tiny:
        tcfg |= {"num_layers": args.layers or 2, "num_attention_heads": args.heads or 4}
    elif args.layers or args.heads:
        tcfg |= {k: v for k, v in (("num_layers", args.layers), ("num_attention_heads", args.heads)) if v}
    if tcfg["use_learned_positional_embeddings"] or not tcfg["use_rotary_positional_embeddings"]:
        tcfg |= {"sample_frames": args.frames, "sample_height": args.height // 8, "sample_width": args.width // 8}
    return tcfg, real["vae"]


def build(args, tcfg: dict, device: torch.device):
    from diffusers import CogVideoXTransformer3DModel

    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built directly in bf16 (on the device): no fp32 copy ever exists
    try:
        with torch.device(device):
            model = CogVideoXTransformer3DModel(**tcfg)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    if args.method == "lora":
        from cogtune.train.lora import add_lora

        add_lora(model, args.rank, args.rank, ["to_q", "to_k", "to_v", "to_out.0"])
    else:
        model.requires_grad_(True)
    for p in model.parameters():  # cogtune: frozen weights in the compute dtype, trainable ones in fp32
        p.data = p.data.to(torch.float32 if p.requires_grad else torch.bfloat16)
    return model


def _every(switches: set[str]) -> int | None:
    every = [int(s[4:] or 1) for s in switches if s.startswith("ckpt")]
    return every[0] if every else None


def attention_of(switches: set[str]) -> str:
    from cogtune.config import ATTENTION

    chosen = [s for s in switches if s in ATTENTION]
    return chosen[0] if chosen else "sdpa"


def apply_switches(model, switches: set[str]) -> None:
    """cogtune's own switch code (cogtune.train.memory and .speed), as `cogtune train` applies it."""
    from cogtune.models import repeated_blocks
    from cogtune.train.block_offload import block_offload
    from cogtune.train.memory import every_kth_checkpointing, fp8_storage, nf4_storage
    from cogtune.train.speed import compile_blocks

    if _every(switches):
        every_kth_checkpointing(model, _every(switches), offload="actoff" in switches)
    if "fp8" in switches:
        fp8_storage(model, torch.bfloat16)
    if "nf4" in switches:
        from cogtune.models import facts_of_transformer

        nf4_storage(model, next(model.parameters()).device, facts_of_transformer(model).fp8_skip)
    if switches & {"boff", "boffsync"}:
        block_offload(model, next(model.parameters()).device, prefetch="boffsync" not in switches)
    if "compile" in switches:  # last, as in cogtune train
        compile_blocks(repeated_blocks(model))


def make_inputs(args, tcfg: dict, device: torch.device) -> dict:
    from cogtune.models.cogvideox import MAX_TEXT_TOKENS, CogVideoXSpec

    p_t = tcfg["patch_size_t"]
    frames = (args.frames - 1) // tcfg["temporal_compression_ratio"] + 1
    frames += (-frames) % p_t if p_t else 0  # the pipelines pad at the front up to a multiple of patch_size_t
    h, w = args.height // 8, args.width // 8
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.batch, frames, tcfg["in_channels"], h, w, generator=gen)
    spec = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(**tcfg)), patch_size=tcfg["patch_size"],
                           patch_size_t=p_t)
    return {
        "hidden_states": hidden.to(device, torch.bfloat16),
        "encoder_hidden_states": torch.randn(args.batch, MAX_TEXT_TOKENS, tcfg["text_embed_dim"],
                                             generator=gen).to(device, torch.bfloat16),
        "timestep": torch.randint(0, 1000, (args.batch,), generator=gen).to(device),
        "ofs": torch.full((1,), 2.0, device=device) if tcfg["ofs_embed_dim"] else None,
        "image_rotary_emb": CogVideoXSpec.rotary_embeddings(spec, frames, h, w, device),
        "return_dict": False,
    }


def make_optimizer(params, switches: set[str]):
    from cogtune.train.memory import OptimizerInBackward

    def one(ps):
        if "adamw8bit" in switches:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(ps, lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-4)
        return torch.optim.AdamW(ps, lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-4)

    return OptimizerInBackward(params, one) if "inbwd" in switches else one(params)


def predict(args, tcfg: dict, vae: dict, switches: set[str], device: torch.device) -> float:
    """The planner's training peak without the CUDA context (what max_memory_allocated measures)."""
    from cogtune.config import load_config
    from cogtune.plan.memory import Switches, plan_memory

    with tempfile.TemporaryDirectory() as tmp:
        for sub, cfg in (("transformer", tcfg), ("vae", vae)):
            (Path(tmp) / sub).mkdir()
            (Path(tmp) / sub / "config.json").write_text(json.dumps(cfg))
        (Path(tmp) / "model_index.json").write_text("{}")
        tree = {"model": {"path": tmp, "variant": args.variant}, "method": args.method, "batch_size": args.batch,
                "data": {"root": tmp, "frames": args.frames, "height": args.height, "width": args.width},
                "lora": {"rank": args.rank, "alpha": args.rank}, "mixed_precision": "bf16",
                "i2v": {"image_noise": False}}
        cfg = load_config(None, base=tree)
        sw = Switches(gradient_checkpointing=bool(_every(switches)), checkpointing_every=_every(switches) or 1,
                      fp8_weights="fp8" in switches, nf4_weights="nf4" in switches, optimizer="adamw8bit" if "adamw8bit" in switches else "adamw",
                      batch_size=args.batch, activation_offload="actoff" in switches, block_offload=bool(switches & {"boff", "boffsync"}),
                      optimizer_in_backward="inbwd" in switches)
        attention = "math" if attention_of(switches) == "sdpa_math" else "sdpa"
        plan = plan_memory(cfg, world_size=1, device=device.type, attention=attention, switches=sw, propose=False)
        return plan.training_peak[1] - plan.parts["context"]


def setup(args, tcfg: dict, switches: set[str], device: torch.device):
    """(step function, model, trainable params, optimizer, inputs, target) of one training configuration."""
    model = build(args, tcfg, device)
    apply_switches(model, switches)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, switches)
    inputs = make_inputs(args, tcfg, device)
    shape = inputs["hidden_states"].shape
    target = torch.randn(shape[:2] + (tcfg["out_channels"],) + shape[3:], generator=torch.Generator().manual_seed(1))
    target = target.to(device)

    from cogtune.train.speed import attention_kernel

    def step() -> None:
        with attention_kernel(attention_of(switches)):  # backward too: checkpointed blocks recompute in there
            _step()

    def _step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(**inputs)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        if "inbwd" not in switches:  # in backward, each parameter stepped already; no global clipping
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model, params, opt, inputs, target


def run_one(args, label: str) -> dict:
    switches = set() if label == "none" else set(label.split("+"))
    if "adamw8bit" in switches:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return {"config": label, "skipped": "bitsandbytes does not import"}
    from cogtune.config import ATTENTION, compile_conflicts
    from cogtune.models.variants import get_variant

    refused = compile_conflicts(compile="blocks" if "compile" in switches else "off", fp8_weights="fp8" in switches,
                                block_offload=bool(switches & {"boff", "boffsync"}), strategy="auto")
    if ATTENTION[attention_of(switches)].route == "dispatch" and not get_variant(args.variant).attention_dispatch:
        refused.append("this model's attention calls torch's SDPA directly: a dispatcher backend would be ignored")
    if refused:
        return {"config": label, "skipped": refused[0]}
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    tcfg, vae = model_configs(args)
    if device.type == "cpu":  # warm the libraries up (kernels, thread pools) on a 1-block copy, so RSS measures tensors
        setup(args, tcfg | {"num_layers": 1}, switches, device)[0]()
    rss0 = reset_peak_rss()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    try:
        step, model, params, opt, inputs, target = setup(args, tcfg, switches, device)
        t0 = time.perf_counter()
        step()  # warm-up: optimizer states, kernels, allocator (and the compiler, with compile)
        sync()
        warmup = time.perf_counter() - t0
        if device.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        gib = predict(args, tcfg, vae, switches, device) / GiB
        return {"config": label, "skipped": f"out of memory (predicted {gib:.1f} GiB)"}
    result = {"config": label, "s_per_step": sorted(times)[len(times) // 2], "warmup_s": warmup,
              "trainable": sum(p.numel() for p in params), "params": sum(p.numel() for p in model.parameters())}
    if device.type == "cuda":
        result |= {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
    else:  # one more step under the tracker, seeded with everything alive between steps
        tracker = LiveBytes()
        states = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        tensors = [t for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor)]
        tracker.track([*model.parameters(), *model.buffers(), *tensors, target, *states])
        with tracker:
            step()
        result |= {"allocated": tracker.peak, "reserved": None, "rss_increase": peak_rss() - rss0}
    result["predicted"] = predict(args, tcfg, vae, switches, device)
    result["ratio"] = result["allocated"] / result["predicted"]
    return result


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def row(args, r: dict, command: str) -> str:
    size = f"{args.frames}×{args.height}×{args.width}"
    gib = lambda x: "-" if x is None else f"{x / GiB:.3f}"  # noqa: E731
    head = f"| {datetime.date.today()} | {machine()} | {args.variant}{' (tiny)' if args.tiny else ''} | {args.method} "
    if "skipped" in r:
        return head + f"| {size} | {r['config']} | skipped: {r['skipped']} |"
    second = r["reserved"] if r["reserved"] is not None else r.get("rss_increase")
    warm = f" (warm-up {r['warmup_s']:.1f} s)" if "compile" in r["config"].split("+") else ""
    return (head + f"| {size} | {r['config']} | {gib(r['allocated'])} | {gib(second)} | {gib(r['predicted'])} "
            f"| {r['ratio']:.2f} | {r['s_per_step']:.3f}{warm} | `{command}` |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="cogvideox-5b")
    ap.add_argument("--method", choices=["lora", "sft"], default="lora")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--switches", default="none,ckpt,fp8+ckpt,ckpt+adamw8bit", help="comma-separated configurations")
    ap.add_argument("--tiny", action="store_true", help="scaled-down transformer (default without CUDA)")
    ap.add_argument("--layers", type=int, help="override num_layers")
    ap.add_argument("--heads", type=int, help="override num_attention_heads")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even with CUDA")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    from cogtune.models.variants import get_variant

    v = get_variant(args.variant)
    args.tiny = args.tiny or args.cpu or not torch.cuda.is_available()
    small = (17 if v.family == "1.5" else 9, 128, 192)
    native = (v.native_frames, v.native_height, v.native_width)
    args.frames, args.height, args.width = [given or default for given, default in
                                            zip((args.frames, args.height, args.width), small if args.tiny else native)]
    if args.one:
        print("RESULT " + json.dumps(run_one(args, args.one)), flush=True)
        return
    command = "python benchmarks/gpu_memory.py " + " ".join(sys.argv[1:])
    print("| date | machine | variant | method | frames×H×W | switches | max allocated GiB | max reserved GiB (GPU) / "
          "peak RSS increase GiB (CPU) | predicted GiB | allocated/predicted | s/step | command |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label in args.switches.split(","):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", label]
        # a fixed mmap threshold makes glibc return freed tensors to the OS at once, so peak RSS follows live tensors
        env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"| {datetime.date.today()} | {machine()} | {args.variant} | {args.method} | - | {label} | failed: "
                  f"{(proc.stderr.strip().splitlines() or ['?'])[-1][:200]} |")
            continue
        r = json.loads(lines[-1][7:])
        print(row(args, r, command))
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
