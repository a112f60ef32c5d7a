"""The `speed:` switches: regional torch.compile of the transformer's repeated blocks, and the attention kernel.

Neither changes what is trained or saved. Blocks are compiled in place (`Module.compile`), so the module tree and
every parameter name stay as they were: no `_orig_mod.` wrapper reaches a state dict, a checkpoint or a LoRA file.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from contextlib import contextmanager

import torch

from ..config import ATTENTION, compile_conflicts


def speed_conflicts(cfg, facts, cuda: bool) -> list[str]:
    """Why `cogtune train` refuses the speed switches on this machine (empty: it does not), from the config, the
    model's facts and whether CUDA is here: before any weight loads."""
    s, m = cfg.speed, cfg.memory
    why = compile_conflicts(compile=s.compile, block_offload=m.block_offload, fp8_weights=m.fp8_weights,
                            strategy=cfg.distributed.strategy, nf4_weights=m.nf4_weights)
    if s.compile == "blocks" and compiler_missing(cuda):
        why.append(f"speed.compile=blocks: {compiler_missing(cuda)}")
    a = ATTENTION[s.attention]
    if a.route == "dispatch" and not facts.attention_dispatch:
        import diffusers

        why.append(f"speed.attention={s.attention}: the attention of {facts.name} in diffusers {diffusers.__version__} "
                   "calls torch's SDPA directly, not diffusers' attention dispatcher, so this backend would be "
                   "ignored; use sdpa_flash (torch's own FlashAttention) or sdpa")
    elif cuda and s.attention in ("sdpa_flash", "sdpa_cudnn") and cfg.mixed_precision == "no":
        why.append(f"speed.attention={s.attention} runs fp16/bf16 inputs only on CUDA: set mixed_precision: bf16, or "
                   "use sdpa_efficient or sdpa")
    elif a.cuda_only and not cuda:
        why.append(f"speed.attention={s.attention} needs a CUDA device; here use sdpa, sdpa_flash or sdpa_math")
    elif a.package and importlib.util.find_spec(a.package.replace("-", "_")) is None:
        why.append(f"speed.attention={s.attention} needs the {a.package} package: pip install {a.package}")
    return why


def compiler_missing(cuda: bool) -> str:
    """What torch.compile's inductor lacks here ("" when nothing): Triton on CUDA, a C++ compiler on the CPU."""
    if cuda:
        return "" if importlib.util.find_spec("triton") else "inductor needs Triton on CUDA: pip install triton"
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    if any(shutil.which(n) for n in names):
        return ""
    return "inductor needs a C++ compiler on the CPU (g++ or clang++ on PATH, or CXX set); install one"


def compile_blocks(blocks: list[torch.nn.Module]) -> None:
    """Compile each repeated block in place: the blocks share one forward's code, so the compiler traces it once
    (again per new input shape or grad mode) and every block runs the same compiled graph. Checkpointing stays
    outside: a checkpointed block's recompute calls the compiled block again."""
    for block in blocks:
        block.compile()


@contextmanager
def attention_kernel(name: str):
    """The attention kernel of speed.attention while the run trains, validates and recomputes checkpointed blocks:
    torch's SDPA pinned to one kernel (sdpa_*), or diffusers' dispatcher switched to a backend (flash, xformers), and
    both given back afterwards. Each is process-wide state (torch's SDPA flags, the dispatcher's active backend),
    which is why a context and not a setting on the model: diffusers' `set_attention_backend` would leave its backend
    active for every model the process builds later."""
    a = ATTENTION[name]
    if not a.backend:
        yield
        return
    if a.route == "dispatch":
        from diffusers.models.attention_dispatch import attention_backend

        with attention_backend(a.backend):
            yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, a.backend)]):
        yield
