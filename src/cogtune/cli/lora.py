"""`cogtune lora convert|merge`."""

from __future__ import annotations

HELP = "LoRA tools: convert between formats, merge into a model"


def _convert(args) -> None:
    from ..export.lora_formats import convert_lora

    lora, path = convert_lora(args.src, args.out, args.to, args.alpha, overwrite=args.overwrite)
    if not lora.alpha_stored and args.alpha is None:
        print(f"note: {args.src} records no alpha; wrote alpha = rank (scale 1.0, what diffusers assumes); "
              "pass --alpha A if it was trained with another alpha")
    ranks = sorted({lora.rank(m) for m in lora.modules})
    print(f"wrote {args.to} LoRA {path} ({len(lora.modules)} modules, rank {'/'.join(map(str, ranks))}, "
          f"alpha {lora.lora_config.get('lora_alpha')})")


def _merge(args) -> None:
    from ..export.merge import merge_loras

    out = merge_loras(args.model, args.lora, args.out, pipeline=args.pipeline, dtype=args.dtype,
                      max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    what = "pipeline" if args.pipeline else "transformer"
    print(f"merged {len(args.lora)} LoRA(s) into a {what} folder: {out}")


def add_convert(lora) -> None:
    from ..export.lora_formats import FORMATS
    from .argtypes import float_range

    p = lora.add_parser("convert", help="convert a LoRA between the diffusers and ComfyUI formats (alpha kept)")
    p.add_argument("src", metavar="IN", help="LoRA .safetensors file (either format) or a folder holding one")
    p.add_argument("out", metavar="OUT", help="output .safetensors file, or a folder")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--alpha", type=float_range(0, low_open=True),
                   help="alpha for a LoRA that records none (default: rank, as diffusers)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT file")
    p.set_defaults(func=_convert)


def add_merge(lora) -> None:
    from .common import lora_option

    p = lora.add_parser("merge", help="fuse LoRAs into the base transformer and write a standalone model folder")
    p.add_argument("--model", required=True, help="diffusers pipeline folder (or its transformer/ folder)")
    lora_option(p, required=True, help="LoRA file or folder, diffusers or ComfyUI format; repeatable")
    p.add_argument("out", metavar="OUT", help="output folder: transformer folder, or pipeline folder with --pipeline")
    p.add_argument("--pipeline", action="store_true", help="write a full pipeline folder (other components linked)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weights dtype (default: the model's own)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.set_defaults(func=_merge)


def register(sub) -> None:
    from .common import group

    lora = group(sub, "lora", HELP)
    add_convert(lora)
    add_merge(lora)
