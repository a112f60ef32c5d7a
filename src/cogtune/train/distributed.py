"""One config, any topology: the Accelerator for a strategy, with DeepSpeed / FSDP2 settings generated from the run.

Launch with `torchrun` (or `accelerate launch`, or `cogtune train --nproc N`); the strategy decides how the model is
sharded, the launcher only how many processes exist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from accelerate import Accelerator

from ..config import STRATEGIES
from ..errors import CogtuneError

DEEPSPEED = {name: (s.zero, s.offload) for name, s in STRATEGIES.items() if s.zero}  # name: (stage, offload)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_group_env() -> None:
    """DeepSpeed and FSDP want a process group even for one process. Without a launcher, describe the group torchrun
    would make (rank 0 of 1 on a free local port), so a plain `cogtune train` runs, say, ZeRO offload on one GPU."""
    if not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & os.environ.keys():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def deepspeed_config(cfg) -> dict:
    """A complete DeepSpeed config; batch sizes are explicit because accelerate under torchrun on CPU would
    otherwise size train_batch_size for one process and fail DeepSpeed's consistency check."""
    if cfg.distributed.deepspeed_config:
        path = Path(cfg.distributed.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CogtuneError(f"distributed.deepspeed_config: cannot read {path} ({e.__class__.__name__})") from None
    else:
        user = {}
    stage, offload = DEEPSPEED[cfg.distributed.strategy]
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    generated = {
        "train_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * world_size(),
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": cfg.optimizer.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.mixed_precision == "bf16"},
        "fp16": {"enabled": cfg.mixed_precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }
    return generated | user  # a user's JSON wins key by key


def _fix_cpu_ranks(accelerator: Accelerator) -> None:
    """accelerate 1.15 + DeepSpeed on a CPU-only machine initialises torch.distributed with every rank but reports
    one process (rank 0 everywhere); take the ranks from torch.distributed instead."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, PartialState

    if dist.is_available() and dist.is_initialized() and accelerator.num_processes != dist.get_world_size():
        ranks = {"num_processes": dist.get_world_size(), "process_index": dist.get_rank(),
                 "local_process_index": int(os.environ.get("LOCAL_RANK", dist.get_rank()))}
        PartialState._shared_state.update(ranks)
        AcceleratorState._shared_state.update(ranks)


def _force_fsdp_on_cpu(plugin, mixed_precision: str) -> None:
    """accelerate only enables FSDP for GPU-like devices; torch's FSDP2 itself runs on CPU with gloo, which is how
    the strategy is tested here. On CUDA this is never needed."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    AcceleratorState._shared_state.update(distributed_type=DistributedType.FSDP, fsdp_plugin=plugin)


def make_accelerator(cfg, block_classes: tuple[str, ...] = ()) -> Accelerator:
    """`block_classes`: the transformer's repeated blocks (ModelFacts.block_classes), each an FSDP2 unit."""
    import torch

    from accelerate.state import AcceleratorState

    # accelerate keeps its settings for the life of the process: a second run in one Python session (a notebook,
    # `data cache` then `train`) may ask for another mixed precision or strategy
    AcceleratorState._reset_state()
    strategy = cfg.distributed.strategy
    on_cpu = not torch.cuda.is_available()
    if strategy in DEEPSPEED or strategy == "fsdp2":
        single_process_group_env()
    # cpu=True without CUDA: only then does accelerate see torchrun's ranks as MULTI_CPU (gloo). DeepSpeed must not
    # get it: accelerate would drop the plugin.
    kwargs = dict(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                  cpu=on_cpu and strategy not in DEEPSPEED)
    if strategy in DEEPSPEED:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise CogtuneError(f"distributed.strategy={strategy} needs DeepSpeed: pip install 'cogtune[deepspeed]'") from None
        from accelerate.utils import DeepSpeedPlugin

        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg))
    if on_cpu:  # else DeepSpeed, if installed, guesses (and warns that it guessed) on any run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    fsdp = None
    if strategy == "fsdp2":
        from accelerate.utils import FullyShardedDataParallelPlugin

        fsdp = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=list(block_classes or _all_block_classes()),
            reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False,
        )
        if not on_cpu:
            kwargs["fsdp_plugin"] = fsdp
    accelerator = Accelerator(**kwargs)
    if on_cpu:
        _fix_cpu_ranks(accelerator)
        if fsdp is not None and accelerator.num_processes > 1:
            _force_fsdp_on_cpu(fsdp, cfg.mixed_precision)
    return accelerator


def _all_block_classes() -> list[str]:
    from ..models import all_variants

    return sorted({c for facts in all_variants().values() for c in facts.block_classes})


def is_sharded(cfg) -> bool:
    """Parameters live on several ranks: every rank must take part in forward passes and in gathering weights."""
    return STRATEGIES[cfg.distributed.strategy].sharded
