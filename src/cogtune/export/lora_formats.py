"""LoRA files in the diffusers and ComfyUI formats: read either into one canonical form, write either.

Canonical form (`LoraWeights`): diffusers/peft keys `transformer.<module>.lora_A.weight` / `.lora_B.weight` (tensors
untouched, so conversions are bit-exact), the alpha of every module, the peft LoraConfig kwargs, and `cogtune.*`.

ComfyUI format: keys `diffusion_model.<comfy module>.lora_down.weight` (= lora_A), `.lora_up.weight` (= lora_B) and a
scalar `.alpha`; `lora_A`/`lora_B` names are read too. ComfyUI applies W += strength * alpha/rank * up @ down
(rank = lora_down.shape[0]; no `.alpha` means scale 1). Sources (checked 2026-11):
- module names: ComfyUI core's native CogVideoX model, comfy/ldm/cogvideo/model.py (comfyanonymous/ComfyUI):
  `blocks.N.{q,k,v,attn_out,norm_q,norm_k,ff_proj,ff_out,norm1.linear,norm1.norm,norm2.linear,norm2.norm}`,
  `patch_embed.{proj,text_proj}`, `time_embedding_linear_{1,2}`, `ofs_embedding_linear_{1,2}`, `norm_final`,
  `norm_out.{linear,norm}`, `proj_out`.
- key map: comfy/lora.py `model_lora_keys_unet` maps the generic key `diffusion_model.<name>` to the weight
  `diffusion_model.<name>.weight` for every model; it has no CogVideoX branch, so diffusers-named CogVideoX LoRAs
  (`transformer.transformer_blocks...`) do not load in ComfyUI core and must be converted.
- adapter: comfy/weight_adapter/lora.py (`LoRAAdapter.load` / `calculate_weight`).
The ComfyUI file also carries the diffusers LoraConfig and `cogtune.*` in its safetensors metadata (ComfyUI ignores
it), which makes diffusers -> ComfyUI -> diffusers give back the same tensors and the same metadata.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CogtuneError, bounded

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
COMFY_NAME = "lora_comfyui.safetensors"
ADAPTER_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PREFIX = "transformer."
COMFY_PREFIX = "diffusion_model."
FORMATS = ("diffusers", "comfyui")

# diffusers module (inside the transformer) <-> ComfyUI native module; blocks: transformer_blocks.N <-> blocks.N
_BLOCK_NAMES = {
    "attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v", "attn1.to_out.0": "attn_out",
    "attn1.norm_q": "norm_q", "attn1.norm_k": "norm_k", "ff.net.0.proj": "ff_proj", "ff.net.2": "ff_out",
    "norm1.linear": "norm1.linear", "norm1.norm": "norm1.norm",
    "norm2.linear": "norm2.linear", "norm2.norm": "norm2.norm",
}
_TOP_NAMES = {
    "patch_embed.proj": "patch_embed.proj", "patch_embed.text_proj": "patch_embed.text_proj",
    "time_embedding.linear_1": "time_embedding_linear_1", "time_embedding.linear_2": "time_embedding_linear_2",
    "ofs_embedding.linear_1": "ofs_embedding_linear_1", "ofs_embedding.linear_2": "ofs_embedding_linear_2",
    "norm_final": "norm_final", "norm_out.linear": "norm_out.linear", "norm_out.norm": "norm_out.norm",
    "proj_out": "proj_out",
}
_BLOCK_NAMES_BACK = {v: k for k, v in _BLOCK_NAMES.items()}
_TOP_NAMES_BACK = {v: k for k, v in _TOP_NAMES.items()}


def to_comfy_module(module: str) -> str | None:
    """`transformer_blocks.3.attn1.to_q` -> `blocks.3.q`; None for a module ComfyUI's CogVideoX does not have."""
    m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module)
    if m:
        name = _BLOCK_NAMES.get(m.group(2))
        return None if name is None else f"blocks.{m.group(1)}.{name}"
    return _TOP_NAMES.get(module)


_TOP_TENSORS = {"patch_embed.pos_embedding": "patch_embed.pos_embedding"}  # tensors that are no module's parameter


def to_comfy_key(key: str) -> str | None:
    """A full model's state-dict key in ComfyUI's names (`<module>.weight` via `to_comfy_module`); None if ComfyUI's
    model has no such tensor."""
    if key in _TOP_TENSORS:
        return _TOP_TENSORS[key]
    module, _, leaf = key.rpartition(".")
    comfy = to_comfy_module(module) if module else None
    return None if comfy is None else f"{comfy}.{leaf}"


