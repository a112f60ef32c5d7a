"""Convert CogVideo's SAT checkpoints (and alpha-less official-trainer LoRAs) to diffusers.

`cogtune convert sat CKPT OUT --variant V` takes:
- a SAT full checkpoint (`mp_rank_00_model_states.pt` with a `module` dict, a folder holding one, a ZeRO-3 iteration
  folder of per-rank `z3_rank_RR_model_states.pt` (export/sat_zero3.py), or a SAT save folder with `latest` +
  `<iteration>/`, and `<iteration>-ema/` beside it when SAT trained with EMA: `--ema` picks that) -> OUT is a diffusers
  transformer folder (`--merge-into MODEL`: a LoRA fused into MODEL's transformer, by `cogtune lora merge`);
- a SAT LoRA checkpoint (keys `...attention.query_key_value.matrix_A.0` etc.) -> OUT/pytorch_lora_weights.safetensors;
- a LoRA saved by CogVideo's diffusers-route `finetune/` trainer (diffusers keys, no alpha stored)
  -> OUT/pytorch_lora_weights.safetensors with its LoraConfig in the metadata, so it loads at the trained scale.

Key mapping (sources: diffusers scripts/convert_cogvideox_to_diffusers.py, CogVideo tools/convert_weight_sat2hf.py and
tools/export_sat_lora_weight.py; SAT keys carry the prefix `model.diffusion_model.`):
  transformer.layers.N.attention.query_key_value   -> transformer_blocks.N.attn1.to_q | to_k | to_v (thirds of dim 0)
  transformer.layers.N.attention.dense             -> transformer_blocks.N.attn1.to_out.0
  transformer.layers.N.mlp.dense_h_to_4h | 4h_to_h -> transformer_blocks.N.ff.net.0.proj | ff.net.2
  transformer.layers.N.input_layernorm | post_attention_layernorm -> transformer_blocks.N.norm1.norm | norm2.norm
  mixins.adaln_layer.adaLN_modulations.N.1 (12 chunks of dim 0) -> norm1.linear = chunks 0-2 + 6-8,
                                                                   norm2.linear = chunks 3-5 + 9-11
  mixins.adaln_layer.query_layernorm_list.N | key_layernorm_list.N -> transformer_blocks.N.attn1.norm_q | norm_k
  transformer.final_layernorm -> norm_final;   time_embed.0 | .2 -> time_embedding.linear_1 | linear_2
  ofs_embed.0 | .2 -> ofs_embedding.linear_1 | linear_2 (1.5 I2V)
  mixins.patch_embed.proj | text_proj -> patch_embed.proj | text_proj
  mixins.pos_embed.pos_embedding -> patch_embed.pos_embedding (the learned table of 5B-I2V; dropped where diffusers
  recomputes it)
  mixins.final_layer.norm_final | linear | adaLN_modulation.1 -> norm_out.norm | proj_out | norm_out.linear
  dropped: freqs_sin/freqs_cos (RoPE tables), word/position embeddings of the SAT base transformer.
LoRA: query_key_value.matrix_A.i / matrix_B.i (i = 0, 1, 2) -> to_q/to_k/to_v lora_A / lora_B; dense.matrix_A.0 /
matrix_B.0 -> to_out.0. SAT's LoraMixin (sat/model/finetune/lora2.py) runs at scaling lora_alpha / r with default
lora_alpha = 1, and CogVideo's configs set only r (128 for 2B, 256 for 5B): scale 1/r unless --alpha says otherwise.
The official finetune trainer (finetune/schemas/args.py) trains at rank 128, lora_alpha 64 and saves no alpha.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .. import pickles
from ..errors import CogtuneError
from .lora_formats import (PREFIX, WEIGHT_NAME, LoraWeights, build_lora_config, check_output_file,
                           output_path, read_lora, write_diffusers)

SAT_PREFIX = "model.diffusion_model."
SAT_FILE = "mp_rank_00_model_states.pt"
EMA_SUFFIX = "-ema"  # sat/training/model_io.py saves the EMA weights as tag <iteration>-ema
SAT_FAMILY = "cogvideox"  # SAT is this family's own training format
SAT_LORA_ALPHA = 1.0  # sat.model.finetune.lora2.LoraMixin default
FINETUNE_LORA_ALPHA = 64.0  # CogVideo finetune/schemas/args.py default (rank 128)
_W = r"(weight|bias)"
_RENAMES = [(re.compile(pattern), repl) for pattern, repl in [
    (rf"transformer\.layers\.(\d+)\.attention\.dense\.{_W}", r"transformer_blocks.\1.attn1.to_out.0.\2"),
    (rf"transformer\.layers\.(\d+)\.mlp\.dense_h_to_4h\.{_W}", r"transformer_blocks.\1.ff.net.0.proj.\2"),
    (rf"transformer\.layers\.(\d+)\.mlp\.dense_4h_to_h\.{_W}", r"transformer_blocks.\1.ff.net.2.\2"),
    (rf"transformer\.layers\.(\d+)\.input_layernorm\.{_W}", r"transformer_blocks.\1.norm1.norm.\2"),
    (rf"transformer\.layers\.(\d+)\.post_attention_layernorm\.{_W}", r"transformer_blocks.\1.norm2.norm.\2"),
    (rf"mixins\.adaln_layer\.query_layernorm_list\.(\d+)\.{_W}", r"transformer_blocks.\1.attn1.norm_q.\2"),
    (rf"mixins\.adaln_layer\.key_layernorm_list\.(\d+)\.{_W}", r"transformer_blocks.\1.attn1.norm_k.\2"),
    (rf"transformer\.final_layernorm\.{_W}", r"norm_final.\1"),
    (rf"time_embed\.0\.{_W}", r"time_embedding.linear_1.\1"),
    (rf"time_embed\.2\.{_W}", r"time_embedding.linear_2.\1"),
    (rf"ofs_embed\.0\.{_W}", r"ofs_embedding.linear_1.\1"),
    (rf"ofs_embed\.2\.{_W}", r"ofs_embedding.linear_2.\1"),
    (rf"mixins\.patch_embed\.(proj|text_proj)\.{_W}", r"patch_embed.\1.\2"),
    (r"mixins\.pos_embed\.pos_embedding", r"patch_embed.pos_embedding"),
    (rf"mixins\.final_layer\.norm_final\.{_W}", r"norm_out.norm.\1"),
    (rf"mixins\.final_layer\.linear\.{_W}", r"proj_out.\1"),
    (rf"mixins\.final_layer\.adaLN_modulation\.1\.{_W}", r"norm_out.linear.\1"),
]]
_QKV = re.compile(rf"transformer\.layers\.(\d+)\.attention\.query_key_value\.{_W}")
_ADALN = re.compile(rf"mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.{_W}")
_DROP = re.compile(r"(freqs_sin|freqs_cos|embed_tokens|word_embeddings|position_embeddings)")
_LORA = re.compile(r"transformer\.layers\.(\d+)\.attention\.(query_key_value|dense)\.matrix_([AB])\.(\d)")


# --- reading a SAT checkpoint ---------------------------------------------------------------------------------


def _weights_in(folder: Path) -> Path | None:
    """What `folder` itself holds: a SAT file, a ZeRO-3 save (the folder), or an official-trainer LoRA."""
    from .sat_zero3 import z3_files

    for name in (SAT_FILE, WEIGHT_NAME):
        if (folder / name).is_file():
            return folder / name
    return folder if z3_files(folder) else None


def _iteration(root: Path) -> str:
    """The iteration folder of a SAT save folder to convert: `latest`'s, or the only one."""
    if (root / "latest").is_file():
        tag = (root / "latest").read_text().strip()
        if tag.endswith(EMA_SUFFIX):  # SAT writes latest = N-ema, then N: the save stopped between the two
            raise CogtuneError(f"{root}/latest names {tag}, the EMA copy (an interrupted save?): pass {root / tag} "
                               f"for the EMA weights or {root / tag.removesuffix(EMA_SUFFIX)} for the plain ones")
        return tag
    tags = sorted({p.name.removesuffix(EMA_SUFFIX) for p in root.iterdir() if p.is_dir() and _weights_in(p)})
    if len(tags) > 1:
        raise CogtuneError(f"{root} holds iterations {', '.join(tags)} and no `latest` file to pick one: pass "
                           f"{root / tags[-1]} (or restore {root / 'latest'})")
    if not tags:
        raise CogtuneError(f"{root} holds no {SAT_FILE}, no z3_rank_*_model_states.pt, no `latest` file and no "
                           f"{WEIGHT_NAME}: give a SAT checkpoint file or folder")
    return tags[0]


