"""`cogtune data synth|cache|check`."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "dataset tools"


def _synth(args) -> None:
    from ..data.synth import write_synth_dataset

    written = write_synth_dataset(args.dir, clips=args.clips, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {len(written)} clips to {args.dir} (prompts.txt, videos.txt, videos/)")


def _cache(args) -> None:
    from ..config import fill_native_shape, load_config
    from ..models import load_spec, resolve_variant
    from ..train.distributed import make_accelerator
    from ..train.encode import cache_root, prepare_data
    from ..train.memory import encoder_dtype

    cfg = load_config(args.config, args.overrides)
    accelerator = make_accelerator(cfg)  # under torchrun each rank encodes its own share
    enc = encoder_dtype(cfg, accelerator.device)
    facts = resolve_variant(cfg.model.path, cfg.model.variant, drop_positions=cfg.model.drop_learned_positions)
    spec = load_spec(cfg.model.path, facts, {"text_encoder": enc, "vae": enc, "transformer": enc})
    fill_native_shape(cfg, spec.facts)  # as training does, so that training finds this cache
    spec.set_vae_memory(slicing=cfg.memory.vae_slicing, tiling=cfg.memory.vae_tiling)
    spec.encoders_to(accelerator.device, enc, stream_text=cfg.memory.stream_text_encoder)
    data = prepare_data(spec, cfg, accelerator)
    if accelerator.is_main_process:
        print(f"cache {cache_root(cfg)}: {len(data.dataset)} clips ready, {len(data.skipped)} skipped; "
              f"{data.report.summary()}")


def _preview(args) -> None:
    from ..config import load_config
    from ..train.preview import write_preview

    cfg = load_config(args.config, args.overrides)
    index = write_preview(cfg, args.out, args.clips)
    print(f"wrote {index} and a video and contact sheet per clip in {args.out}")


def model_facts(model_cfg):
    """(fps, allowed frame counts, native (frames, height, width), why it takes no still images or None) of a
    config's model for `data check`, or None without a folder or variant (data/ knows no model: the command hands
    these in)."""
    from ..models import get_variant, resolve_variant

    if os.path.exists(model_cfg.path):  # the folder's own configs decide; a model.variant must agree with them
        v = resolve_variant(model_cfg.path, model_cfg.variant, weights=False)
    elif model_cfg.variant:
        v = get_variant(model_cfg.variant)
    else:
        return None
    return v.fps, v.allowed_frames(), (v.native_frames, v.native_height, v.native_width), v.check_still()


def _check(args) -> None:
    from ..data.check import run_check

    runs = [args]
    if args.config and not args.root:
        from ..config import load_config

        data = load_config(args.config).data
        if data.datasets:  # every dataset with its own settings
            weights, held = data.weights(), data.heldout_names()
            runs = [argparse.Namespace(**{**vars(args), "root": str(d.root), "dataset": d, "title": name,
                                          "json": f"{args.json}.{name}.json" if args.json else None,
                                          "share": "held out" if name in held else f"weight {weights[name]:g}"
                                          if name in weights else f"repeats {r}", "how": d.frames_line()})
                    for name, d, r in data.entries()]
    code = 0
    for one in runs:
        if getattr(one, "title", None):
            print(f"dataset {one.title} ({one.root}): {one.share}; {one.how}"
                  + (f"; trigger {one.dataset.trigger}" if one.dataset.trigger else ""))
        code = max(code, run_check(one))
    if code:
        sys.stdout.flush()
        raise SystemExit(code)


def _counts(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected frame counts like 49,33,17, got {text!r}") from None


def add_check(data_subparsers) -> argparse.ArgumentParser:
    from ..data import check
    from ..data.frames import SAMPLING_MODES, SHORT_POLICIES, WINDOWS

    p = data_subparsers.add_parser("check", help="check every clip of a dataset and report problems",
                                   description=check.__doc__.split("\n\n")[0])
    p.add_argument("root", nargs="?", help="dataset folder or table file (default: data.root of --config)")
    p.add_argument("--config", help="training YAML: its data.* settings are used (flags override them)")
    p.add_argument("--frames", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--sampling", choices=SAMPLING_MODES)
    p.add_argument("--fps", type=float, help="target fps for --sampling fps (the model's native fps, e.g. 8 or 16)")
    p.add_argument("--short", choices=SHORT_POLICIES, help="short-clip policy (default skip)")
    p.add_argument("--window", choices=WINDOWS)
    p.add_argument("--allowed", type=_counts, help="frame counts for --short smaller, e.g. 49,33,17")
    p.add_argument("--json", metavar="REPORT.json", help="also write the reports as JSON")
    p.add_argument("--decode", action="store_true", help="decode every frame (slower; finds corrupt data)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any clip has a problem")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0, help="seed of random windows (span only)")
    p.set_defaults(func=_check, model_facts=model_facts)
    return p


def register(sub) -> None:
    from .argtypes import SEED, int_range

    d = sub.add_parser("data", help=HELP).add_subparsers(dest="data_command", required=True)
    s = d.add_parser("synth", help="write a small synthetic dataset of real H.264 clips (official layout)")
    s.add_argument("dir")
    s.add_argument("--clips", type=int_range(1, 10_000), default=8)
    s.add_argument("--seed", type=SEED, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_synth)
    c = d.add_parser("cache", help="encode every clip and caption of a training config into the latent cache")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*", metavar="key=value")
    c.set_defaults(func=_cache)
    add_check(d)
    v = d.add_parser("preview", help="write the frames training will encode (mp4 + contact sheet per clip, index.json)")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*", metavar="key=value")
    v.add_argument("--out", required=True, help="folder for the previews")
    v.add_argument("--clips", type=int_range(1, 100_000), default=8, help="how many clips of each dataset (default 8)")
    v.set_defaults(func=_preview)
