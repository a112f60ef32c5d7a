"""Generate videos (T2V and I2V) with the stock diffusers pipeline, with LoRA adapters loaded by name.

Three steps, each usable alone: `resolve_settings` (defaults from the variant, checks that give one clear line),
`build_pipeline` (weights, adapters, dtype, device, offload, VAE tiling/slicing, optional fusing) and `sample`
(one video as float frames in [0, 1]). `generate` chains them and writes the mp4; `--compare` lives in compare.py.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..data.video import write_mp4
from ..dtypes import DTYPES
from ..errors import CogtuneError
from ..export.adapters import LoraSpec, lora_argument, parse_loras  # noqa: F401 (part of this API)

MAX_GUIDANCE = 100.0  # far above any useful scale (6 is usual); larger ones only overflow the latents
MAX_STEPS = 1000  # the schedulers train on 1000 timesteps; sampling cannot take more (checked per model too)
StepCallback = Callable[[int, int], None]  # (steps done, steps in all)


def default_size(model_dir: Path) -> tuple[int, int, int, int]:
    """(frames, height, width, fps): the variant's native ones (a tiny model's are its own)."""
    from ..models import resolve_variant

    v = resolve_variant(model_dir)
    return v.native_frames, v.native_height, v.native_width, v.fps


@dataclass
class Settings:
    """What to sample; `resolve_settings` fills in every None from the model."""

    prompt: str
    negative_prompt: str = ""
    image: Path | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: int | None = None
    steps: int = 50
    seed: int = 0
    guidance_scale: float | None = None  # None: the model's own default


def _given_or(value, default):
    return default if value is None else value  # 0 is a value the checks judge, not "unset"


def model_facts(model_dir: str | Path, loras: Sequence[LoraSpec] = ()):
    """The model's facts as `loras` need it built: without its learned positional table when they were trained
    without it (their metadata says so); LoRAs that disagree are one line."""
    from ..export.lora_compat import positions_for
    from ..models import resolve_variant

    return positions_for(resolve_variant(model_dir), [l.path for l in loras], [str(l.path) for l in loras])


def resolve_settings(model_dir: str | Path, settings: Settings, loras: Sequence[LoraSpec] = ()) -> Settings:
    """Defaults from the variant; a wrong image/frames/size combination is one line, before any weight is read.
    `loras`: the adapters to be loaded (a LoRA trained without the learned positional table frees the size)."""
    model_dir = Path(model_dir)
    variant = model_facts(model_dir, loras)
    d_frames, d_height, d_width, d_fps = variant.native_frames, variant.native_height, variant.native_width, variant.fps
    s = replace(settings, frames=_given_or(settings.frames, d_frames), height=_given_or(settings.height, d_height),
                width=_given_or(settings.width, d_width), fps=_given_or(settings.fps, d_fps),
                guidance_scale=_given_or(settings.guidance_scale, variant.guidance))
    if variant.i2v and s.image is None:
        raise CogtuneError(f"model {model_dir} is {variant.name} (image-to-video): "
                           "give the first frame with --image PATH")
    if not variant.i2v and s.image is not None:
        raise CogtuneError(f"model {model_dir} is {variant.name} (text-to-video) and takes no --image; "
                           "drop --image or use an -i2v model")
    if s.image is not None and not Path(s.image).is_file():
        what = "a folder, not an image file" if Path(s.image).is_dir() else "no such file"
        raise CogtuneError(f"--image {s.image}: {what}")
    problem = variant.check_frames(s.frames)
    if problem:
        raise CogtuneError(f"--frames: {problem}")
    for flag, value in (("--height", s.height), ("--width", s.width), ("--fps", s.fps)):
        if value < 1:
            raise CogtuneError(f"{flag} {value}: give a positive number, or leave it out for the model's own")
    unit = variant.size_multiple
    if s.height % unit or s.width % unit:
        raise CogtuneError(f"--height/--width {s.height}x{s.width}: both must be multiples of {unit} for {variant.name}")
    if variant.fixed_resolution and (s.height, s.width) != (d_height, d_width):
        raise CogtuneError(f"{variant.name} has learned positional embeddings and only takes {d_height}x{d_width}, "
                           f"not {s.height}x{s.width}: drop --height/--width, or use a LoRA trained with "
                           "model.drop_learned_positions=true")
    timesteps = _train_timesteps(model_dir)
    if not 1 <= s.steps <= timesteps:
        raise CogtuneError(f"--steps {s.steps}: give 1 to {timesteps} (the scheduler's training timesteps)")
    if not (math.isfinite(s.guidance_scale) and 0 <= s.guidance_scale <= MAX_GUIDANCE):
        raise CogtuneError(f"--guidance-scale {s.guidance_scale}: give a finite number from 0 to {MAX_GUIDANCE:g} "
                           f"({variant.guidance:g} is the model's default)")
    if not 0 <= s.seed < 2**64:
        raise CogtuneError(f"--seed {s.seed}: give a whole number from 0 to 2**64 - 1")
    if s.image is not None:
        load_image(s.image, s.height, s.width)  # a file that is no image: one line now, not after loading weights
    return s


def _train_timesteps(model_dir: Path) -> int:
    from ..models.folder import read_json

    cfg = read_json(model_dir / "scheduler" / "scheduler_config.json", "the scheduler's config")
    steps = cfg.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise CogtuneError(f"{model_dir / 'scheduler' / 'scheduler_config.json'}: num_train_timesteps={steps!r} is "
                           "not a positive whole number; fetch the scheduler config again")
    return steps


def check_video_out(out: str | Path) -> Path:
    """`--out` as a Path, if an mp4 can be written there: one line now instead of a traceback after sampling."""
    from ..export.shards import check_can_create

    out = Path(out)
    if out.is_dir():
        raise CogtuneError(f"--out {out} is a folder: give a file name in it, e.g. {out / 'video.mp4'}")
    if out.suffix.lower() != ".mp4":
        raise CogtuneError(f"--out {out}: the video is written as H.264 mp4; give a path ending in .mp4")
    check_can_create(out, "--out")
    return out


def pick_dtype(name: str | None, cuda: bool) -> torch.dtype:
    """None: bf16 with CUDA, fp32 without (CPU bf16 works but is slow; fp16 on CPU is not supported)."""
    if name is None:
        return torch.bfloat16 if cuda else torch.float32
    if name not in DTYPES:
        raise CogtuneError(f"--dtype {name}: use one of {', '.join(DTYPES)}")
    if name == "fp16" and not cuda:
        raise CogtuneError("--dtype fp16 needs a CUDA GPU and none is available: use --dtype fp32 or bf16 on the CPU")
    return DTYPES[name]


def activate_adapters(pipe, loras: Sequence[LoraSpec]) -> None:
    """Make exactly `loras` (at their weights) active; none: the base model. Nothing is reloaded."""
    if not loras:
        if getattr(pipe.transformer, "peft_config", None):
            pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters([l.name for l in loras], [l.weight for l in loras])


def build_pipeline(model_dir: str | Path, loras: Sequence[LoraSpec] = (), dtype: str | None = None,
                   device: str | None = None, cpu_offload: bool = False, vae_tiling: bool = False,
                   vae_slicing: bool = False, fuse: bool = False, log: Callable[[str], None] | None = None,
                   facts=None):
    """The stock pipeline of `model_dir` with `loras` loaded as named adapters and active at their weights.

    `facts`: build the model as these say (`model_facts` of adapters to be loaded later), not as `loras` say.
    `fuse`: merge the active adapters into the transformer weights, then drop the adapter layers (faster sampling;
    the adapters can no longer be switched).
    """
    from diffusers import DiffusionPipeline

    from ..export.lora_compat import DROP_META, check_lora_compat

    log = log or (lambda msg: print(msg, file=sys.stderr))
    model_dir = Path(model_dir)
    from ..models import config_changes, load_transformer, resolve_variant

    resolve_variant(model_dir)  # clear error for a folder that is not a pipeline cogtune knows
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise CogtuneError(f"device {device}: no CUDA GPU is available here; leave the device unset to use the CPU")
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    torch_dtype = pick_dtype(dtype, cuda)
    for lora in loras:  # all checked before the slow load: one clear line instead of a shape error inside peft
        check_lora_compat(lora.path, model_dir)
    facts = facts or model_facts(model_dir, loras)
    from .. import quiet_libraries

    quiet_libraries()
    parts, changes = {}, config_changes(model_dir / "transformer", facts)
    if changes:  # the LoRAs were trained without the learned positional table
        log(f"note: the LoRA was trained without the learned positional table (its {DROP_META}), so the model is "
            f"built without it too ({', '.join(f'{k}={v}' for k, v in changes.items())})")
        parts["transformer"] = load_transformer(model_dir / "transformer", torch_dtype, facts)
    pipe = DiffusionPipeline.from_pretrained(str(model_dir), dtype=torch_dtype, local_files_only=True,
                                             use_safetensors=True, **parts)
    load_adapters(pipe, loras)
    activate_adapters(pipe, loras)
    if fuse and loras:
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[l.name for l in loras])
        pipe.unload_lora_weights()
    if vae_tiling:
        pipe.vae.enable_tiling()
    if vae_slicing:
        pipe.vae.enable_slicing()
    if cpu_offload and cuda:
        pipe.enable_model_cpu_offload()
    else:
        if cpu_offload:
            log("note: --cpu-offload needs CUDA; ignored on the CPU")
        pipe.to(device or ("cuda" if cuda else "cpu"))
    return pipe


def load_adapters(pipe, loras: Sequence[LoraSpec]) -> None:
    """Load `loras` into `pipe` as named adapters (check each with `check_lora_compat` first)."""
    from ..export.lora_formats import load_lora_into_pipeline

    with warnings.catch_warnings():  # peft warns on every adapter after the first; several are what we want here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for lora in loras:
            load_lora_into_pipeline(pipe, lora.path, lora.name)


def load_image(path: str | Path, height: int, width: int):
    """The I2V first frame, scaled to cover height x width and centre-cropped (the pipeline would stretch it)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # Pillow only warns below twice its pixel limit; refuse there too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return ImageOps.fit(img.convert("RGB"), (width, height), Image.Resampling.LANCZOS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise CogtuneError(f"--image {path}: too many pixels to decode safely ({e.args[0].split(',')[0]}): "
                           f"scale it down, e.g. to {width}x{height}") from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise CogtuneError(f"--image {path}: cannot read it as an image ({e.__class__.__name__})") from None


