"""Check a LoRA against a model folder before loading it, so a mismatch is one clear line instead of a peft traceback.

What is checked, in this order (the first problem found is reported):
1. the file reads (a truncated or foreign file is named as such);
2. the variant it was trained on (`cogtune.variant` metadata) against the model's (read from its configs);
3. the number of transformer blocks it touches against the model's `num_layers`;
4. every LoRA module exists in the model and is a Linear or Conv2d;
5. shapes: lora_A's in-features and lora_B's out-features against the module's.
The model is built on the meta device from its config: no weights are read, any size costs well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import CogtuneError
from .lora_formats import PREFIX, LoraWeights, read_lora
from ..models import transformer_skeleton, variant_of_configs
from ..models.folder import read_json


def _read_json(path: Path) -> dict:
    return read_json(path, "a diffusers config.json")


def transformer_config(model_dir: str | Path) -> tuple[dict, dict | None]:
    """(transformer config, vae config or None) of a pipeline folder or of a bare transformer folder."""
    model_dir = Path(model_dir)
    if (model_dir / "transformer" / "config.json").is_file():
        vae = model_dir / "vae" / "config.json"
        return _read_json(model_dir / "transformer" / "config.json"), _read_json(vae) if vae.is_file() else None
    if (model_dir / "config.json").is_file():
        return _read_json(model_dir / "config.json"), None
    raise CogtuneError(f"model folder {model_dir} has neither transformer/config.json nor config.json: "
                       "give a diffusers pipeline folder or its transformer/ folder")


def model_skeleton(config: dict) -> torch.nn.Module:
    """The transformer of `config` on the meta device (structure and shapes only)."""
    return transformer_skeleton(config)


def _as_lora(lora) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    if isinstance(lora, LoraWeights):
        return lora.state_dict, lora.cogtune, "the LoRA"
    if isinstance(lora, tuple):  # load_lora_any's (state_dict, lora_config, cogtune)
        return lora[0], lora[2], "the LoRA"
    if isinstance(lora, dict):
        return lora, {}, "the LoRA"
    read = read_lora(lora)
    return read.state_dict, read.cogtune, f"LoRA {lora}"


def _modules(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        m = re.fullmatch(r"(?:transformer\.)?(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise CogtuneError(f"LoRA key {key} is not a diffusers LoRA weight (<module>.lora_A/lora_B.weight)")
        out.setdefault(m.group(1), {})[m.group(2)] = tensor
    return out


def _shape_problem(key: str, role: str, tensor: torch.Tensor, name: str, module: torch.nn.Module) -> str | None:
    if isinstance(module, torch.nn.Linear):
        want_in, want_out = (module.in_features,), module.out_features
    else:
        want_in, want_out = (module.in_channels, *module.kernel_size), module.out_channels
    if role == "A" and tuple(tensor.shape[1:]) != want_in:
        have = "x".join(map(str, tensor.shape[1:]))
        return (f"LoRA key {key} has in-features {have}, the model's {name} takes {'x'.join(map(str, want_in))}: "
                "the LoRA was made for a model of another size")
    if role == "B" and tensor.shape[0] != want_out:
        return (f"LoRA key {key} has out-features {tensor.shape[0]}, the model's {name} gives {want_out}: "
                "the LoRA was made for a model of another size")
    return None


def check_lora_compat(lora, model_dir: str | Path) -> None:
    """Raise CogtuneError (one line) if `lora` does not fit the model in `model_dir`; return None if it does.

    `lora`: a LoRA file/folder path (diffusers or ComfyUI format), a `LoraWeights`, `load_lora_any`'s tuple, or a
    diffusers state dict. `model_dir`: a pipeline folder or a transformer folder.
    """
    state_dict, cogtune, what = _as_lora(lora)
    config, vae_config = transformer_config(model_dir)
    variant = variant_of_configs(config, vae_config).name
    trained_on = cogtune.get("cogtune.variant")
    if trained_on and trained_on != variant:
        raise CogtuneError(f"{what} was trained on {trained_on}, model {model_dir} is {variant}: "
                           f"use a {trained_on} model or a LoRA trained on {variant}")

    modules = _modules(state_dict)
    layers = int(config.get("num_layers", 0))
    blocks = [int(m.group(1)) for name in modules if (m := re.match(r"[^.]+\.(\d+)\.", name))]  # <blocks>.N.
    if blocks and max(blocks) >= layers:
        raise CogtuneError(f"{what} has {max(blocks) + 1} blocks, model {model_dir} has {layers}: "
                           "it was made for a deeper model (another variant or size)")

    named = dict(model_skeleton(config).named_modules())
    for name, parts in sorted(modules.items()):
        key = f"{PREFIX}{name}.lora_{'A' if 'A' in parts else 'B'}.weight"
        module = named.get(name)
        if module is None:
            raise CogtuneError(f"LoRA key {key} matches no module of the model in {model_dir}")
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            raise CogtuneError(f"LoRA key {key} targets a {type(module).__name__}; "
                               "LoRA can only adapt Linear and Conv2d modules")
        if set(parts) != {"A", "B"}:
            raise CogtuneError(f"LoRA module {name} has lora_{next(iter(parts))} only: the LoRA is incomplete")
        for role, tensor in sorted(parts.items()):
            problem = _shape_problem(f"{PREFIX}{name}.lora_{role}.weight", role, tensor, name, module)
            if problem:
                raise CogtuneError(problem)


# --- the learned positional table: a LoRA trained without it runs only without it --------------------------------

DROP_INFO = "drop_learned_positions"  # the run_info key; in a LoRA's metadata `cogtune.drop_learned_positions`
DROP_META = f"cogtune.{DROP_INFO}"


def cogtune_metadata(lora) -> dict[str, str]:
    """The `cogtune.*` metadata of a LoRA (a path, a LoraWeights), read from the safetensors header only; {} for a
    file that does not read (check_lora_compat names that problem)."""
    if isinstance(lora, LoraWeights):
        return lora.cogtune
    from safetensors import safe_open

    from .lora_formats import resolve_lora_path

    try:
        with safe_open(str(resolve_lora_path(lora)), framework="pt") as f:
            return {k: v for k, v in (f.metadata() or {}).items() if k.startswith("cogtune.")}
    except Exception:  # noqa: BLE001 (safetensors raises its own error types; the full read reports them)
        return {}


def trained_without_table(cogtune: dict[str, str], what: str) -> bool | None:
    """True / False as the LoRA's metadata records it; None when it says nothing (not a cogtune LoRA, or a model
    without a learned positional table)."""
    value = cogtune.get(DROP_META)
    if value is None:
        return None
    if value not in ("true", "false"):
        raise CogtuneError(f"{what}: metadata {DROP_META}={str(value)[:40]!r} is neither true nor false: "
                           "the metadata is damaged; export the LoRA again")
    return value == "true"


def positions_for(facts, loras, names=None):
    """`facts` of the model as `loras` need it built: without its learned positional table when they were trained
    without it. LoRAs that disagree, or a LoRA trained with the table on a model saved without it, are refused."""
    from ..models import without_learned_positions

    if not facts.size_lock_key:  # no table here: a LoRA of another variant is check_lora_compat's to refuse
        return facts
    want: dict[bool, str] = {}
    for i, lora in enumerate(loras):
        what = f"LoRA {names[i] if names else lora}"
        dropped = trained_without_table(cogtune_metadata(lora), what)
        if dropped is not None:
            want.setdefault(dropped, what)
    if len(want) == 2:
        raise CogtuneError(f"{want[True]} was trained without the learned positional table, {want[False]} with it: "
                           "they cannot run on one model; use them apart")
    if want.get(True) and not facts.positions_dropped:
        return without_learned_positions(facts, DROP_META)
    if want.get(False) and facts.positions_dropped:
        raise CogtuneError(f"{want[False]} was trained with the learned positional table, and this {facts.name} model "
                           "runs without it: use the base model it was trained on, or a LoRA trained with "
                           "model.drop_learned_positions=true")
    return facts


def check_pipeline_positions(transformer, lora, what: str) -> None:
    """Refuse (one line) to put a LoRA on a transformer whose learned positional table disagrees with its training:
    with the table on, a LoRA trained without it would run silently at the wrong positions."""
    from ..models import get_variant

    cogtune = cogtune_metadata(lora)
    dropped = trained_without_table(cogtune, what)
    if dropped is None or not cogtune.get("cogtune.variant"):
        return
    try:
        key = get_variant(cogtune["cogtune.variant"]).size_lock_key
    except CogtuneError:
        return
    has_table = bool(getattr(transformer.config, key, False)) if key else False
    if dropped and has_table:
        raise CogtuneError(f"{what} was trained without the learned positional table, but this pipeline's transformer "
                           f"has it ({key}=True): load the transformer with {key}=False (cogtune generate and lora "
                           "merge do so from the LoRA's metadata)")
    if not dropped and key and not has_table:
        raise CogtuneError(f"{what} was trained with the learned positional table, but this pipeline's transformer "
                           f"has none ({key}=False): load the base model as it is")
