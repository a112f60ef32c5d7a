"""Model families, and the registry that finds the family of a model folder.

A family is one module listed in FAMILIES (its light entry: no diffusers at import) that provides
  FAMILY, PIPELINES (the model_index.json `_class_name`s it handles), VARIANTS {name: ModelFacts},
  CONFIG_KEYS (transformer config keys that only its models have: for configs without a `_class_name`),
  get_variant(name), detect_variant(transformer_config, vae_config) -> name (UndetectableVariant for a custom model),
  folder_facts(facts, transformer_config) -> ModelFacts, load_spec(path, facts, dtypes) -> ModelSpec,
  transformer_skeleton(config) -> meta-device module, build_tiny_pipeline(variant, seed), tiny_size(variant),
  memory_configs(name) -> real configs for the planner, or None when it has no memory profile yet,
  OPTIONS: the name of the config section holding the family's own options (validated by it), or None,
  COMFYUI_LORAS: whether export/lora_formats.py knows ComfyUI's names for its modules (LoRAs and full models);
  then also comfyui_extra_tensors(config) -> {diffusers key: tensor} a ComfyUI single file needs beyond the stored
  weights, and comfyui_caveats(config) -> [where ComfyUI core would build the model differently].
Everything else in cogtune talks to a model through ModelFacts (models/facts.py) and ModelSpec (models/spec.py).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from ..errors import CogtuneError, bounded, display_path
from .facts import DROP_KEY, ModelFacts, UndetectableVariant

FAMILIES = {
    "cogvideox": "cogtune.models.variants",
    "wan": "cogtune.models.wan",
}


def family(name: str):
    """The entry module of a registered family."""
    if name not in FAMILIES:
        raise CogtuneError(f"unknown model family {bounded(name)!r}: cogtune knows {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def families() -> list:
    return [family(name) for name in FAMILIES]


def all_variants() -> dict[str, ModelFacts]:
    return {name: facts for f in families() for name, facts in f.VARIANTS.items()}


def get_variant(name: str) -> ModelFacts:
    known = all_variants()
    if name not in known:
        raise CogtuneError(f"unknown model variant {bounded(str(name))!r}: use one of {', '.join(known)}")
    return known[name]


def _family_of_class(class_name: str | None, attr: str, what: str):
    for f in families():
        names = f.PIPELINES if attr == "pipeline" else tuple({v.transformer_class for v in f.VARIANTS.values()})
        if class_name in names:
            return f
    supported = sorted({n for f in families() for n in (
        f.PIPELINES if attr == "pipeline" else {v.transformer_class for v in f.VARIANTS.values()})})
    raise CogtuneError(f"{what} is a {bounded(str(class_name))}; cogtune trains {', '.join(supported)}")


def family_of_folder(path: str | Path):
    """The family of a pipeline folder, from model_index.json's `_class_name`."""
    from .folder import read_json

    index = read_json(Path(path) / "model_index.json", "a diffusers pipeline's model_index.json")
    name = index.get("_class_name")
    found = next((f for f in families() if name in f.PIPELINES), None)
    config = Path(path) / "transformer" / "config.json"
    if found is None and name is None and config.is_file():  # hand-made model_index.json: the transformer decides
        return family_of_config(read_json(config, "a diffusers config.json"), f"the transformer in {display_path(path)}")
    return found or _family_of_class(name, "pipeline", f"model folder {display_path(path)}")


def family_of_config(config: dict, where: str = "the transformer"):
    """The family of a transformer config, from its `_class_name` (a config without one is tried on each family)."""
    if "_class_name" in config:
        return _family_of_class(config["_class_name"], "transformer", where)
    return next((f for f in families() if all(k in config for k in f.CONFIG_KEYS)), families()[0])


def variant_of_configs(transformer_config: dict, vae_config: dict | None = None) -> ModelFacts:
    """The variant a transformer config (and VAE config) belongs to; UndetectableVariant for a custom model."""
    f = family_of_config(transformer_config)
    return f.folder_facts(f.get_variant(f.detect_variant(transformer_config, vae_config)), transformer_config)