def encode_prompt(pipe, s: Settings) -> dict[str, torch.Tensor | None]:
    """Prompt embeddings, computed once when several videos share a prompt (the text encoder is the slow part)."""
    with torch.no_grad():  # as inside the pipeline's call: the text encoder takes other kernels with autograd on
        positive, negative = pipe.encode_prompt(s.prompt, s.negative_prompt, device=pipe._execution_device,
                                                do_classifier_free_guidance=s.guidance_scale > 1)
    return {"prompt_embeds": positive, "negative_prompt_embeds": negative}


def sample(pipe, s: Settings, on_step: StepCallback | None = None, embeds: dict | None = None,
           progress: bool = True) -> np.ndarray:
    """One video for resolved settings `s`: float32 [F, H, W, 3] in [0, 1]. The seed fixes it, whatever the device."""
    extra = {}
    if s.image is not None:
        extra["image"] = load_image(s.image, s.height, s.width)
    if on_step is not None:
        def callback(_pipe, i, _t, _kwargs):
            on_step(i + 1, s.steps)
            return {}
        extra["callback_on_step_end"] = callback
    prompt = embeds or {"prompt": s.prompt, "negative_prompt": s.negative_prompt}
    pipe.set_progress_bar_config(disable=not progress)
    with torch.no_grad():
        result = pipe(
            **prompt, num_frames=s.frames, height=s.height, width=s.width, num_inference_steps=s.steps,
            guidance_scale=s.guidance_scale, generator=torch.Generator().manual_seed(s.seed), output_type="np", **extra,
        )
    video = np.asarray(result.frames[0], dtype=np.float32)
    if not np.isfinite(video).all():  # it would be written as a black video with exit 0
        raise CogtuneError("the sampled video has NaN/inf values, nothing was written: the weights overflow in this "
                           "dtype (try --dtype fp32 or bf16) or a --lora weight is too large")
    return video


def generate(model: str | Path, prompt: str, out: str | Path, loras: Sequence[str] = (),
             image: str | Path | None = None, negative_prompt: str = "", frames: int | None = None,
             height: int | None = None, width: int | None = None, steps: int = 50, seed: int = 0,
             guidance_scale: float | None = None, fps: int | None = None,
             dtype: str | None = None, device: str | None = None, cpu_offload: bool = False, vae_tiling: bool = False,
             vae_slicing: bool = False, fuse: bool = False, on_step: StepCallback | None = None,
             progress: bool = True) -> Path:
    """Write one mp4 (atomically) for `prompt` (and `image` for I2V models) with `loras` (`PATH[:WEIGHT][@NAME]`)."""
    image = Path(image) if image else None
    specs = parse_loras(loras)
    settings = resolve_settings(model, Settings(prompt, negative_prompt, image, frames, height, width, fps, steps, seed,
                                                guidance_scale), specs)
    out = check_video_out(out)
    pipe = build_pipeline(model, specs, dtype, device, cpu_offload, vae_tiling, vae_slicing, fuse)
    video = sample(pipe, settings, on_step, progress=progress)
    return write_mp4(video, out, settings.fps, value_range=(0.0, 1.0))
