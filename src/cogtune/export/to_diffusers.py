"""What every checkpoint converter (`convert zero`, `convert fsdp`) shares: checking the checkpoint against the base
model it was trained from, and writing a verified diffusers transformer folder from it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from cogtune.errors import CogtuneError
from cogtune.export.shards import (CONFIG_NAME, ShardWriter, TensorSpec, model_specs, resolve_dtype, shape_problems,
                                   staged_folder, target_dtype, verify_transformer_folder)

LORA_MARKERS = ("lora_A", "lora_B", ".base_layer.", "lora_embedding")


def base_transformer(base_model_dir: str | Path) -> tuple[Path, dict[str, TensorSpec]]:
    """(config.json path, {key: shape/dtype} of the model it builds) of a pipeline or transformer folder."""
    base = Path(base_model_dir)
    config_path = next((p for p in (base / "transformer" / CONFIG_NAME, base / CONFIG_NAME) if p.is_file()), None)
    if config_path is None:
        raise CogtuneError(f"no transformer/{CONFIG_NAME} or {CONFIG_NAME} in {base}: pass --base a diffusers "
                           "pipeline folder or its transformer/ folder")
    try:
        return config_path, model_specs(json.loads(config_path.read_text()))
    except CogtuneError as e:
        raise CogtuneError(f"{config_path}: {e}") from None


def refuse_lora(names: Iterable[str], where: Path, command: str) -> None:
    lora = next((n for n in names if any(m in n for m in LORA_MARKERS)), None)
    if lora is not None:
        raise CogtuneError(f"{where} is a LoRA training checkpoint ({lora}): {command} exports full fine-tunes; "
                           "export the LoRA adapter instead")


def name_prefix(names: list[str], expected: dict[str, TensorSpec]) -> str:
    """The wrapper prefix ('module.', '_orig_mod.', 'transformer.', ...) to strip from checkpoint names, or ''."""
    for name in names:
        if name in expected:
            return ""
        for key in expected:
            if name.endswith("." + key):
                prefix = name[:-len(key)]
                if all(n.startswith(prefix) for n in names):
                    return prefix
    return ""


def check_fits(ckpt: dict[str, tuple[int, ...]], expected: dict[str, TensorSpec], where: Path, base: Path) -> None:
    problems = shape_problems(ckpt, {k: s.shape for k, s in expected.items()}, "checkpoint", "base")
    if problems:
        hint = "pass --base the model this checkpoint was trained from"
        if len(problems) == 1 and "keys missing" in problems[0]:
            hint += " (or it was saved without its frozen weights: exclude_frozen_parameters)"
        raise CogtuneError(f"checkpoint {where} does not fit the base model {base}: {'; '.join(problems)}; {hint}")


def fit_base(ckpt: dict[str, tuple[int, ...]], config_path: Path, expected: dict[str, TensorSpec],
             where: Path) -> tuple[dict | None, dict[str, TensorSpec]]:
    """check_fits, except that a full fine-tune trained without the base's learned positional table
    (model.drop_learned_positions) fits the base built without it: (the config to write instead of the base's, or
    None; the keys and shapes expected)."""
    if not shape_problems(ckpt, {k: s.shape for k, s in expected.items()}, "checkpoint", "base"):
        return None, expected
    from ..models import variant_of_configs, without_learned_positions

    config = json.loads(config_path.read_text())
    try:
        facts = without_learned_positions(variant_of_configs(config))
    except CogtuneError:  # no such table (or no known variant): the base's own check speaks
        facts = None
    if facts is not None:
        dropped = config | facts.transformer_overrides()
        alt = model_specs(dropped)
        if not shape_problems(ckpt, {k: s.shape for k, s in alt.items()}, "checkpoint", "base"):
            return dropped, alt
    check_fits(ckpt, expected, where, config_path.parent)
    return None, expected


def write_transformer(out_dir: str | Path, config_path: Path, expected: dict[str, TensorSpec],
                      dtype: str | torch.dtype | None, max_shard_size: int | str, overwrite: bool,
                      fill: Callable[[ShardWriter], None], what: str | None, config: dict | None = None) -> Path:
    """Stage `out_dir` with the base config (or `config`) and the weights `fill(writer)` writes (floating tensors in
    `dtype`, default fp32), verify it holds exactly the expected keys and shapes, then move it in place. `what`: the
    source, for a summary on stdout (None: quiet)."""
    to = resolve_dtype(dtype) or torch.float32
    specs = {k: TensorSpec(spec.shape, target_dtype(spec.dtype, to)) for k, spec in expected.items()}
    with staged_folder(out_dir, overwrite) as tmp:
        if config is None:
            (tmp / CONFIG_NAME).write_bytes(config_path.read_bytes())
        else:
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        with ShardWriter(tmp, specs, max_shard_size) as writer:
            fill(writer)
        verify_transformer_folder(tmp, {k: s.shape for k, s in expected.items()})
        files = sorted(p.name for p in tmp.iterdir())
    if what is not None:
        params = sum(s.numel for s in specs.values())
        print(f"converted {what} -> {out_dir}: {len(specs)} tensors, {params:,} parameters, "
              f"{str(to).removeprefix('torch.')}; files:", *files, sep="\n  ")
    return Path(out_dir)


