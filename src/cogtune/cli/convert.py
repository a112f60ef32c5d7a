"""`cogtune convert sat|zero|fsdp`: foreign checkpoints to diffusers; `convert comfyui`: diffusers to ComfyUI."""

from __future__ import annotations

HELP = "convert foreign checkpoints to diffusers, and diffusers models to ComfyUI's single file"


def _sat(args) -> None:
    from ..export.sat import convert_sat

    path = convert_sat(args.ckpt, args.out, args.variant, alpha=args.alpha, config=args.config, dtype=args.dtype,
                       max_shard_size=args.max_shard_size, overwrite=args.overwrite, unsafe_pickle=args.unsafe_pickle,
                       source=args.source, ema=args.ema, merge_into=args.merge_into)
    print(f"wrote {path}")


def add_sat(convert) -> None:
    from ..export.sat import SAT_FAMILY, SAT_FILE, SOURCES
    from ..models import family
    from .common import add_unsafe

    variants = family(SAT_FAMILY).VARIANTS
    p = convert.add_parser("sat", help="SAT checkpoint or LoRA (or an alpha-less official-trainer LoRA) -> diffusers")
    p.add_argument("ckpt", metavar="CKPT", help=f"{SAT_FILE}, a SAT iteration folder (also a ZeRO-3 one of "
                                                 "z3_rank_* files), a SAT save folder (latest + <iteration>/), or an "
                                                 "official-trainer LoRA")
    p.add_argument("out", metavar="OUT", help="transformer folder (full checkpoint) or LoRA folder/.safetensors")
    p.add_argument("--variant", choices=sorted(variants),
                   help="the model it was trained on (a full checkpoint's own keys are checked against it, or decide "
                        "without it; LoRAs need it)")
    p.add_argument("--source", choices=SOURCES, help="an alpha-less diffusers LoRA: from CogVideo's finetune trainer "
                                                      "or from tools/export_sat_lora_weight.py")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: SAT 1; official finetune trainer 64)")
    p.add_argument("--config", help="transformer config.json (or model folder) to use instead of the published one")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="weights dtype (default: the checkpoint's; with --merge-into, the model's)")
    p.add_argument("--ema", action="store_true",
                   help="of a SAT save folder, convert the EMA weights (<iteration>-ema/) instead of the plain ones")
    p.add_argument("--merge-into", metavar="MODEL_DIR",
                   help="fuse the LoRA into this model's transformer at its scale (alpha/r) and write OUT as the "
                        "merged transformer folder (what `cogtune lora merge` does with the converted LoRA)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT folder or an existing LoRA file")
    add_unsafe(p)
    p.set_defaults(func=_sat)


def _full_model(p, checkpoint_help: str, convert) -> None:
    """The arguments every conversion of a full fine-tune takes, and the command that calls `convert`."""
    from .common import add_unsafe

    p.add_argument("checkpoint", metavar="CHECKPOINT", help=checkpoint_help)
    p.add_argument("out", metavar="OUT", help="output transformer folder (must be new or empty)")
    p.add_argument("--base", required=True, metavar="MODEL_DIR",
                   help="the model trained from: pipeline folder or its transformer/ folder (config and shapes)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="output dtype (default fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="split the weights into files of at most this (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (atomically)")
    add_unsafe(p)
    p.set_defaults(func=lambda args: convert(args.checkpoint, args.out, args.base, dtype=args.dtype,
                                             max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                             unsafe_pickle=args.unsafe_pickle))


def add_zero(convert) -> None:
    from ..export.zero import TRUST_NOTE, convert_zero

    p = convert.add_parser(
        "zero", help="DeepSpeed ZeRO-1/2/3 checkpoint -> diffusers transformer folder (fp32 master weights)",
        description="Reconstruct the fp32 master weights of a DeepSpeed ZeRO-1/2/3 checkpoint, one rank at a time, "
                    "and write them as a diffusers transformer folder (config.json + safetensors, sharded past "
                    "--max-shard-size) that the model's transformer class and the pipelines load. " + TRUST_NOTE)
    _full_model(p, "folder with 'latest' + the tag folder (DeepSpeed's global_stepN/, accelerate's checkpoint-N/ "
                   "with pytorch_model/), or the tag folder itself", convert_zero)


def add_fsdp(convert) -> None:
    from ..export.fsdp import convert_fsdp

    p = convert.add_parser(
        "fsdp", help="FSDP2 checkpoint (checkpoint-N/sharded/) -> diffusers transformer folder",
        description="Gather the weights of a cogtune FSDP2 full fine-tune checkpoint, one tensor at a time and "
                    "without a process group, and write them as a diffusers transformer folder (config.json + "
                    "safetensors, sharded past --max-shard-size).")
    _full_model(p, "a checkpoint-N folder of an fsdp2 run (or its sharded/)", convert_fsdp)


def _comfyui(args) -> None:
    from ..export.comfyui_model import convert_comfyui, summary

    out, caveats = convert_comfyui(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(summary(out, caveats))


def add_comfyui(convert) -> None:
    p = convert.add_parser(
        "comfyui", help="diffusers transformer folder -> ComfyUI core's single file (Load Diffusion Model)",
        description="Write a diffusers transformer folder (an SFT export, a `lora merge` output, a converted ZeRO/"
                    "FSDP/SAT checkpoint, or a pipeline folder's transformer/) as the single .safetensors file "
                    "ComfyUI core loads from models/diffusion_models/ with its \"Load Diffusion Model\" node: every "
                    "tensor under ComfyUI's names, plus what its model detector needs to pick the variant. A ZeRO, "
                    "FSDP or SAT checkpoint converts to a diffusers folder first (convert zero|fsdp|sat), then here.")
    p.add_argument("src", metavar="SRC", help="diffusers transformer folder, or a pipeline folder (its transformer/)")
    p.add_argument("out", metavar="OUT", help="output file, e.g. my_model.safetensors")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="weights dtype (default: keep the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (atomically)")
    p.set_defaults(func=_comfyui)


def register(sub) -> None:
    from .common import group

    convert = group(sub, "convert", HELP)
    add_sat(convert)
    add_zero(convert)
    add_fsdp(convert)
    add_comfyui(convert)
