"""Peak accelerator and host memory of a training run, predicted from configs alone (no weights are loaded).

Parameters are counted by role on a meta-device build of the transformer (the variant's published config, or the
model folder's transformer/config.json). Everything else is arithmetic, per accelerator.

Tokens per sample: N = 226 + ceil(latent frames / p_t) × (H/8/p) × (W/8/p), latent frames = (frames − 1)/4 + 1.
An activation unit is B·N·D·c bytes (D = heads × head_dim; c = 2 for bf16/fp16 compute, 4 for fp32). Saved by
autograd in one CogVideoXBlock (checked against saved_tensors_hooks in tests/test_plan.py):
- always: both LayerNorm inputs 2, q/k before their norms 2, SDPA q/k/v/out 4, GELU input ff (= 4): 8 + ff units;
- the input of each trainable linear: to_q/k/v 1 shared unit, or 1 each where autocast casts a copy for each (LoRA in
  bf16: peft gives its fp32 adapters an fp32 input unless layerwise casting turned that off; SFT on CUDA, whose
  autocast runs layer_norm in fp32); to_out.0 1; ff.net.0.proj 1; ff.net.2 ff; each adapter's rank-r output;
- SFT also: both LayerNorm outputs (fp32 under CUDA autocast) and both gated branch outputs.
LoRA on the attention in bf16: 16 units a block; SFT 23, on CUDA 27 (fp32 norm outputs, a q/k/v copy each).
A checkpointed block (blocks 0, k, 2k, ... with checkpointing_every=k) keeps its input (1 unit) and is recomputed in
backward. SDPA's flash/memory-efficient kernels keep no N×N matrix; attention="math" adds B·H·N²·4 per block (torch's
math kernel runs the softmax of bf16/fp16 inputs in fp32 and keeps its output).
Outside the blocks 1.5 units (LoRA) / 3.5 (SFT). Transients, from live-tensor peaks on CPU: forward 6 (LoRA) / 1 (SFT),
10 within a checkpointed block; backward 8 plus the recomputed block; +2 where CUDA autocast makes norm outputs fp32.

Weights: frozen ones in the compute dtype (fp8_weights: 1 byte for Linear weights outside *norm* and patch_embed;
nf4_weights: NF4_BYTES for the Linear weights the trainer quantises, those outside the model's fp8_skip patterns);
trainable ones, their gradients and torch AdamW's foreach scratch (CUDA) in fp32; optimizer states config.OPTIMIZERS' state_bytes.
Autocast caches a bf16 copy of each fp32 trainable weight through the forward (SFT). Layerwise casting and block
offload swap `param.data` per layer or block, but what a frozen linear saves for backward keeps the compute-dtype
(on-loaded) copy alive: fp8 storage and block offload save memory in checkpointed blocks only. An NF4 linear saves
its NF4 weight for backward and dequantises it again there: one layer's dequantisation at a time (NF4_DEQUANT),
with or without checkpointing.
Strategies: DDP doubles the gradients (buckets). DeepSpeed holds the module in bf16, fp32 master/gradient/optimizer
shards (ZeRO-2; ZeRO-3 shards the bf16 module too and gathers two blocks) and a reduce bucket; *_offload puts the
shards on the host. FSDP2 shards everything and gathers two blocks.

The peak is the largest of: forward end, backward start and end, optimizer step, encoding (before training the loop
moves T5, then the VAE, to the GPU, one at a time, in memory.encoder_dtype: bf16 on CUDA with mixed precision),
validation (with prompts); plus the CUDA
context, which max_memory_allocated does not see. Host memory per process is the larger of the pipeline load
and what training keeps there (encoders, offloaded blocks, ZeRO shards). The switch search is in cogtune.plan.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..config import OPTIMIZERS, TrainConfig, compile_conflicts, fill_native_shape, switch_conflicts
from ..errors import CogtuneError

GiB = float(2**30)
TEXT_TOKENS = 226
CUDA_CONTEXT = 0.6 * GiB  # CUDA context + cuBLAS/cuDNN handles: outside max_memory_allocated, inside nvidia-smi
HEADROOM = 0.08  # of the GPU kept free for allocator fragmentation (reserved − allocated)
PROCESS_HOST = 3 * GiB  # python + torch + CUDA libraries, per process
VAE_ENCODE = 2.5 * GiB  # VAE encode workspace per clip with tiling (×4 without); rough
VAE_DECODE = 4.0 * GiB  # validation decode workspace with tiling (×4 without); rough
DS_BUCKET = 5e8  # DeepSpeed reduce_bucket_size default (elements)
# streamed T5-XXL (leaf-level offloading): the 32128 × 4096 embedding, shared by the input and the relative bias
# lookups, stays on the GPU while in use; one feed-forward leaf (4096 × 10240) computes while the next arrives
T5_STREAMED = 32128 * 4096 + 2 * 4096 * 10240
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu"}
# NF4 (torchao, QLoRA's layout): 4 bits a weight, an int8 scale per 64 weights, a compute-dtype factor per 256 scales
NF4_BYTES = 0.5 + 1 / 64 + 2 / (64 * 256)
# torchao 0.18 dequantises through int64 codes: a live peak of 8 + 3c bytes a weight of the Linear computing
# (measured with benchmarks/gpu_memory.py's LiveBytes: 13.8 bf16, 19.6 fp32)
NF4_DEQUANT = (8.0, 3.0)
UNITS = {"fwd_lora": 6.0, "fwd_sft": 1.0, "fwd_ckpt": 10.0, "bwd": 8.0, "norm32": 2.0, "out_lora": 1.5, "out_sft": 3.5}


@dataclass(frozen=True)
class ModelStats:
    """Parameter counts by role, from a meta-device build of the transformer (nothing is allocated)."""
    layers: int
    dim: int
    heads: int
    ff_inner: int
    params: int  # all transformer parameters
    block_params: int  # one block
    block_castable: int  # one block: Linear weights layerwise casting stores in fp8 (not *norm*, not patch_embed)
    block_grad_linear: int  # one block: linears whose input carries gradient (attention + feed-forward)
    outside_castable: int
    block_nf4: int  # one block: Linear weights nf4_weights stores in NF4
    outside_nf4: int
    largest_nf4: int  # elements of the largest of those (one NF4 weight is dequantised at a time)
    buffer_bytes: int
    block_linears: dict  # local name -> (in, out) of one block
    outside_linears: dict  # full name -> (in, out)
    patch: int
    patch_t: int | None
    temporal_ratio: int
    spatial_ratio: int
    vae_params: int
    t5_params: int


def _matches(name: str, targets) -> bool:  # peft's rule for a list of target_modules
    return any(name == t or name.endswith("." + t) for t in targets)


def t5_encoder_params(c: dict) -> int:
    d, inner, ff, layers = c["d_model"], c["num_heads"] * c["d_kv"], c["d_ff"], c["num_layers"]
    gated = str(c.get("feed_forward_proj", "")).startswith("gated")
    per_layer = 4 * d * inner + (3 if gated else 2) * d * ff + 2 * d
    return c["vocab_size"] * d + layers * per_layer + c["relative_attention_num_buckets"] * c["num_heads"] + d


@lru_cache(maxsize=32)
def _stats(transformer_json: str, vae_json: str, t5_json: str, nf4_skip: tuple[str, ...] = ()) -> ModelStats:
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel

    tcfg, vcfg = json.loads(transformer_json), json.loads(vae_json)
    with torch.device("meta"):
        model = CogVideoXTransformer3DModel.from_config(tcfg)
        vae = AutoencoderKLCogVideoX.from_config(vcfg)
    skip = getattr(model, "_skip_layerwise_casting_patterns", None) or ["patch_embed", "norm"]
    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)
    castable = {n for n, m in model.named_modules() if isinstance(m, layers) and not any(s in n for s in skip)}
    block = model.transformer_blocks[0]
    block_linears = {n: (m.in_features, m.out_features) for n, m in block.named_modules()
                     if isinstance(m, torch.nn.Linear)}
    outside = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.startswith("transformer_blocks.")}

    def count(names, prefix=""):
        return sum(p.numel() for n in names for p in model.get_submodule(prefix + n).parameters(recurse=False))

    first = "transformer_blocks.0."
    nf4 = {n: m.weight.numel() for n, m in model.named_modules() if type(m) is torch.nn.Linear
           and not any(s in n for s in nf4_skip) and m.weight.numel() % 64 == 0}
    block_castable = count([n[len(first):] for n in castable if n.startswith(first)], first)
    grad_linears = [n for n in block_linears if n.startswith(("attn1.", "ff."))]
    return ModelStats(
        layers=len(model.transformer_blocks), dim=tcfg["num_attention_heads"] * tcfg["attention_head_dim"],
        heads=tcfg["num_attention_heads"], ff_inner=block.ff.net[2].in_features,
        params=sum(p.numel() for p in model.parameters()), block_params=sum(p.numel() for p in block.parameters()),
        block_castable=block_castable, block_grad_linear=count(grad_linears, "transformer_blocks.0."),
        outside_castable=count([n for n in castable if not n.startswith("transformer_blocks.")]),
        block_nf4=sum(v for n, v in nf4.items() if n.startswith(first)),
        outside_nf4=sum(v for n, v in nf4.items() if not n.startswith(first[:-2])),  # the blocks' list
        largest_nf4=max(nf4.values(), default=0),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        block_linears=block_linears, outside_linears=outside, patch=tcfg["patch_size"],
        patch_t=tcfg.get("patch_size_t"), temporal_ratio=tcfg.get("temporal_compression_ratio", 4),
        spatial_ratio=2 ** (len(vcfg["block_out_channels"]) - 1),
        vae_params=sum(p.numel() for p in vae.parameters()), t5_params=t5_encoder_params(json.loads(t5_json)),
    )


def model_stats(cfg: TrainConfig, variant: str | None = None) -> tuple[str, ModelStats]:
    """(variant name, stats) from the model folder's configs when it exists, else from the variant's real configs.
    The arithmetic here is CogVideoX's memory profile; a family without one (memory_configs → None) is refused."""
    from ..models import family, family_of_folder, get_variant, pick_variant

    path = Path(cfg.model.path)
    if path.exists():
        from ..models.folder import _read_json  # planning reads these configs only
        fam = family_of_folder(path)
        tcfg, vcfg = _read_json(path / "transformer" / "config.json"), _read_json(path / "vae" / "config.json")
        t5 = path / "text_encoder" / "config.json"
        t5cfg = {**T5_XXL, **{k: v for k, v in _read_json(t5).items() if k in T5_XXL}} if t5.is_file() else T5_XXL
        given, key = (variant, "--variant") if variant else (cfg.model.variant, "model.variant")
        name = pick_variant(tcfg, vcfg, given, path, key, fam).name  # a given variant must agree with the folder
        real = fam.memory_configs(name)
    else:
        name = variant or cfg.model.variant
        if not name:
            raise CogtuneError(f"model.path {path} does not exist: set model.variant (or --variant) to plan for "
                               f"a published model without its folder")
        facts = get_variant(name)
        real = family(facts.family).memory_configs(facts.name)
        if real is not None:
            tcfg, vcfg, t5cfg = real["transformer"], real["vae"], T5_XXL
    if real is None:
        raise CogtuneError(f"cogtune plan has no memory profile for {name} yet ({get_variant(name).family} models): "
                           "train with the memory switches you choose and watch the first steps' peak memory")
    skip = tuple(get_variant(name).fp8_skip)  # the patterns the trainer's nf4_storage leaves alone
    return name, _stats(*(json.dumps(c, sort_keys=True) for c in (tcfg, vcfg, t5cfg)), skip)


