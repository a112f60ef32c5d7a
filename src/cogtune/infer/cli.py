"""`cogtune generate`: the command line over generate.py (one video) and compare.py (base against adapters)."""

from __future__ import annotations

from ..errors import CogtuneError
from ..export.adapters import lora_argument
from .generate import DTYPES, MAX_GUIDANCE, MAX_STEPS, generate


def add_sampling_args(p) -> None:
    """Arguments shared by `generate` and `ui` (the model and its adapters)."""
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT][@NAME]", type=lora_argument,
                   help="LoRA file or folder, repeatable; WEIGHT defaults to 1.0, NAME to lora<i>")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 with CUDA, fp32 on the CPU")
    p.add_argument("--cpu-offload", action="store_true", help="keep idle parts on the CPU (CUDA only)")
    p.add_argument("--vae-tiling", action="store_true", help="decode in tiles (less memory at large sizes)")
    p.add_argument("--vae-slicing", action="store_true", help="decode one video at a time")


def _cmd_generate(args) -> None:
    common = dict(
        negative_prompt=args.negative_prompt, frames=args.frames, height=args.height, width=args.width,
        steps=args.steps, seed=args.seed, guidance_scale=args.guidance_scale, fps=args.fps, dtype=args.dtype,
        cpu_offload=args.cpu_offload, vae_tiling=args.vae_tiling, vae_slicing=args.vae_slicing,
    )
    if args.compare:
        from .compare import compare

        if args.fuse:
            raise CogtuneError("--fuse and --compare do not mix: --compare switches adapters, fusing freezes them")
        video, sheet = compare(args.model, args.prompt, args.out, args.lora, image=args.image, **common)
        print(f"wrote {video} and {sheet}")
        return
    path = generate(args.model, args.prompt, args.out, args.lora, image=args.image, fuse=args.fuse, **common)
    print(f"wrote {path}")


def register_cli(subparsers) -> None:
    """`cogtune generate`: T2V/I2V with named adapters, optional fusing, or a side-by-side comparison."""
    from ..cli_types import SEED, float_range, int_range

    g = subparsers.add_parser("generate", help="generate a video (T2V or I2V) with optional LoRA adapters")
    g.add_argument("--model", required=True, help="diffusers pipeline folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", required=True, help="output .mp4 (--compare also writes <out>.png)")
    g.add_argument("--image", help="first frame for an image-to-video (-i2v) model; required there")
    add_sampling_args(g)
    g.add_argument("--fuse", action="store_true", help="merge the adapters into the weights before sampling")
    g.add_argument("--compare", action="store_true",
                   help="base, each adapter alone and all together, same seed: one side-by-side mp4 + a PNG sheet")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--frames", type=int_range(1, 1000), help="default: the variant's native count")
    g.add_argument("--height", type=int_range(16, 4096), help="default: the variant's native size")
    g.add_argument("--width", type=int_range(16, 4096))
    g.add_argument("--fps", type=int_range(1, 240), help="default: the variant's native fps")
    g.add_argument("--steps", type=int_range(1, MAX_STEPS), default=50)
    g.add_argument("--seed", type=SEED, default=0, help="0 to 2**64 - 1")
    g.add_argument("--guidance-scale", type=float_range(0, MAX_GUIDANCE), help="default: the model's own")
    g.set_defaults(func=_cmd_generate)