def resolve_checkpoint(path: str | Path, ema: bool = False) -> Path:
    """What to read: a SAT .pt, a ZeRO-3 iteration folder, or an official-trainer LoRA .safetensors. A SAT save
    folder (`latest` + `<iteration>/`, with `<iteration>-ema/` beside it when SAT trained with EMA) gives the plain
    iteration folder, or with `ema` its EMA copy."""
    path = Path(path)
    if not path.exists():
        raise CogtuneError(f"checkpoint {path} does not exist")
    if path.is_file() or (found := _weights_in(path)) is not None:
        if ema and not (path if path.is_dir() else path.parent).name.endswith(EMA_SUFFIX):
            raise CogtuneError(f"--ema picks the <iteration>{EMA_SUFFIX}/ folder of a SAT save folder, but {path} is "
                               "one checkpoint: pass the save folder (the one holding `latest`), or leave out --ema")
        return path if path.is_file() else found
    tag = _iteration(path)
    folder = path / (tag + EMA_SUFFIX if ema else tag)
    found = _weights_in(folder) if folder.is_dir() else None
    if found is None and ema:
        raise CogtuneError(f"--ema: {folder} does not exist or holds no weights (SAT writes <iteration>{EMA_SUFFIX}/ "
                           "only when it trains with EMA): leave out --ema for the plain weights")
    if found is None:
        raise CogtuneError(f"{path}/latest names iteration {tag}, but {folder} holds no {SAT_FILE} and no "
                           "z3_rank_*_model_states.pt: the save is incomplete; copy the whole folder")
    return found