def _facts(cfg: TrainConfig, name: str):
    from ..models import get_variant, resolve_variant

    path = Path(cfg.model.path)
    return resolve_variant(path, name, weights=False) if path.exists() else get_variant(name)


@dataclass(frozen=True)
class Switches:
    """The memory settings a proposal may change; read from the config with defaults for keys it may lack."""
    gradient_checkpointing: bool = False
    checkpointing_every: int = 1
    fp8_weights: bool = False
    block_offload: bool = False
    offload_encoders: bool = True
    optimizer: str = "adamw"
    strategy: str = "auto"
    batch_size: int = 1
    accumulation: int = 1
    activation_offload: bool = False
    optimizer_in_backward: bool = False
    stream_text_encoder: bool = False
    nf4_weights: bool = False

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Switches":
        m = cfg.memory
        return cls(bool(getattr(m, "gradient_checkpointing", False)), max(1, int(getattr(m, "checkpointing_every", 1))),
                   bool(getattr(m, "fp8_weights", False)), bool(getattr(m, "block_offload", False)),
                   bool(getattr(m, "offload_encoders", True)), str(getattr(cfg.optimizer, "name", "adamw")),
                   cfg.distributed.strategy, cfg.batch_size, cfg.gradient_accumulation_steps,
                   bool(getattr(m, "activation_offload", False)), bool(getattr(m, "optimizer_in_backward", False)),
                   bool(getattr(m, "stream_text_encoder", False)), bool(getattr(m, "nf4_weights", False)))

    def overrides(self, base: "Switches") -> list[str]:
        """key=value pairs that turn `base` into these switches."""
        keys = {k: f"memory.{k}" for k in ("gradient_checkpointing", "checkpointing_every", "fp8_weights",
                                            "block_offload", "offload_encoders", "activation_offload",
                                            "optimizer_in_backward", "stream_text_encoder", "nf4_weights")}
        keys |= {"optimizer": "optimizer.name", "strategy": "distributed.strategy", "batch_size": "batch_size",
                 "accumulation": "gradient_accumulation_steps"}
        changed = {k for k in keys if getattr(self, k) != getattr(base, k)}
        if not self.gradient_checkpointing:
            changed -= {"checkpointing_every", "activation_offload"}
        if self.optimizer_in_backward and not base.optimizer_in_backward:
            changed.add("max_grad_norm")
        keys["max_grad_norm"] = "optimizer.max_grad_norm"
        if "batch_size" in changed:
            changed.add("accumulation")
        fmt = lambda v: str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
        value = lambda k: "null" if k == "max_grad_norm" else fmt(getattr(self, k))  # noqa: E731
        return [f"{keys[k]}={value(k)}" for k in keys if k in changed]