def from_comfy_module(module: str) -> str | None:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
    if m:
        name = _BLOCK_NAMES_BACK.get(m.group(2))
        return None if name is None else f"transformer_blocks.{m.group(1)}.{name}"
    return _TOP_NAMES_BACK.get(module)


@dataclass
class LoraWeights:
    """A LoRA in canonical form; `state_dict` keys are `transformer.<module>.lora_{A,B}.weight`."""

    state_dict: dict[str, torch.Tensor]
    alphas: dict[str, float]  # module -> alpha
    lora_config: dict  # peft LoraConfig kwargs, no prefix
    cogtune: dict[str, str] = field(default_factory=dict)  # "cogtune.*" metadata
    extra: dict[str, str] = field(default_factory=dict)  # other metadata, kept as is (e.g. "format")
    source_format: str = "diffusers"
    alpha_stored: bool = True  # False: the file records no alpha (alphas are then `assume_alpha` or the rank)

    @property
    def modules(self) -> list[str]:
        return sorted(self.alphas)

    def rank(self, module: str) -> int:
        return int(self.state_dict[f"{PREFIX}{module}.lora_A.weight"].shape[0])

    def adapter_metadata(self) -> dict:
        """The LoraConfig as diffusers reads it from a file (keys prefixed with `transformer.`)."""
        return {PREFIX + k: v for k, v in self.lora_config.items()}


# --- reading --------------------------------------------------------------------------------------------------


def resolve_lora_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        if (path / WEIGHT_NAME).is_file():
            return path / WEIGHT_NAME
        if (path / "trainer_state.json").is_file():  # a cogtune checkpoint-N written before they held LoRA files
            raise CogtuneError(f"{path} is a cogtune checkpoint from before checkpoints held LoRA files: resume it "
                               f"(resume={path}) with max_steps one higher to get its LoRA, or use the run's lora/")
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise CogtuneError(f"LoRA folder {path} holds {len(found)} .safetensors files and no {WEIGHT_NAME}: "
                           "give the file itself")
    if not path.is_file():
        raise CogtuneError(f"LoRA {path}: no such file (give a .safetensors file or a folder holding {WEIGHT_NAME})")
    if path.suffix != ".safetensors":
        raise CogtuneError(f"LoRA {path} is not a .safetensors file; SAT checkpoints (.pt) convert with "
                           "`cogtune convert sat CKPT OUT --variant V`")
    return path


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata; a damaged or foreign file gives one clear line."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled headers and data
        reason = " ".join(str(e).split())[:160]
        raise CogtuneError(f"LoRA file {path} is damaged or not a safetensors file ({reason}); "
                           "copy or export it again") from None
    return tensors, metadata


def _split_key(key: str, suffixes: dict[str, str]) -> tuple[str, str] | None:
    for suffix, role in suffixes.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


_DIFFUSERS_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}
_COMFY_SUFFIXES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".lora_A.weight": "A", ".lora_B.weight": "B",
                   ".alpha": "alpha"}


KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")  # kohya sd-scripts style, used by VideoX-Fun and musubi
PEFT_PREFIX = "base_model.model."  # peft's own save_pretrained
SIDECAR = "adapter_config.json"  # peft's LoraConfig beside adapter_model.safetensors (peft, diffusion-pipe)


def _kohya_module(name: str) -> str | None:
    """`blocks_3_q` (ComfyUI names) or the diffusers module name (`..._blocks_3_attn1_to_q`), dots written as
    underscores → the ComfyUI module `blocks.3.q`; None if it names no module of the model."""
    m = re.fullmatch(r"(?:transformer_)?blocks_(\d+)_(.+)", name)
    if m:
        return next((f"blocks.{m[1]}.{comfy}" for ours, comfy in _BLOCK_NAMES.items()
                     if m[2] in (ours.replace(".", "_"), comfy.replace(".", "_"))), None)
    return next((comfy for ours, comfy in _TOP_NAMES.items() if name in (ours.replace(".", "_"),
                                                                         comfy.replace(".", "_"))), None)