def describe(path: Path) -> str:
    """Which weights `path` (from resolve_checkpoint) are, for the line convert_sat prints."""
    from .sat_zero3 import z3_files

    folder = path if path.is_dir() else path.parent
    details = [f"ZeRO-3 shards of {len(z3_files(path))} rank(s)"] if path.is_dir() else []
    ema = folder.parent / (folder.name + EMA_SUFFIX)
    if folder.name.endswith(EMA_SUFFIX):
        details.append("EMA weights")
    elif ema.is_dir():
        details.append(f"plain weights; the EMA weights are beside it in {ema}: --ema on the save folder converts "
                       "them")
    return f"{path} ({', '.join(details)})" if details else str(path)


def load_sat_state_dict(path: Path, unsafe_pickle: bool | None = None) -> dict[str, torch.Tensor]:
    """The `model.diffusion_model.*` tensors of a SAT checkpoint (nested under model/module/state_dict; or gathered
    from a ZeRO-3 iteration folder), read weights-only (tensors, DeepSpeed's fields and SAT's RNG states) unless
    `unsafe_pickle`."""
    if path.is_dir():
        from .sat_zero3 import gather_z3

        state = gather_z3(path, unsafe_pickle)
    else:
        state = pickles.load_checkpoint_file(path, unsafe=unsafe_pickle)
    for key in ("model", "module", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    tensors = {k: v for k, v in (state.items() if isinstance(state, dict) else ())
               if isinstance(v, torch.Tensor) and isinstance(k, str) and k.startswith(SAT_PREFIX)}
    if not tensors:
        raise CogtuneError(f"{path} has no {SAT_PREFIX}* tensors: not a SAT CogVideoX checkpoint")
    return tensors


def sat_to_diffusers(sat: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(diffusers transformer state dict, dropped SAT keys) of the `model.diffusion_model.*` tensors."""
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for full_key, tensor in sat.items():
        key = full_key.removeprefix(SAT_PREFIX).replace(".original.", ".")  # a LoRA checkpoint's base weights
        if _DROP.search(key):
            dropped.append(full_key)
        elif m := _QKV.fullmatch(key):
            for name, part in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, dim=0)):
                out[f"transformer_blocks.{m.group(1)}.attn1.{name}.{m.group(2)}"] = part.clone()
        elif m := _ADALN.fullmatch(key):
            c = tensor.chunk(12, dim=0)
            out[f"transformer_blocks.{m.group(1)}.norm1.linear.{m.group(2)}"] = torch.cat(c[0:3] + c[6:9])
            out[f"transformer_blocks.{m.group(1)}.norm2.linear.{m.group(2)}"] = torch.cat(c[3:6] + c[9:12])
        else:
            for pattern, repl in _RENAMES:
                if pattern.fullmatch(key):
                    out[pattern.sub(repl, key)] = tensor
                    break
            else:
                raise CogtuneError(f"SAT key {full_key} has no diffusers counterpart: not a CogVideoX transformer "
                                   "weight (is this a CogVideoX SAT checkpoint?)")
    return out, dropped


def infer_config(sd: dict[str, torch.Tensor], variant: str) -> dict:
    """The variant's published transformer config with the sizes read off the weights (so any size converts)."""
    from ..models import family

    cogvideox = family(SAT_FAMILY)
    detect_variant = cogvideox.detect_variant
    cfg = cogvideox.real_configs(variant)["transformer"]
    need = ["transformer_blocks.0.attn1.to_q.weight", "transformer_blocks.0.attn1.norm_q.weight",
            "time_embedding.linear_1.weight", "patch_embed.text_proj.weight", "patch_embed.proj.weight",
            "proj_out.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CogtuneError(f"the checkpoint has no weight for diffusers' {missing[0]}: incomplete SAT checkpoint")
    hidden = sd[need[0]].shape[1]
    head_dim = sd[need[1]].shape[0]
    proj = sd["patch_embed.proj.weight"]
    p, pt = cfg["patch_size"], cfg["patch_size_t"]
    if (proj.ndim == 4) != (pt is None):
        kind = "Conv2d (CogVideoX 1.0)" if proj.ndim == 4 else "Linear (CogVideoX1.5)"
        raise CogtuneError(f"the checkpoint's patch embedding is {kind}, which does not fit --variant {variant}")
    cfg.update(
        num_layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")),
        attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
        time_embed_dim=sd["time_embedding.linear_1.weight"].shape[0],
        text_embed_dim=sd["patch_embed.text_proj.weight"].shape[1],
        in_channels=proj.shape[1] if proj.ndim == 4 else proj.shape[1] // (p * p * pt),
        out_channels=sd["proj_out.weight"].shape[0] // (p * p * (pt or 1)),
        attention_bias="transformer_blocks.0.attn1.to_q.bias" in sd,
        ofs_embed_dim=sd["ofs_embedding.linear_1.weight"].shape[1] if "ofs_embedding.linear_1.weight" in sd else None,
    )
    if proj.ndim == 4:  # diffusers' 1.5 Linear patch projection always has a bias; patch_bias is for the Conv2d only
        cfg["patch_bias"] = "patch_embed.proj.bias" in sd
    found = detect_variant(cfg)
    if found != variant:
        raise CogtuneError(f"the checkpoint looks like {found} (in_channels={cfg['in_channels']}), not --variant "
                           f"{variant}: pass --variant {found}")
    return cfg


def variant_of_checkpoint(sd: dict[str, torch.Tensor], dropped: list[str]) -> str | None:
    """The variant a SAT checkpoint's own keys name, or None where they leave it open: the patch embedding
    (Conv2d: 1.0, Linear: 1.5), the input channels (twice the output: I2V) and, for 1.0 T2V, the position encoding
    (SAT's rotary tables freqs_sin/freqs_cos: 5B; a pos_embedding table: 2B's sin-cos one)."""
    from ..models import family

    proj, out = sd.get("patch_embed.proj.weight"), sd.get("proj_out.weight")
    if proj is None or out is None:
        return None
    linear = proj.ndim == 2
    patch = 2 * 2 * (2 if linear else 1)  # every variant patches 2×2 (×2 frames for 1.5)
    in_ch, out_ch = (proj.shape[1] // patch if linear else proj.shape[1]), out.shape[0] // patch
    i2v = in_ch == 2 * out_ch
    rope = any("freqs_" in k for k in dropped)
    table = "patch_embed.pos_embedding" in sd
    if not (linear or i2v or rope or table):
        return None
    return family(SAT_FAMILY).detect_variant({
        "in_channels": in_ch, "out_channels": out_ch, "patch_size_t": 2 if linear else None,
        "use_rotary_positional_embeddings": rope or i2v or linear})


def pick_sat_variant(given: str | None, found: str | None, what: str) -> str:
    """--variant against what the checkpoint says: a contradiction is refused, a silence needs --variant."""
    if given and found and given != found:
        raise CogtuneError(f"{what} is {found} by its own keys, not --variant {given}: pass --variant {found} (or "
                           "leave it out)")
    if not (given or found):
        raise CogtuneError(f"{what} does not say which variant it belongs to: pass --variant")
    return given or found


def _read_config(path: str | Path) -> dict:
    path = Path(path)
    for candidate in (path, path / "config.json", path / "transformer" / "config.json"):
        if candidate.is_file():
            return {k: v for k, v in json.loads(candidate.read_text()).items() if not k.startswith("_")}
    raise CogtuneError(f"--config {path}: no config.json there (give a transformer config.json or a model folder)")


def check_against_model(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """`sd` restricted to what the model stores, or one line naming the first key or shape that does not fit."""
    from .lora_compat import model_skeleton

    expected = {k: tuple(v.shape) for k, v in model_skeleton(config).state_dict().items()}
    sd = {k: v for k, v in sd.items() if k in expected or k != "patch_embed.pos_embedding"}  # recomputed table
    hint = "pass --config with the model's transformer config.json"
    for key, shape in expected.items():
        if key not in sd:
            raise CogtuneError(f"the checkpoint has no weight for {key}: it does not match the config; {hint}")
        if tuple(sd[key].shape) != shape:
            raise CogtuneError(f"{key}: checkpoint shape {tuple(sd[key].shape)}, the config needs {shape}; {hint}")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise CogtuneError(f"the checkpoint's {extra[0]} has no place in the config's model; {hint}")
    return sd


# --- LoRAs ----------------------------------------------------------------------------------------------------


def sat_lora_to_diffusers(sat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for full_key, tensor in sat.items():
        if ".matrix_" not in full_key:
            continue
        m = _LORA.fullmatch(full_key.removeprefix(SAT_PREFIX))
        if m is None:
            raise CogtuneError(f"SAT LoRA key {full_key} is not a CogVideoX attention LoRA matrix")
        block, where, role, i = m.groups()
        name = ("to_q", "to_k", "to_v")[int(i)] if where == "query_key_value" else "to_out.0"
        out[f"{PREFIX}transformer_blocks.{block}.attn1.{name}.lora_{role}.weight"] = tensor.contiguous()
    return out


def _lora_weights(state_dict: dict[str, torch.Tensor], alpha: float, variant: str, source: str) -> LoraWeights:
    ranks = {k.removeprefix(PREFIX).rsplit(".lora_A", 1)[0]: int(v.shape[0])
             for k, v in state_dict.items() if ".lora_A." in k}
    alphas = {m: float(alpha) for m in ranks}
    config = build_lora_config(ranks, alphas)
    short = sorted({m.split(".attn1.")[-1] for m in ranks})
    cogtune = {"cogtune.variant": variant, "cogtune.rank": str(config["r"]), "cogtune.alpha": str(config["lora_alpha"]),
               "cogtune.target_modules": json.dumps(short), "cogtune.converted_from": source}
    return LoraWeights(state_dict, alphas, config, cogtune, {}, "diffusers", True)


SOURCES = ("finetune", "sat-export")  # CogVideo's finetune/ trainer; its tools/export_sat_lora_weight.py


def _sat_export_shaped(lora) -> bool:
    """What tools/export_sat_lora_weight.py writes: the 4 attention projections of the 2B model's 30 blocks (it
    refuses any other count), which a finetune-trainer LoRA of 2B with its default targets also is."""
    attention = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
    return len(lora.modules) == 120 and all(m.endswith(attention) for m in lora.modules)


def convert_official_lora(path: Path, out: Path, variant: str | None, alpha: float | None = None,
                          overwrite: bool = False, source: str | None = None) -> Path:
    check_output_file(output_path(out), overwrite)
    lora = read_lora(path)
    if lora.source_format != "diffusers":
        raise CogtuneError(f"{path} is a {lora.source_format} LoRA: use `cogtune lora convert` for it")
    if lora.alpha_stored and alpha is None:
        raise CogtuneError(f"{path} already records its LoRA config (rank {lora.lora_config.get('r')}, alpha "
                           f"{lora.lora_config.get('lora_alpha')}): it loads at its trained scale as it is")
    variant = pick_sat_variant(variant, None, f"LoRA {path}")
    rank = lora.rank(lora.modules[0])
    if source is None and alpha is None and _sat_export_shaped(lora):
        raise CogtuneError(f"{path} records no alpha and may come from CogVideo's finetune trainer (lora_alpha "
                           f"{FINETUNE_LORA_ALPHA:g}, scale {FINETUNE_LORA_ALPHA / rank:g}) or from "
                           f"tools/export_sat_lora_weight.py (SAT's lora_alpha 1, scale 1/{rank}), which write the "
                           "same keys: pass --source finetune or --source sat-export (or --alpha A)")
    origin = "sat" if source == "sat-export" else "cogvideo-finetune"
    if alpha is None:
        alpha = SAT_LORA_ALPHA if source == "sat-export" else FINETUNE_LORA_ALPHA
        trainer = "SAT LoRA exported by tools/export_sat_lora_weight.py" if source == "sat-export" else \
            "CogVideo finetune trainer output"
        print(f"note: {path.name} records no alpha ({trainer}): assuming lora_alpha={alpha:g} with rank {rank} "
              f"(scale {alpha / rank:g}); pass --alpha if you trained with another")
    return write_diffusers(_lora_weights(lora.state_dict, alpha, variant, origin), out, overwrite)


def convert_sat_lora(sat: dict[str, torch.Tensor], out: Path, variant: str | None, alpha: float | None = None,
                     overwrite: bool = False) -> Path:
    check_output_file(output_path(out), overwrite)
    variant = pick_sat_variant(variant, None, "a SAT LoRA")
    state_dict = sat_lora_to_diffusers(sat)
    rank = next(v.shape[0] for k, v in state_dict.items() if ".lora_A." in k)
    if alpha is None:
        alpha = SAT_LORA_ALPHA
        print(f"note: SAT LoRAs store no alpha: using SAT's default lora_alpha=1 with rank {rank} (scale 1/{rank}, "
              "as CogVideo's tools/load_cogvideox_lora.py applies); pass --alpha if your lora_config set lora_alpha")
    return write_diffusers(_lora_weights(state_dict, alpha, variant, "sat"), out, overwrite)


# --- entry points ---------------------------------------------------------------------------------------------


def convert_sat(ckpt: str | Path, out: str | Path, variant: str | None = None, alpha: float | None = None,
                config: str | Path | None = None, dtype: str | None = None, max_shard_size: str = "5GB",
                overwrite: bool = False, unsafe_pickle: bool | None = None, source: str | None = None,
                ema: bool = False, merge_into: str | Path | None = None) -> Path:
    """Convert CKPT (SAT full/LoRA checkpoint, or an official-trainer LoRA) into OUT; returns what was written.
    `variant`: checked against what a full checkpoint's keys say (and taken from them when None). `ema`: of a SAT
    save folder, convert `<iteration>-ema/` instead of `<iteration>/`."""
    from ..models import family
    from .shards import check_output_folder, save_transformer_folder

    if variant is not None:
        family(SAT_FAMILY).get_variant(variant)
    path, out = resolve_checkpoint(ckpt, ema), Path(out)
    if merge_into is not None:
        return _merge_lora(path, out, merge_into, variant, alpha, source, dtype, max_shard_size, overwrite,
                           unsafe_pickle)
    if path.suffix == ".safetensors":
        return convert_official_lora(path, out, variant, alpha, overwrite, source)
    print(f"converting {describe(path)}")
    sat = load_sat_state_dict(path, unsafe_pickle)
    if any(".matrix_A." in k for k in sat):
        return convert_sat_lora(sat, out, variant, alpha, overwrite)
    check_output_folder(out, overwrite)  # say so before converting
    sd, dropped = sat_to_diffusers(sat)
    variant = pick_sat_variant(variant, variant_of_checkpoint(sd, dropped), f"checkpoint {path}")
    cfg = _read_config(config) if config else infer_config(sd, variant)
    sd = check_against_model(sd, cfg)
    return save_transformer_folder(sd, {"_class_name": "CogVideoXTransformer3DModel", **cfg}, out, dtype=dtype,
                                   max_shard_size=max_shard_size, overwrite=overwrite)




def _merge_lora(path: Path, out: Path, model: str | Path, variant: str | None, alpha: float | None,
                source: str | None, dtype: str | None, max_shard_size: str, overwrite: bool,
                unsafe_pickle: bool | None) -> Path:
    """Convert the LoRA at `path` into a temporary diffusers LoRA, then `cogtune lora merge` it into `model`."""
    import tempfile

    from .lora_compat import transformer_config
    from .merge import MERGE_INFO, merge_loras
    from .shards import check_output_folder
    from ..models import variant_of_configs

    check_output_folder(out, overwrite)
    if variant is None:  # the model merged into says which
        variant = variant_of_configs(*transformer_config(model)).name
    if path.suffix != ".safetensors":
        print(f"converting {describe(path)}")
        sat = load_sat_state_dict(path, unsafe_pickle)
        if not any(".matrix_A." in k for k in sat):
            raise CogtuneError(f"--merge-into fuses a LoRA, but {path} is a full SAT checkpoint (no matrix_A "
                               "weights): convert it without --merge-into")
    with tempfile.TemporaryDirectory(prefix="cogtune-sat-lora-") as tmp:
        lora = convert_official_lora(path, Path(tmp), variant, alpha, False, source) if path.suffix == \
            ".safetensors" else convert_sat_lora(sat, Path(tmp), variant, alpha)
        merge_loras(model, [str(lora)], out, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
    info = json.loads((out / MERGE_INFO).read_text())  # name the checkpoint, not the temporary LoRA file
    info["loras"][0]["path"] = str(path.absolute())
    (out / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out