TRAINING_PHASES = ("forward end", "backward start", "backward end", "optimizer step")
PARTS = {"frozen": "frozen weights", "trainable": "trainable weights", "gathered": "gathered/on-loaded weights",
         "copies": "weight copies held for backward", "grads": "gradients", "optimizer": "optimizer states",
         "activations": "activations saved for backward", "workspace": "workspace (transient)",
         "encoders": "text encoder + VAE", "context": "CUDA context"}


@dataclass
class MemoryPlan:
    variant: str
    method: str
    world_size: int
    device: str
    tokens: int  # per sample
    switches: Switches
    phase_parts: dict[str, dict[str, float]]  # moment of a step → bytes per part (keys of PARTS), per accelerator
    host: dict[str, float]  # host memory per process, by part (the larger of loading and training)
    details: dict[str, float]  # phase-independent figures (bytes or counts)
    notes: list[str] = field(default_factory=list)
    gpu_memory: float | None = None  # GiB
    proposal: object = None  # cogtune.plan.Proposal, with gpu_memory

    @property
    def phases(self) -> dict[str, float]:
        return {k: sum(v.values()) for k, v in self.phase_parts.items()}

    @property
    def phase(self) -> str:
        """The moment of the peak."""
        return max(self.phases, key=self.phases.get)

    @property
    def parts(self) -> dict[str, float]:
        """Bytes live at the peak, by part; they sum to `total`."""
        return self.phase_parts[self.phase]

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def host_total(self) -> float:  # per process
        return sum(self.host.values())

    @property
    def training_peak(self) -> tuple[str, float]:
        """(moment, bytes) of the largest training moment, latent caching and validation left out."""
        steps = {k: v for k, v in self.phases.items() if k in TRAINING_PHASES}
        moment = max(steps, key=steps.get)
        return moment, steps[moment]

    def fits(self, gpu_memory: float) -> bool:
        return self.total <= gpu_memory * GiB * (1 - HEADROOM)