def pick_variant(transformer_cfg: dict, vae_cfg: dict | None, given: str | None, where: str | Path,
                 key: str = "model.variant", fam=None) -> ModelFacts:
    """The variant the configs say; `given` (from `key`) must agree, and counts alone only when the configs match
    no official variant (a custom model)."""
    fam = fam or family_of_config(transformer_cfg)
    try:
        given_facts = get_variant(given) if given else None
    except CogtuneError as e:
        raise CogtuneError(f"{key}: {e}") from None
    if given_facts is not None and given_facts.family != fam.FAMILY:
        raise CogtuneError(f"{key}={given_facts.name} is a {given_facts.family} model, but {display_path(where)} "
                           f"holds a {fam.FAMILY} one: remove {key} (it is read from the folder)")
    try:
        detected = fam.detect_variant(transformer_cfg, vae_cfg)
    except UndetectableVariant:
        if given_facts is not None:
            return fam.folder_facts(given_facts, transformer_cfg)
        raise
    if given_facts is not None and given_facts.name != detected:
        raise CogtuneError(f"{key}={given_facts.name}, but the model folder {display_path(where)} is {detected} "
                           f"(read from its transformer/config.json): remove {key} (it is read from the folder) "
                           f"or point model.path at a {given_facts.name} folder")
    return fam.folder_facts(fam.get_variant(detected), transformer_cfg)


def _tiny_facts(path: Path, facts: ModelFacts) -> ModelFacts:
    """A tiny model (cogtune_tiny.json beside model_index.json) is native at its own small size."""
    from dataclasses import replace

    from .folder import read_json

    tiny = path / "cogtune_tiny.json"
    if not tiny.is_file():
        return facts
    t = read_json(tiny, "the tiny model's sizes")
    size = {k: t.get(k) for k in ("frames", "height", "width")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size.values()):
        raise CogtuneError(f"{display_path(tiny)}: frames/height/width must be positive whole numbers, got "
                           f"{tuple(size.values())}: write the tiny model again (cogtune tiny DIR --variant V)")
    return replace(facts, native_frames=size["frames"], native_height=size["height"], native_width=size["width"],
                   hub_id="")  # random weights: not the published model


def resolve_variant(path, variant: str | None = None, weights: bool = True, key: str = "model.variant",
                    drop_positions: bool = False) -> ModelFacts:
    """The facts of a model folder, from its configs, without loading weights (their files are checked whole with
    `weights`). A `variant` given (a config's `model.variant`) must agree with the folder; it decides alone only for
    a folder that matches no official variant. `drop_positions`: the model runs without its learned positional
    table (model.drop_learned_positions), so it takes any size."""
    from .folder import check_model_dir, read_json

    path = check_model_dir(path, weights)
    fam = family_of_folder(path)
    transformer_cfg = read_json(path / "transformer" / "config.json", "a diffusers config.json")
    vae_cfg = read_json(path / "vae" / "config.json", "a diffusers config.json")
    facts = _tiny_facts(path, pick_variant(transformer_cfg, vae_cfg, variant, path, key, fam))
    return without_learned_positions(facts) if drop_positions else facts


def without_learned_positions(facts: ModelFacts, key: str = DROP_KEY) -> ModelFacts:
    """The facts of the model built without its learned positional table (any size of its size unit); a variant
    with no such table is refused (`key` names the option that asked)."""
    from dataclasses import replace

    if not facts.size_lock_key:
        raise CogtuneError(f"{key}=true: {facts.name} has no learned positional table to drop; remove {key}")
    return replace(facts, fixed_resolution=False, positions_dropped=True)


def config_changes(transformer_dir, facts: ModelFacts) -> dict:
    """The transformer config values `facts` need that the folder's config.json does not hold already."""
    from .folder import read_json

    config = read_json(Path(transformer_dir) / "config.json", "a diffusers config.json")
    return {k: v for k, v in facts.transformer_overrides().items() if config.get(k) != v}


