"""Train a module with SAT's state-dict names under a real DeepSpeed ZeRO-3 engine and save it the way SAT does.

Run under `torchrun --nproc_per_node N` with DS_ACCELERATOR=cpu (tests/helpers/sat_zero3.py does). The module's
parameters are the SAT names `tests/helpers/sat.py` lays out from a tiny diffusers transformer (plus a frozen
`first_stage_model.*` weight of odd size, as SAT's frozen VAE, so the last rank's partition is padded); it is wrapped
by `deepspeed.initialize` as SAT's training_main does, trained a few steps, and saved as SAT's
`save_ds_checkpoint_no_optim` does under ZeRO-3 (sat/training/model_io.py, SwissArmyTransformer 0.4.12): every rank
writes `SAVE/<iteration>/z3_rank_RR_model_states.pt` = {'module': engine state dict with each parameter as its
partition `ds_tensor` carrying `ds_shape`, persistent buffers whole}, and `SAVE/latest` names the iteration.
(SAT itself writes this only on data-parallel rank 0; every rank writes here, as a complete save needs.)

Writes REF (.safetensors): every tensor of the module under its SAT name, gathered by DeepSpeed itself.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import torch

ITERATION = "6"


class Leaf(torch.nn.Module):
    """Holds the tensors of one SAT module path; its forward uses them all (ZeRO-3 gathers a module's own params)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((x * p.float().square().mean() + p.float().mean()) for p in self.parameters(recurse=False))


def build(root: torch.nn.Module, tensors: dict[str, torch.Tensor], buffers: set[str]) -> None:
    leaves = {}
    for name, tensor in tensors.items():
        path, attr = name.rsplit(".", 1)
        if path not in leaves:
            parent = root
            for part in path.split("."):
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.__class__ = Leaf  # plain intermediate modules turn leaf where they hold tensors
            leaves[path] = parent
        if name in buffers:
            leaves[path].register_buffer(attr, tensor.clone())
        else:
            leaves[path].register_parameter(attr, torch.nn.Parameter(tensor.clone(),
                                                                     requires_grad=not path.startswith("first_stage")))


class Model(torch.nn.Module):
    def __init__(self, tensors: dict[str, torch.Tensor], buffers: set[str]):
        super().__init__()
        build(self, tensors, buffers)  # the model's own state-dict names are the SAT ones

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(m(x) for m in self.modules() if isinstance(m, Leaf) and any(True for _ in m.parameters(False)))


def sat_zero3_module_state(engine) -> "OrderedDict[str, torch.Tensor]":
    """What SAT's zero3_state_dict(engine) returns: per module, each parameter's ZeRO-3 partition with its full
    shape attached as `ds_shape`, each persistent buffer as it is."""
    out = OrderedDict()
    for prefix, module in engine.named_modules():
        prefix = prefix + "." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None:
                part = param.ds_tensor.detach()
                part.ds_shape = param.ds_shape
                out[prefix + name] = part
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                out[prefix + name] = buf.detach()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tensors", required=True, help="SAT-named tensors to start from (.pt: {name: tensor})")
    p.add_argument("--buffers", default="", help="comma-separated names that are buffers")
    p.add_argument("--save", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()

    import deepspeed
    from safetensors.torch import save_file

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    # reference tensors the test wrote itself: plain tensors only
    tensors = {k: v.contiguous() for k, v in torch.load(args.tensors, weights_only=True).items()}
    tensors = {k: v for k, v in sorted(tensors.items())}
    tensors["first_stage_model.encoder.conv_in.weight"] = torch.randn(3, 7, generator=torch.Generator().manual_seed(3))
    buffers = set(filter(None, args.buffers.split(",")))
    model = Model(tensors, buffers)
    config = {
        "train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 64},  # some whole, most partitioned
        "steps_per_print": 10_000, "wall_clock_breakdown": False,
    }
    trainable = [q for q in model.parameters() if q.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable,
                                      optimizer=torch.optim.AdamW(trainable, lr=1e-2), config=config)
    assert engine.zero_optimization_partition_weights()
    for step in range(args.steps):
        loss = engine(torch.tensor(1.0 + rank + step))
        engine.backward(loss)
        engine.step()

    folder = Path(args.save) / ITERATION
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    torch.save({"module": sat_zero3_module_state(engine)}, folder / f"z3_rank_{rank:02d}_model_states.pt")

    ref = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            ref[name] = param.detach().clone().contiguous()
    for name, buf in engine.module.named_buffers():
        ref[name] = buf.detach().clone().contiguous()
    torch.distributed.barrier()
    if rank == 0:
        (Path(args.save) / "latest").write_text(ITERATION)
        save_file(ref, args.ref)
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