def _tokens(cfg: TrainConfig, st: ModelStats) -> int:
    frames = (cfg.data.frames - 1) // st.temporal_ratio + 1
    if st.patch_t:
        frames = math.ceil(frames / st.patch_t)
    unit = st.spatial_ratio * st.patch
    return TEXT_TOKENS + frames * (cfg.data.height // unit) * (cfg.data.width // unit)


def _trainable(cfg: TrainConfig, st: ModelStats) -> tuple[int, set[str]]:
    """(trainable parameter count, names of trainable linears inside a block)."""
    if cfg.method == "sft":
        return st.params, set(st.block_linears)
    targets = list(cfg.lora.target_modules)
    inside = {n for n in st.block_linears if _matches(n, targets)}
    r = cfg.lora.rank
    count = st.layers * sum(r * sum(st.block_linears[n]) for n in inside)
    count += sum(r * sum(shape) for n, shape in st.outside_linears.items() if _matches(n, targets))
    return count, inside


def block_saved_bytes(cfg: TrainConfig, st: ModelStats, inside: set[str], c: int, n: int, fp8: bool = False) -> float:
    """Bytes autograd saves in one block, per token (see the module docstring)."""
    sft, f = cfg.method == "sft", st.ff_inner / st.dim
    units = (8 + f) * c
    qkv = [x for x in ("attn1.to_q", "attn1.to_k", "attn1.to_v") if x in inside]
    # autocast makes one bf16 copy per consumer when the input is not bf16: fp32 LayerNorm output (CUDA), or peft's
    # fp32 cast of a LoRA input (which layerwise casting turns off)
    separate = c < 4 and (n != c or (not sft and not fp8))
    units += (len(qkv) if separate else min(len(qkv), 1)) * c
    units += c * ("attn1.to_out.0" in inside) + c * ("ff.net.0.proj" in inside) + f * c * ("ff.net.2" in inside)
    known = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"}
    units += c * len(inside - known - {"norm1.linear", "norm2.linear"})  # other targets: one unit each, a guess
    if sft:
        units += 2 * n + 2 * c
    rank_terms = 0 if sft else len(inside) * cfg.lora.rank * c
    return units * st.dim + rank_terms


def encoder_bytes(cfg: TrainConfig, cuda: bool) -> int:
    """Bytes per encoder parameter on the device (a CUDA GPU is assumed to support bf16)."""
    return 2 if cfg.memory.resolved_encoder_dtype(cfg.mixed_precision, cuda) == "bf16" else 4


def plan_memory(cfg: TrainConfig, variant: str | None = None, gpu_memory: float | None = None, *,
                world_size: int | None = None, device: str = "cuda", attention: str | None = None,
                switches: Switches | None = None, propose: bool = True) -> MemoryPlan:
    """Predict peak memory per accelerator (and host memory per process) for `cfg`; with `gpu_memory` (GiB), also
    propose the cheapest switches that fit (`plan.proposal`)."""
    name, st = model_stats(cfg, variant)
    attention = attention or ("math" if cfg.speed.attention == "sdpa_math" else "sdpa")  # the others keep no N×N
    if None in (cfg.data.frames, cfg.data.height, cfg.data.width):
        fill_native_shape(cfg, _facts(cfg, name))
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    s = switches or Switches.from_config(cfg)
    sft, cuda = cfg.method == "sft", device == "cuda"
    c = {"no": 4, "bf16": 2, "fp16": 2}[cfg.mixed_precision]
    n = 4 if (cuda and c < 4) else c  # LayerNorm output bytes: CUDA autocast runs layer_norm in fp32
    clipping = switches is None and bool(cfg.optimizer.max_grad_norm)  # proposals set max_grad_norm: null themselves
    notes = [f"{why}; cogtune train refuses this config" for why in switch_conflicts(
        lora=not sft, checkpointing=s.gradient_checkpointing, activation_offload=s.activation_offload,
        fp8_weights=s.fp8_weights, block_offload=s.block_offload, optimizer_in_backward=s.optimizer_in_backward,
        world=world, strategy=s.strategy, accumulation=s.accumulation, clipping=clipping,
        fp16=cfg.mixed_precision == "fp16", nf4_weights=s.nf4_weights)]
    notes += [f"{why}; cogtune train refuses this config" for why in compile_conflicts(
        compile=cfg.speed.compile, block_offload=s.block_offload, fp8_weights=s.fp8_weights, strategy=s.strategy,
        nf4_weights=s.nf4_weights)]
    fp8, offload = s.fp8_weights and not sft, s.block_offload and not sft
    tokens, batch, L = _tokens(cfg, st), s.batch_size, st.layers
    n_ckpt = math.ceil(L / s.checkpointing_every) if s.gradient_checkpointing else 0
    p_t, inside = _trainable(cfg, st)
    p_f = 0 if sft else st.params
    frozen_castable = 0 if sft else L * st.block_castable + st.outside_castable
    frozen_bytes = (p_f - frozen_castable) * c + frozen_castable * (1 if fp8 else c) + st.buffer_bytes
    block_frozen = 0 if sft else st.block_params * c - (st.block_castable * (c - 1) if fp8 else 0)
    nf4 = s.nf4_weights and not sft
    if nf4:
        frozen_nf4 = L * st.block_nf4 + st.outside_nf4
        frozen_bytes -= frozen_nf4 * (c - NF4_BYTES)
        block_frozen -= st.block_nf4 * (c - NF4_BYTES)

    # activations, per micro-batch on this rank
    unit = batch * tokens * st.dim * c
    per_block = batch * tokens * block_saved_bytes(cfg, st, inside, c, n, fp8)
    if attention == "math":
        per_block += batch * st.heads * tokens**2 * 4
    outside = unit * (UNITS["out_sft"] if sft else UNITS["out_lora"])
    # activation_offload: checkpointed blocks' inputs wait on the host; one is in flight at a time each way
    offloaded = max(n_ckpt - 2, 0) * unit if s.activation_offload and n_ckpt else 0.0
    kept = (L - n_ckpt) * per_block + n_ckpt * unit + outside - offloaded
    extra = UNITS["norm32"] * unit if n != c else 0.0
    t_fwd = UNITS["fwd_ckpt"] * unit if n_ckpt else UNITS["fwd_sft" if sft else "fwd_lora"] * unit
    t_fwd += extra + (2 * batch * st.heads * tokens**2 * 4 if attention == "math" else 0)
    t_bwd = UNITS["bwd"] * unit + extra
    if nf4:  # dequantising the weight of the layer computing
        dequant = (NF4_DEQUANT[0] + NF4_DEQUANT[1] * c) * st.largest_nf4
        t_fwd, t_bwd = t_fwd + dequant, t_bwd + dequant
    last_recomputed = n_ckpt and (L - 1) % s.checkpointing_every == 0  # blocks 0, k, 2k, ... are checkpointed
    t_bwd_start = t_bwd + (per_block if last_recomputed else 0)
    t_bwd += per_block if n_ckpt else 0
    loss_ws = 8 * 4 * batch * 16 * (tokens - TEXT_TOKENS) * st.patch**2 * (st.patch_t or 1)

    # weights, gradients, optimizer by strategy
    opt = OPTIMIZERS[s.optimizer].state_bytes if s.optimizer in OPTIMIZERS else 8.0
    strategy = "ddp" if (s.strategy == "auto" and world > 1) else s.strategy
    w = world if strategy not in ("auto", "ddp") else 1
    opt_temp = 4.0 * p_t / w if (cuda and s.optimizer == "adamw" and not strategy.endswith("offload")) else 0.0
    gathered, host_states = 0.0, 0.0
    if strategy.startswith("zero"):  # DeepSpeed keeps the module in bf16 plus an fp32 master copy per partition
        sharded = 1 if strategy.startswith("zero2") else w
        frozen_bytes = 2.0 * p_f / sharded + st.buffer_bytes
        w_t, grads, states = 2.0 * p_t / sharded + 4.0 * p_t / w, 4.0 * p_t / w + min(DS_BUCKET, p_t) * 2, opt * p_t / w
        gathered = 2 * 2.0 * st.block_params if sharded > 1 else 0.0
        if strategy.endswith("offload"):  # master weights, fp32 gradients and optimizer states on the host
            host_states, w_t, grads, states = (8.0 + opt) * p_t / w, 2.0 * p_t / sharded, min(DS_BUCKET, p_t) * 2, 0.0
            if strategy == "zero3_offload":  # the bf16 parameters too
                host_states, frozen_bytes, w_t = host_states + frozen_bytes + w_t, st.buffer_bytes, 0.0
    elif strategy == "fsdp2":
        frozen_bytes, w_t, grads, states = frozen_bytes / w, 4.0 * p_t / w, 4.0 * p_t / w, opt * p_t / w
        gathered = 2 * st.block_params * c + (4.0 * st.block_params if sft else 0)
    else:
        w_t, grads, states = 4.0 * p_t, 4.0 * p_t * (2 if strategy == "ddp" else 1), opt * p_t
    ema = 4.0 * p_t if cfg.ema.decay else 0.0  # the fp32 average of the trainable weights (never sharded)
    states += 0.0 if cfg.ema.on_host else ema
    host_blocks = L * block_frozen if offload else 0.0  # frozen blocks on the host; current + prefetched on the GPU
    frozen_bytes, gathered = frozen_bytes - host_blocks, gathered + (2 * block_frozen if offload else 0.0)

    # compute-dtype weight copies held for backward (module docstring)
    copies_fwd = copies_bwd = copies_end = 0.0
    if sft and c < 4 and strategy in ("auto", "ddp"):  # autocast caches a bf16 copy of each fp32 weight
        copies_end = c * st.block_params
        copies_fwd, copies_bwd = c * p_t, (c * p_t if not n_ckpt else copies_end)
    elif fp8 or offload:
        copies_end = c * st.block_grad_linear  # one block whose weights are swapped per layer
        copies_fwd = copies_bwd = ((L - n_ckpt) + (1 if n_ckpt else 0)) * copies_end

    e = encoder_bytes(cfg, cuda)
    enc = e * (st.t5_params + st.vae_params) if not s.offload_encoders else 0.0
    if s.offload_encoders and name.endswith("-i2v") and cfg.i2v.image_noise:  # VAE encodes the noisy image each step
        enc = e * st.vae_params
    ctx = CUDA_CONTEXT if cuda else 0.0
    held = grads if s.accumulation > 1 else 0.0  # gradients accumulate across micro-batches
    if s.optimizer_in_backward:  # each gradient is stepped and freed as it completes: about a block's worth at once
        grads, opt_temp = min(grads, 4.0 * st.block_params), opt_temp / max(L, 1)
    base = {"frozen": frozen_bytes, "trainable": w_t, "gathered": gathered, "optimizer": states, "encoders": enc,
            "context": ctx}

    def phase(**kw: float) -> dict[str, float]:
        return {p: kw.get(p, base.get(p, 0.0)) for p in PARTS}

    tiles = 1 if cfg.memory.vae_tiling else 4
    phases = {
        "forward end": phase(activations=kept, copies=copies_fwd, workspace=t_fwd, grads=held),
        "backward start": phase(activations=kept, copies=copies_bwd, workspace=t_bwd_start + loss_ws, grads=held),
        # the first block's backward: its own saved set (or, checkpointed, its input + the recompute in t_bwd)
        "backward end": phase(activations=(unit if n_ckpt else per_block) + outside, copies=copies_end, workspace=t_bwd,
                              grads=grads),
        "optimizer step": phase(grads=grads, workspace=opt_temp),
        # before training the encoders visit the GPU one at a time: T5 for the captions, then the VAE for the clips
        # (its workspace only matters while clips still need encoding)
        "encoding": {**{p: 0.0 for p in PARTS}, "context": ctx,
                     **max([{"encoders": e * (T5_STREAMED if s.stream_text_encoder else st.t5_params),
                             "workspace": 0.0},
                            {"encoders": e * st.vae_params, "workspace": VAE_ENCODE * tiles}],
                           key=lambda m: m["encoders"] + m["workspace"])},
    }
    if cfg.validation.prompts:  # between steps: no activations or gradients; the VAE visits the GPU to decode
        phases["validation"] = phase(workspace=VAE_DECODE * tiles + 4 * unit,
                                     encoders=max(enc, e * st.vae_params))
    # the loop reads the transformer in the frozen dtype (LoRA) or fp32 (SFT) and the encoders in their dtype
    load = PROCESS_HOST + (4 if sft else c) * st.params + e * (st.t5_params + st.vae_params)
    train_host = {"process": PROCESS_HOST, "frozen blocks (block offload)": host_blocks, "ZeRO offload": host_states,
                  "activations (activation_offload)": offloaded,
                  "encoders (offloaded)": e * (st.t5_params + st.vae_params) - enc,
                  "EMA (ema.on_host)": ema if cfg.ema.on_host else 0.0}
    if sum(train_host.values()) <= load:
        train_host = {"process": PROCESS_HOST, "pipeline load": load - PROCESS_HOST}
    details = {"trainable_params": p_t, "frozen_params": p_f, "activations_saved": kept, "activation_unit": unit,
               "block_saved": per_block, "checkpointed_blocks": n_ckpt, "activations_offloaded": offloaded}
    plan = MemoryPlan(name, cfg.method, world, device, tokens, s, phases, train_host, details, notes, gpu_memory)
    if plan.phase == "encoding":
        notes.append(f"encoding (T5, then the VAE, in {'fp32' if e == 4 else 'bf16'} on the GPU) is the peak; "
                     f"training alone peaks at "
                     f"{plan.training_peak[1] / GiB:.1f} GiB ({plan.training_peak[0]})")
    if gpu_memory is not None and propose:
        from . import propose_switches

        plan.proposal = propose_switches(cfg, plan, gpu_memory, variant=variant, device=device, attention=attention)
    return plan