def load_transformer(transformer_dir, dtype, facts: ModelFacts | None = None):
    """The transformer of a folder, read from safetensors in `dtype`, built as `facts` say (e.g. without the
    learned positional table: its stored weights are then left unused, as diffusers itself does)."""
    import logging

    overrides = facts.transformer_overrides() if facts is not None else {}
    log = logging.getLogger("diffusers.models.modeling_utils")
    level = log.level
    if overrides:  # "Some weights ... were not used": the dropped table, which is the point
        log.setLevel(logging.ERROR)
    try:
        return transformer_class(transformer_dir).from_pretrained(
            str(transformer_dir), torch_dtype=dtype, use_safetensors=True, local_files_only=True, **overrides)
    finally:
        log.setLevel(level)


def load_spec(path, variant: str | None = None, dtypes: dict | None = None):
    """The ModelSpec for a local diffusers model folder. `dtypes`: component name → the torch dtype it is read in
    ("default" for the rest; fp32 when not given). `variant`: a name, or the facts resolve_variant gave already
    (the folder is not checked a second time)."""
    facts = variant if isinstance(variant, ModelFacts) else resolve_variant(path, variant)
    return family(facts.family).load_spec(path, facts, dtypes)


def transformer_skeleton(source):
    """The transformer of a config dict, a pipeline folder or a transformer folder on the meta device (its module
    names and shapes, no weights read)."""
    from .folder import read_json

    if not isinstance(source, dict):
        folder = Path(source)
        file = folder / "transformer" / "config.json"
        source = read_json(file if file.is_file() else folder / "config.json", "a diffusers config.json")
    return family_of_config(source).transformer_skeleton(source)


def transformer_class(transformer_dir):
    """The diffusers class that loads a transformer folder (its family's, from config.json)."""
    import diffusers

    from .folder import read_json

    config = read_json(Path(transformer_dir) / "config.json", "a diffusers config.json")
    f = family_of_config(config, f"the transformer in {display_path(transformer_dir)}")
    return getattr(diffusers, next(iter(f.VARIANTS.values())).transformer_class)


def repeated_blocks(transformer) -> list:
    """The transformer's repeated blocks, in order (what checkpointing, offload and FSDP work block by block)."""
    names = {c for f in families() for v in f.VARIANTS.values() for c in v.block_classes}
    return [m for m in transformer.modules() if type(m).__name__ in names]


def family_options(cfg, facts: ModelFacts):
    """The config section of `facts`' family's own options (None if it has none); a section of another family's
    options that differs from its defaults is refused in one line (it would be ignored)."""
    own = family(facts.family).OPTIONS
    for f in families():
        name = f.OPTIONS
        section = getattr(cfg, name, None) if name else None
        if name and name != own and section is not None and section != type(section)():
            raise CogtuneError(f"{name}: these options are {f.FAMILY}'s; {facts.name} ({facts.family}) does not "
                               f"take them: remove the {name} section")
    return getattr(cfg, own) if own else None


def facts_of_transformer(transformer) -> ModelFacts:
    """Any variant's facts of the family a transformer module belongs to (for what all its variants share)."""
    name = type(transformer).__name__
    for f in families():
        for facts in f.VARIANTS.values():
            if facts.transformer_class == name:
                return facts
    raise CogtuneError(f"a {name} is no transformer of a registered family ({', '.join(FAMILIES)})")


def write_tiny_pipeline(out_dir, variant: str, seed: int = 0) -> Path:
    """A complete diffusers pipeline folder of tiny random weights for `variant` (any family), plus
    `cogtune_tiny.json` ({"variant", "frames", "height", "width"}); returns its path."""
    import json

    from .. import quiet_libraries

    quiet_libraries()
    facts = get_variant(variant)
    f = family(facts.family)
    out = Path(out_dir)
    f.build_tiny_pipeline(variant, seed).save_pretrained(out, safe_serialization=True)
    (out / "cogtune_tiny.json").write_text(json.dumps({"variant": variant, **f.tiny_size(variant)}, indent=2) + "\n")
    return out