def normalize_layout(tensors: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Keys of the LoRA layouts other trainers write, renamed to the diffusers or ComfyUI format (tensors
    untouched; the scale rules are the same: kohya's alpha/rank is ComfyUI's); and the layout's name."""
    keys = list(tensors)
    if keys and all(k.startswith(KOHYA_PREFIXES) for k in keys):
        out = {}
        for key, tensor in tensors.items():
            name, _, rest = key.partition(".")
            module = _kohya_module(name.removeprefix("lora_unet_").removeprefix("lora_transformer_"))
            if module is None or rest not in ("lora_down.weight", "lora_up.weight", "alpha"):
                raise CogtuneError(f"LoRA file {path}: kohya-style key {bounded(repr(key))} names no module of "
                                   "the model (in ComfyUI's names or diffusers') or no plain LoRA weight (lora_down/lora_up/alpha)")
            out[f"{COMFY_PREFIX}{module}.{rest}"] = tensor
        return out, "kohya"
    after = [_split_key(k[len(COMFY_PREFIX):], _DIFFUSERS_SUFFIXES) if k.startswith(COMFY_PREFIX) else None
             for k in keys]
    if keys and all(a and to_comfy_module(a[0]) for a in after) and any(from_comfy_module(a[0]) is None
                                                                         for a in after):
        # diffusion-pipe: ComfyUI's prefix on diffusers module names (proj_out and a few others read the same)
        return {PREFIX + k[len(COMFY_PREFIX):]: v for k, v in tensors.items()}, "diffusion-pipe"
    if keys and all(k.startswith(PEFT_PREFIX) for k in keys):
        return {PREFIX + k[len(PEFT_PREFIX):]: v for k, v in tensors.items()}, "peft"
    if keys and not any(k.startswith((PREFIX, COMFY_PREFIX)) for k in keys) and all(
            _split_key(k, _DIFFUSERS_SUFFIXES) for k in keys):  # peft names without the `transformer.` prefix
        return {PREFIX + k: v for k, v in tensors.items()}, "peft"
    return tensors, ""


def sidecar_config(path: Path) -> dict | None:
    """The peft LoraConfig saved beside a LoRA file (adapter_config.json), checked, or None."""
    side = path.parent / SIDECAR
    if not side.is_file():
        return None
    try:
        text = side.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CogtuneError(f"LoRA {path}: cannot read {side} beside it ({e}); fix or remove it") from None
    return check_adapter_metadata(text, side)


def _detect_format(keys: list[str], path: Path) -> str:
    if not keys:
        raise CogtuneError(f"LoRA file {path} holds no tensors: it is not a LoRA; export it again")
    if all(k.startswith(COMFY_PREFIX) for k in keys):
        return "comfyui"
    if keys and all(k.startswith(PREFIX) or k.startswith("transformer_blocks.") for k in keys):
        return "diffusers"
    sample = next((k for k in keys if not k.startswith((PREFIX, COMFY_PREFIX))), keys[0] if keys else "(none)")
    raise CogtuneError(f"LoRA file {path}: key {bounded(repr(sample))} is neither a diffusers CogVideoX LoRA key "
                       f"({PREFIX}<module>.lora_A.weight) nor a ComfyUI one ({COMFY_PREFIX}<module>.lora_down.weight)")


def check_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor floating point and finite: NaN/inf would sample black videos or merge a model full of NaN."""
    for key in sorted(tensors):
        t = tensors[key]
        if not t.is_floating_point() and not key.endswith(".alpha"):  # a kohya-style alpha may be stored as an int
            raise CogtuneError(f"LoRA file {path}: tensor {bounded(key)} is {str(t.dtype).removeprefix('torch.')}, "
                               "not floating point: the file is damaged or no LoRA; export it again")
        if not bool(torch.isfinite(t).all()):
            bad = "NaN" if bool(torch.isnan(t).any()) else "infinite"
            raise CogtuneError(f"LoRA file {path}: tensor {bounded(key)} holds {bad} values (first bad key): the "
                               "training diverged or the file is damaged; use an earlier checkpoint or export again")


def check_alpha(alpha, where: str) -> float:
    """`alpha` as a float if it is a finite number above 0; else one line naming `where` it comes from."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise CogtuneError(f"{where}: alpha {bounded(alpha)} is not a finite number above 0 (alpha/rank scales the "
                           "LoRA; alpha = rank is scale 1)")
    return float(alpha)


def _check_rank(rank, where: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise CogtuneError(f"{where}: rank {bounded(rank)} is not a whole number of at least 1")
    return rank


def check_adapter_metadata(text: str, path: Path) -> dict:
    """The `lora_adapter_metadata` JSON (the peft LoraConfig) with the types diffusers and peft rely on."""
    where = f"LoRA file {path}: metadata {ADAPTER_KEY}"
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise CogtuneError(f"{where} is not valid JSON ({e.msg}): export the LoRA again, or convert it with "
                           "`cogtune lora convert` after fixing the metadata") from None
    if not isinstance(config, dict):
        raise CogtuneError(f"{where} is a JSON {type(config).__name__}, not an object (a peft LoraConfig): "
                           "export the LoRA again")
    config = {k.removeprefix(PREFIX): v for k, v in config.items()}
    if "r" in config:
        _check_rank(config["r"], f"{where} r")
    if "lora_alpha" in config:
        check_alpha(config["lora_alpha"], f"{where} lora_alpha")
    for name, check in (("rank_pattern", _check_rank), ("alpha_pattern", check_alpha)):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict):
            raise CogtuneError(f"{where} {name} is a {type(pattern).__name__}, not an object (module -> value)")
        for key, value in pattern.items():
            check(value, f"{where} {name}[{bounded(key)}]")
            try:
                re.compile(key)
            except re.error as e:
                raise CogtuneError(f"{where} {name}: key {bounded(key)} is no valid pattern ({e})") from None
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise CogtuneError(f"{where} target_modules is {bounded(targets)}: expected a list of module names")
    if config.get("use_dora"):
        raise CogtuneError(f"{where} says use_dora, but the file holds no DoRA magnitudes: DoRA is not supported")
    return config


def _config_alpha(config: dict, module: str) -> float:
    from peft.utils.other import get_pattern_key

    pattern = config.get("alpha_pattern") or {}
    key = get_pattern_key(list(pattern), module)
    return float(pattern.get(key, config.get("lora_alpha", config.get("r", 8))))


def _config_rank(config: dict, module: str) -> int:
    from peft.utils.other import get_pattern_key

    pattern = config.get("rank_pattern") or {}
    key = get_pattern_key(list(pattern), module)
    return int(pattern.get(key, config.get("r", 8)))


def build_lora_config(ranks: dict[str, int], alphas: dict[str, float]) -> dict:
    """peft LoraConfig kwargs reproducing per-module ranks and alphas exactly (full module paths as targets)."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    return {
        "r": r, "lora_alpha": alpha, "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
        "use_dora": False, "rank_pattern": {f"^{m}": v for m, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {f"^{m}": v for m, v in sorted(alphas.items()) if v != alpha},
    }


def _consistent(config: dict, ranks: dict[str, int], alphas: dict[str, float]) -> bool:
    return all(_config_rank(config, m) == ranks[m]
               and abs(_config_alpha(config, m) - alphas[m]) <= 1e-6 * max(1.0, abs(alphas[m])) for m in ranks)


def read_lora(path: str | Path, assume_alpha: float | None = None) -> LoraWeights:
    """Read a diffusers or ComfyUI CogVideoX LoRA file (or a folder holding one) into canonical form.

    `assume_alpha` is used only for a file that records no alpha at all (diffusers itself then assumes alpha = rank).
    """
    path = resolve_lora_path(path)
    if assume_alpha is not None:
        check_alpha(assume_alpha, "--alpha")
    tensors, metadata = read_safetensors(path)
    tensors, layout = normalize_layout(tensors, path)
    fmt = _detect_format(list(tensors), path)
    layout = layout or fmt
    check_tensors(tensors, path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        bare = key.removeprefix(COMFY_PREFIX if fmt == "comfyui" else PREFIX)
        split = _split_key(bare, _COMFY_SUFFIXES if fmt == "comfyui" else _DIFFUSERS_SUFFIXES)
        if split is None:
            raise CogtuneError(f"LoRA file {path}: key {key!r} is not a plain LoRA weight (expected "
                               f"{'lora_down/lora_up/alpha' if fmt == 'comfyui' else 'lora_A/lora_B'}); "
                               "LyCORIS/DoRA/bias adapters are not supported")
        module, role = split
        if fmt == "comfyui":
            diffusers_module = from_comfy_module(module)
            if diffusers_module is None:
                raise CogtuneError(f"LoRA file {path}: key {key!r} names no module of ComfyUI's CogVideoX model")
            module = diffusers_module
        parts.setdefault(module, {})[role] = tensor
    state_dict: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, p in sorted(parts.items()):
        if "A" not in p or "B" not in p:
            raise CogtuneError(f"LoRA file {path}: module {module} has only lora_{'B' if 'B' in p else 'A'}; "
                               "the file is incomplete")
        a, b = p["A"], p["B"]
        if a.dim() not in (2, 4) or b.dim() != a.dim() or a.shape[0] < 1:
            raise CogtuneError(f"LoRA file {path}: module {module} has lora_A of shape {tuple(a.shape)} and lora_B "
                               f"of shape {tuple(b.shape)}: not a LoRA pair (2-D, or 4-D for a convolution)")
        if a.shape[0] != b.shape[1]:
            raise CogtuneError(f"LoRA file {path}: module {module} has rank {a.shape[0]} in lora_A but "
                               f"{b.shape[1]} in lora_B")
        state_dict[f"{PREFIX}{module}.lora_A.weight"] = a
        state_dict[f"{PREFIX}{module}.lora_B.weight"] = b
        ranks[module] = int(a.shape[0])

    stored = check_adapter_metadata(metadata[ADAPTER_KEY], path) if metadata.get(ADAPTER_KEY) else (
        sidecar_config(path) if layout in ("peft", "diffusion-pipe") else None)
    cogtune = {k: v for k, v in metadata.items() if k.startswith("cogtune.")}
    extra = {k: v for k, v in metadata.items() if k != ADAPTER_KEY and not k.startswith("cogtune.")}
    has_alpha = {m for m, p in parts.items() if "alpha" in p}
    for m in sorted(has_alpha):
        if parts[m]["alpha"].numel() != 1:
            raise CogtuneError(f"LoRA file {path}: the alpha of module {m} has {parts[m]['alpha'].numel()} values, "
                               "not one: the file is damaged; export it again")
        check_alpha(float(parts[m]["alpha"].float().item()), f"LoRA file {path}: module {m}")
    if fmt == "comfyui" and has_alpha:
        alphas = {m: float(parts[m]["alpha"].float().item()) if m in has_alpha else float(ranks[m]) for m in ranks}
        config = stored if stored and _consistent(stored, ranks, alphas) else build_lora_config(ranks, alphas)
        alphas = {m: _config_alpha(config, m) for m in ranks}  # exact values when the stored config agrees
        return LoraWeights(state_dict, alphas, config, cogtune, extra, layout, True)
    if stored is not None:
        bad = next((m for m in sorted(ranks) if _config_rank(stored, m) != ranks[m]), None)
        if bad is not None:
            raise CogtuneError(f"LoRA file {path}: its metadata gives {bad} rank {_config_rank(stored, bad)}, its "
                               f"weights rank {ranks[bad]}: the metadata belongs to another LoRA; export it again")
        return LoraWeights(state_dict, {m: _config_alpha(stored, m) for m in ranks}, stored, cogtune, extra, layout,
                           True)
    alphas = {m: float(assume_alpha) if assume_alpha is not None else float(ranks[m]) for m in ranks}
    config = build_lora_config(ranks, alphas)
    return LoraWeights(state_dict, alphas, config, cogtune, extra, layout, alpha_stored=False)


def load_lora_any(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """(diffusers state dict, peft LoraConfig kwargs, cogtune.* metadata) of a diffusers or ComfyUI LoRA file."""
    lora = read_lora(path)
    return lora.state_dict, lora.lora_config, lora.cogtune


def load_lora_into_pipeline(pipe, path: str | Path, adapter_name: str) -> LoraWeights:
    """Load a LoRA of either format into `pipe.transformer` at its recorded scale, from memory.

    `pipe.load_lora_weights(dict)` drops metadata for a dict input in diffusers 0.42 (its `lora_state_dict` only
    reads metadata from a file), so we call `load_lora_into_transformer(..., metadata=...)`, the step it delegates to.
    """
    from .lora_compat import check_pipeline_positions

    lora = read_lora(path)
    check_pipeline_positions(pipe.transformer, lora, f"LoRA {path}")
    pipe.load_lora_into_transformer(dict(lora.state_dict), transformer=pipe.transformer, adapter_name=adapter_name,
                                    metadata=lora.adapter_metadata(), _pipeline=pipe)
    return lora


# --- writing --------------------------------------------------------------------------------------------------


def output_path(out: str | Path, to: str = "diffusers") -> Path:
    """`out` if it names a .safetensors file, else the file of format `to` inside folder `out`."""
    out = Path(out)
    return out if out.suffix == ".safetensors" else out / (COMFY_NAME if to == "comfyui" else WEIGHT_NAME)


def check_output_file(out: Path, overwrite: bool = True) -> Path:
    """`out` if a LoRA file can be written there (an existing file only with `overwrite`): else one line."""
    from .shards import check_can_create

    if out.is_dir():
        raise CogtuneError(f"output {out} is a folder: give a new .safetensors file name, or the folder without it")
    if out.exists() and not overwrite:
        raise CogtuneError(f"output {out} exists: choose a new path or pass --overwrite to replace it")
    check_can_create(out)
    return out


def _write_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], out: Path,
                  overwrite: bool = True) -> Path:
    from .shards import new_file_mode

    check_output_file(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, new_file_mode())  # safetensors writes 0600: others (e.g. a ComfyUI server) could not read it
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _metadata(lora: LoraWeights) -> dict[str, str]:
    adapter = json.dumps(lora.adapter_metadata(), indent=2, sort_keys=True)
    return {"format": "pt", **lora.extra, ADAPTER_KEY: adapter, **lora.cogtune}


def write_diffusers(lora: LoraWeights, out: str | Path, overwrite: bool = True) -> Path:
    """`out` is a .safetensors path, or a folder that gets `pytorch_lora_weights.safetensors`."""
    return _write_atomic(lora.state_dict, _metadata(lora), output_path(out, "diffusers"), overwrite)


def _family_without_comfyui_names(lora: LoraWeights) -> str | None:
    """The family of the LoRA's variant if cogtune knows no ComfyUI names for it, else None."""
    variant = lora.cogtune.get("cogtune.variant")
    if variant:
        from ..models import all_variants, family

        facts = all_variants().get(variant)
        if facts is not None and not family(facts.family).COMFYUI_LORAS:
            return facts.family
    return None


def to_comfy_state_dict(lora: LoraWeights) -> dict[str, torch.Tensor]:
    unknown = _family_without_comfyui_names(lora)
    if unknown:
        raise CogtuneError(f"LoRA trained on {lora.cogtune['cogtune.variant']}: cogtune does not know ComfyUI's names "
                           f"for {unknown} models yet, so it cannot write the ComfyUI format; use the diffusers file "
                           f"({WEIGHT_NAME}) as it is")
    tensors: dict[str, torch.Tensor] = {}
    for module in lora.modules:
        comfy = to_comfy_module(module)
        if comfy is None:
            raise CogtuneError(f"LoRA module {module} has no counterpart in ComfyUI's CogVideoX model; "
                               "it cannot be written in the ComfyUI format")
        tensors[f"{COMFY_PREFIX}{comfy}.lora_down.weight"] = lora.state_dict[f"{PREFIX}{module}.lora_A.weight"]
        tensors[f"{COMFY_PREFIX}{comfy}.lora_up.weight"] = lora.state_dict[f"{PREFIX}{module}.lora_B.weight"]
        tensors[f"{COMFY_PREFIX}{comfy}.alpha"] = torch.tensor(lora.alphas[module], dtype=torch.float32)
    return tensors


def write_comfyui(lora: LoraWeights, out: str | Path, overwrite: bool = True) -> Path:
    """`out` is a .safetensors path, or a folder that gets `lora_comfyui.safetensors`."""
    return _write_atomic(to_comfy_state_dict(lora), _metadata(lora), output_path(out, "comfyui"), overwrite)


def convert_lora(src: str | Path, out: str | Path, to: str, alpha: float | None = None,
                 overwrite: bool = True) -> tuple[LoraWeights, Path]:
    """(the LoRA read, the file written). OUT may not be the input file itself."""
    if to not in FORMATS:
        raise CogtuneError(f"--to {to}: unknown LoRA format; use one of {', '.join(FORMATS)}")
    src, dest = resolve_lora_path(src), output_path(out, to)
    if dest.exists() and dest.resolve() == src.resolve():
        raise CogtuneError(f"output {dest} is the input LoRA itself: write the converted LoRA to another path")
    lora = read_lora(src, assume_alpha=alpha)  # an alpha recorded in the file wins; `alpha` fills in a missing one
    write = write_comfyui if to == "comfyui" else write_diffusers
    return lora, write(lora, dest, overwrite)


def comfyui_copy(path: str | Path) -> Path | None:
    """Beside a diffusers LoRA file, the same LoRA for ComfyUI core (COMFY_NAME; the tensors themselves, alpha in
    `.alpha`), or None where cogtune knows no ComfyUI names for the model's family."""
    lora = read_lora(path)
    return None if _family_without_comfyui_names(lora) else write_comfyui(lora, Path(path).parent)
