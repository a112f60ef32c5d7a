"""`cogtune generate`: the command line over infer/generate.py (one video) and infer/compare.py (base against
adapters)."""

from __future__ import annotations

HELP = "generate a video (T2V or I2V) with optional LoRA adapters"


def _run(args) -> None:
    from ..errors import CogtuneError
    from ..infer.generate import generate

    common = dict(
        negative_prompt=args.negative_prompt, frames=args.frames, height=args.height, width=args.width,
        steps=args.steps, seed=args.seed, guidance_scale=args.guidance_scale, fps=args.fps, dtype=args.dtype,
        cpu_offload=args.cpu_offload, vae_tiling=args.vae_tiling, vae_slicing=args.vae_slicing,
    )
    if args.compare:
        from ..infer.compare import compare

        if args.fuse:
            raise CogtuneError("--fuse and --compare do not mix: --compare switches adapters, fusing freezes them")
        video, sheet = compare(args.model, args.prompt, args.out, args.lora, image=args.image, **common)
        print(f"wrote {video} and {sheet}")
        return
    path = generate(args.model, args.prompt, args.out, args.lora, image=args.image, fuse=args.fuse, **common)
    print(f"wrote {path}")


def register(sub) -> None:
    """T2V/I2V with named adapters, optional fusing, or a side-by-side comparison."""
    from ..infer.generate import MAX_GUIDANCE, MAX_STEPS
    from .argtypes import SEED, float_range, int_range
    from .common import add_sampling_args

    g = sub.add_parser("generate", help=HELP)
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
    g.set_defaults(func=_run)
