"""The whole run as one pydantic model, loaded from YAML with `key=value` overrides.

Every mistake a user can make in a config becomes one line that names the key (`lora.rnk`), says what is wrong
and what would be right. Checks that need the model (frames allowed by the variant) live with the model spec.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import CogtuneError, bounded, display_path, os_error_text

# --- one table per concept ----------------------------------------------------------------------------------------


class Strategy(NamedTuple):
    zero: int | None  # DeepSpeed ZeRO stage, or None
    offload: bool  # DeepSpeed keeps the fp32 shards (and for ZeRO-3 the parameters) on the host
    sharded: bool  # the parameters themselves are split across ranks: every rank takes part in every forward
    own_state: bool  # the strategy saves and loads its own (sharded) optimizer state in checkpoints


STRATEGIES = {
    "auto": Strategy(None, False, False, False),  # ddp with several processes, none with one
    "ddp": Strategy(None, False, False, False),
    "zero2": Strategy(2, False, False, True),
    "zero2_offload": Strategy(2, True, False, True),
    "zero3": Strategy(3, False, True, True),
    "zero3_offload": Strategy(3, True, True, True),
    "fsdp2": Strategy(None, False, True, True),
}


class Attention(NamedTuple):
    route: str  # "sdpa": torch's own SDPA with its kernel pinned (every family); "dispatch": diffusers' dispatcher
    backend: str  # the torch SDPBackend member, or diffusers' AttentionBackendName value ("" lets torch choose)
    package: str  # what to pip install ("" for torch's own kernels)
    cuda_only: bool


ATTENTION = {
    "sdpa": Attention("sdpa", "", "", False),  # torch chooses per call (flash / memory-efficient / cuDNN / math)
    "sdpa_flash": Attention("sdpa", "FLASH_ATTENTION", "", False),  # torch's built-in FlashAttention-2 (and CPU's)
    "sdpa_efficient": Attention("sdpa", "EFFICIENT_ATTENTION", "", True),
    "sdpa_cudnn": Attention("sdpa", "CUDNN_ATTENTION", "", True),
    "sdpa_math": Attention("sdpa", "MATH", "", False),  # the reference: materialises the N×N scores
    # diffusers' dispatcher (models whose attention processor routes through it); sage is left out: it has no backward
    "flash": Attention("dispatch", "flash", "flash-attn", True),
    "xformers": Attention("dispatch", "xformers", "xformers", True),
}


class Optimizer(NamedTuple):
    module: str
    cls: str
    package: str  # what to pip install
    state_bytes: float  # optimizer state per trainable parameter (what the planner counts)


OPTIMIZERS = {
    "adamw": Optimizer("torch.optim", "AdamW", "torch", 8.0),
    "adamw8bit": Optimizer("bitsandbytes.optim", "AdamW8bit", "bitsandbytes", 2.0),
    "prodigy": Optimizer("prodigyopt", "Prodigy", "prodigyopt", 16.0),
    "came": Optimizer("came_pytorch", "CAME", "came-pytorch", 4.0),
}

MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; more is a mistake (a dataset or a binary given as the config)
MAX_CONFIG_NODES = 100_000  # YAML values after expanding aliases: a "billion laughs" file stops here, not in RAM
SEED_LIMIT = 2**32  # numpy's legacy seeding, which accelerate's set_seed calls, takes 0 <= seed < 2**32
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]
Beta = Annotated[float, Field(ge=0, lt=1)]


class _Section(BaseModel):
    # NaN and infinity are never meaningful in a config (lr: .inf would pass a `gt=0` check)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    path: Path
    variant: str | None = None  # read from the model folder when not given
    # build the transformer without its learned positional table (the one that fixes 5B-I2V at its native size), so
    # any size of the size unit trains; recorded in the outputs, which inference then loads the same way
    drop_learned_positions: bool = False


class BucketConfig(_Section):
    # Resolutions as [[h, w], ...], or an area (pixels) with aspect ratios ("16:9" or 1.78); a clip goes to the
    # nearest aspect it can cover without upscaling (unless allow_upscale) and the largest frame count it can fill.
    resolutions: list[tuple[Annotated[int, Field(ge=16, le=8192)], Annotated[int, Field(ge=16, le=8192)]]] = []
    area: int | None = Field(None, ge=256, le=8192 * 8192)
    aspect_ratios: list[str | float] = []
    frames: list[Annotated[int, Field(ge=1, le=1025)]] = []  # empty: data.frames only
    allow_upscale: bool = False

    @field_validator("resolutions")
    @classmethod
    def _sizes_multiple_of_16(cls, v: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for h, w in v:
            if h % 16 or w % 16:
                raise ValueError(f"each [height, width] must be multiples of 16 (VAE ×8 and patch ×2), got [{h}, {w}]")
        return v

    @field_validator("aspect_ratios")
    @classmethod
    def _valid_aspects(cls, v: list[str | float]) -> list[str | float]:
        from .data.buckets import parse_aspect

        for ratio in v:
            parse_aspect(ratio)  # its ValueError names the ratio and the accepted forms
        return v


# the data.* keys an entry of data.datasets may set for its own clips (None there: the data.* value)
DATASET_OVERRIDES = ("frames", "height", "width", "buckets", "trigger", "sampling", "target_fps", "window",
                     "short_clips", "crop", "shuffle_tags", "keep_tokens", "tag_variants")
SAMPLING = Literal["uniform", "head", "random", "fps"]
WINDOW = Literal["center", "random"]
SHORT_CLIPS = Literal["skip", "pad_last", "loop", "slow", "interpolate", "smaller"]
CROP = Literal["center", "random", "stretch"]


def _multiple_of_16(v: int | None) -> int | None:
    if v is not None and v % 16:
        raise ValueError(f"must be a multiple of 16 (VAE ×8 and patch ×2), got {v}")
    return v


class DatasetConfig(_Section):
    """One of several datasets (data.datasets): its root and what it changes for its own clips."""
    root: Path
    name: str | None = None  # for the summary and reports (default: the root's folder name)
    repeats: int | None = Field(None, ge=1, le=10_000)  # its clips appear this many times per epoch (default 1)
    # or: this share of each epoch's samples (see cogtune/data/mixing.py for how an epoch is formed)
    weight: float | None = Field(None, gt=0, le=1)
    # each of these, when set, replaces the data.* key of the same name for this dataset's clips
    frames: int | None = Field(None, ge=1, le=1025)  # None: data.frames
    height: int | None = Field(None, ge=16, le=8192)  # None: data.height
    width: int | None = Field(None, ge=16, le=8192)  # None: data.width
    buckets: BucketConfig | None = None  # None: data.buckets
    trigger: str | None = Field(None, min_length=1, max_length=200)  # None: data.trigger
    sampling: SAMPLING | None = None  # None: data.sampling
    target_fps: float | None = Field(None, gt=0)  # None: data.target_fps
    window: WINDOW | None = None  # None: data.window
    short_clips: SHORT_CLIPS | None = None  # None: data.short_clips
    crop: CROP | None = None  # None: data.crop
    shuffle_tags: bool | None = None  # None: data.shuffle_tags
    keep_tokens: int | None = Field(None, ge=0, le=1000)  # None: data.keep_tokens
    tag_variants: int | None = Field(None, ge=1, le=64)  # None: data.tag_variants
    heldout: bool = False  # the held-out set: never trained on, its loss is heldout_loss (validation.holdout: 0)

    @model_validator(mode="after")
    def _repeats_or_weight(self) -> "DatasetConfig":
        if self.repeats is not None and self.weight is not None:
            raise ValueError(f"{self.title}: give repeats (times per epoch) or weight (share of an epoch), not both")
        if self.heldout and (self.repeats is not None or self.weight is not None):
            raise ValueError(f"{self.title}: a heldout dataset is never trained on, so repeats/weight mean nothing "
                             "there; remove them")
        return self

    @property
    def title(self) -> str:
        return self.name or Path(self.root).resolve().name

    _sizes = field_validator("height", "width")(_multiple_of_16)


class DataConfig(_Section):
    # official layout folder, a metadata.csv/.jsonl table (or its folder), or videos with .txt captions; or several
    # in `datasets` (each with its own root, repeats, frames/height/width/buckets and trigger)
    root: Path | None = None
    datasets: list[DatasetConfig] = []
    # None: the model's native shape (the run summary says which it took)
    frames: int | None = Field(None, ge=1, le=1025)
    height: int | None = Field(None, ge=16, le=8192)
    width: int | None = Field(None, ge=16, le=8192)
    # uniform: spread over the clip; head: the first frames; random: a random window; fps: resample to target_fps,
    # then take a window (centred, or random with window: random)
    sampling: SAMPLING = "uniform"
    target_fps: float | None = Field(None, gt=0)  # fps mode; None: the variant's (8 for 1.0, 16 for 1.5)
    window: WINDOW = "center"
    # clips too short (or too slow in fps mode): skip (reason logged), pad_last, loop, slow (repeat frames),
    # interpolate (blend neighbours), smaller (the largest allowed frame count the clip can fill)
    short_clips: SHORT_CLIPS = "skip"
    crop: CROP = "center"
    buckets: BucketConfig | None = None
    cache_dir: Path | None = None  # None: {dataset folder}/.cogtune_cache ({output_dir}/cache if not writable)
    num_workers: int = Field(2, ge=0)
    # cached latents and text embeddings kept in RAM after their first read, up to this many GiB per process
    # (0: read from disk at every step; reads happen on a prefetch thread either way)
    ram_cache_gb: float = Field(2.0, ge=0)
    # a word put in every caption: where it writes [trigger], else in front ("sks, a dog runs"); recorded in the
    # LoRA's metadata and model card, so users know what to prompt
    trigger: str | None = Field(None, min_length=1, max_length=200)
    # share of training samples shown with the empty caption instead of their own (encoded once), so the model
    # keeps a prompt-free prediction for classifier-free guidance; drawn per sample and step from the seed
    caption_dropout: float = Field(0.0, ge=0, lt=1)
    # shuffle each caption's comma-separated tags: every sample is shown one of tag_variants orders, drawn once
    # from the seed and encoded into the cache with the rest (tag_variants times the text encoding and its cache
    # space); which one a sample gets is drawn from (seed, step, position in the global batch). The first
    # keep_tokens tags stay in place, and the trigger stays first
    shuffle_tags: bool = False
    keep_tokens: int = Field(0, ge=0, le=1000)  # with shuffle_tags: the first N tags stay in place
    tag_variants: int = Field(4, ge=1, le=64)  # with shuffle_tags: orders encoded per caption

    _sizes = field_validator("height", "width")(_multiple_of_16)

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if (self.root is None) == (not self.datasets):
            raise ValueError("give data.root (one dataset) or data.datasets (several), " +
                             ("not both" if self.root is not None else "one of them"))
        if self.datasets and all(e.heldout for e in self.datasets):
            raise ValueError("every entry of data.datasets is heldout: at least one must be trained on")
        titles = [e.title for e in self.datasets]
        if twice := next((t for t in titles if titles.count(t) > 1), None):
            raise ValueError(f"two entries of data.datasets are named {twice!r} (the folder's name unless name is "
                             "given): give one a name")
        trained = [e for e in self.datasets if not e.heldout]
        weighted = [e for e in trained if e.weight is not None]
        total = sum(e.weight for e in weighted)
        shares = " + ".join(f"{e.weight:g}" for e in weighted)
        if weighted and len(weighted) == len(trained) and abs(total - 1) > 1e-6:
            raise ValueError(f"the weights of data.datasets ({shares} = {total:g}) are shares of an epoch and must "
                             "add up to 1 when every trained dataset has one")
        if weighted and len(weighted) < len(trained) and total >= 1 - 1e-6:
            raise ValueError(f"the weights of data.datasets ({shares} = {total:g}) leave no share of the epoch to "
                             "the datasets with repeats: they must add up to less than 1")
        return self

    def weights(self) -> dict[str, float]:
        """name -> share of each epoch, of the datasets that give a weight instead of repeats."""
        return {e.title: e.weight for e in self.datasets if e.weight is not None}

    def heldout_names(self) -> set[str]:
        """The datasets set aside as the held-out set (data.datasets[].heldout)."""
        return {e.title for e in self.datasets if e.heldout}

    def entries(self) -> list[tuple[str, "DataConfig", int]]:
        """(name, the data settings of its clips, repeats) of every dataset; data.root alone is one of them."""
        if self.root is not None:
            return [(Path(self.root).name, self, 1)]
        out = []
        for e in self.datasets:
            update = {k: getattr(e, k) for k in DATASET_OVERRIDES if getattr(e, k) is not None}
            out.append((e.title, self.model_copy(update={"root": e.root, "datasets": [], **update}), e.repeats or 1))
        return out

    def frames_line(self) -> str:
        """How this dataset's clips get their frames and captions (its own settings, data.* where it sets none)."""
        fps = f" at {self.target_fps:g} fps" if self.target_fps else " at the model's fps"
        line = (f"{self.sampling} sampling{fps + ' (window ' + self.window + ')' if self.sampling == 'fps' else ''}, "
                f"short clips {self.short_clips}, crop {self.crop}")
        if self.shuffle_tags:
            line += f", tags shuffled ({self.tag_variants} orders" + (
                f", first {self.keep_tokens} kept)" if self.keep_tokens else ")")
        return line

    @property
    def first_root(self) -> Path:
        return Path(self.root if self.root is not None else self.datasets[0].root)


class LoraConfig(_Section):
    rank: int = Field(64, ge=1, le=4096)
    alpha: float = Field(64, gt=0)
    target_modules: list[Annotated[str, Field(min_length=1)]] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class OptimizerConfig(_Section):
    # adamw (torch), adamw8bit (bitsandbytes), prodigy (prodigyopt; use lr 1.0), came (came-pytorch)
    name: Literal[tuple(OPTIMIZERS)] = "adamw"
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[Beta, Beta] = (0.9, 0.95)  # each in [0, 1): 1 or more makes the moment estimates diverge
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)  # null: no clipping


class SchedulerConfig(_Section):
    name: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = Field(0, ge=0)


class LossConfig(_Section):
    # default: the objective's own weighting (v-prediction: w = 1/(1-ᾱ_t) on the x0 error, which equals plain MSE on
    # v; flow matching: none); "official" is the old name of "default". See cogtune/objectives.py.
    weighting: Literal["default", "official", "none"] = "default"
    # uniform: t ~ U{0..T-1} (v-prediction) or σ ~ U(0, 1) (flow matching). logit_normal: u = sigmoid(N(logit_mean,
    # logit_std)). Either is shifted: u' = shift·u / (1 + (shift−1)·u) (shift > 1 favours noisier points).
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    timestep_shift: float = Field(1.0, gt=0)


class I2VConfig(_Section):
    # The official I2V trainer perturbs the conditioning image with pixel noise σ = exp(N(−3, 0.5)) before encoding it,
    # every step (the VAE encoder stays loaded), and drops the image latents with a small probability.
    image_noise: bool = True
    image_dropout: float = Field(0.05, ge=0, le=1)


class SFTConfig(_Section):
    save_dtype: Literal["fp32", "bf16", "fp16"] | None = None  # None: the dtype the weights were trained in
    max_shard_size: str = "5GB"
    export_pipeline: bool = False  # also write {output_dir}/pipeline/ with the untouched components linked


class MemoryConfig(_Section):
    # Speed cost of each switch (typical figures until BENCHMARKS.md has GPU rows): gradient checkpointing +25-35%
    # step time (scaled by the share of blocks checkpointed), fp8 weight storage +5-10%, block offload (the next
    # block is prefetched: only the PCIe time compute does not hide), activation offload +5-15%, 8-bit AdamW ~0%,
    # optimizer in backward ~0%, encoder offload, bf16 encoders and T5 streaming 0% once the cache is built.
    gradient_checkpointing: bool = False
    checkpointing_every: int = Field(1, ge=1)  # with gradient_checkpointing: checkpoint blocks 0, k, 2k, ...
    # with gradient_checkpointing: the inputs each checkpointed block keeps for backward wait in host RAM instead
    # (one hidden state per block; PCIe copies that overlap compute only partly, ~+5-15% step time)
    activation_offload: bool = False
    # step each parameter's optimizer as soon as its gradient is complete, then free that gradient: a full
    # fine-tune never holds all gradients at once (5B: 22 GB in fp32). One process, no accumulation and no global
    # clipping (optimizer.max_grad_norm: null); step time unchanged
    optimizer_in_backward: bool = False
    fp8_weights: bool = False  # frozen base Linear weights stored as float8_e4m3fn, computed in the training dtype
    # QLoRA: frozen base Linear weights stored as NF4 (4 bits + block scales, ~0.52 byte/param, torchao), computed in
    # the training dtype; the adapters stay fp32 and the saved LoRA is the same file as without it (pip install
    # cogtune[nf4])
    nf4_weights: bool = False
    block_offload: bool = False  # frozen weights of each block live on the host, copied in for its forward (LoRA)
    vae_slicing: bool = True
    vae_tiling: bool = True
    offload_encoders: bool = True  # move the text encoder and VAE off the accelerator once the clips are encoded
    # dtype of T5 and the VAE while they encode (and, for I2V with image noise, during training). auto: bf16 on a
    # bf16-capable CUDA device with mixed precision (T5-XXL takes 9.5 GB instead of 19; the official trainer encodes
    # in bf16 too; T5 overflows in fp16), else fp32. Part of the cache fingerprint: changing it re-encodes.
    encoder_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # T5 stays in host RAM and streams to the accelerator layer by layer while it encodes the captions (prefetching
    # the next layer): encoding needs ~0.5 GB there instead of 9.5 GB, for slower encoding, once (then cached)
    stream_text_encoder: bool = False

    def resolved_encoder_dtype(self, mixed_precision: str, cuda: bool, bf16_supported: bool = True) -> str:
        """encoder_dtype with auto decided: the one rule the trainer and the planner share."""
        if self.encoder_dtype != "auto":
            return self.encoder_dtype
        return "bf16" if cuda and mixed_precision != "no" and bf16_supported else "fp32"


class SpeedConfig(_Section):
    """Switches that make steps faster and change neither the loss (beyond rounding) nor what is saved."""
    # blocks: torch.compile each repeated transformer block in place (regional compilation: one block's code is
    # compiled once and serves them all, recompiled only for new shapes); off: eager. Pays off on long runs: the first
    # steps (and the first step at each new bucket size) wait for the compiler.
    compile: Literal["off", "blocks"] = "off"
    # the attention kernel: sdpa lets torch choose; sdpa_flash/_efficient/_cudnn/_math pin one of torch's kernels;
    # flash (flash-attn) and xformers go through diffusers' attention dispatcher, for models whose attention calls it
    attention: Literal[tuple(ATTENTION)] = "sdpa"

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_bool(cls, v):
        return {False: "off", True: "blocks"}.get(v, v) if isinstance(v, bool) else v


def switch_conflicts(*, lora: bool, checkpointing: bool, activation_offload: bool, fp8_weights: bool,
                     block_offload: bool, optimizer_in_backward: bool, world: int, strategy: str, accumulation: int,
                     clipping: bool, fp16: bool, nf4_weights: bool = False) -> list[str]:
    """Why `cogtune train` refuses a combination of memory switches (empty: it does not). One list for the trainer,
    which raises the first, and the planner, which notes them all."""
    why = []
    if activation_offload and not checkpointing:
        why.append("memory.activation_offload moves what checkpointed blocks keep to the host: it needs "
                   "memory.gradient_checkpointing: true")
    for on, name, what in ((fp8_weights, "fp8_weights", "stores frozen weights in fp8"),
                           (block_offload, "block_offload", "keeps frozen weights on the host"),
                           (nf4_weights, "nf4_weights", "stores frozen weights in 4 bits")):
        if on and not lora:
            why.append(f"memory.{name} {what}; method: sft trains every weight, so it needs method: lora")
    if nf4_weights:
        for what, present in (("memory.fp8_weights (one storage dtype per weight: keep one of the two)", fp8_weights),
                              ("memory.block_offload (it moves plain weights between host and device)", block_offload),
                              (f"distributed.strategy={strategy} (NF4 tensors are not sharded here yet): use ddp or "
                               "one process", strategy not in ("auto", "ddp"))):
            if present:
                why.append(f"memory.nf4_weights stores frozen weights in 4 bits: it cannot work with {what}")
    if optimizer_in_backward:
        for what, present in (("several processes (gradients must be reduced first)", world > 1 or strategy != "auto"),
                              ("gradient_accumulation_steps > 1", accumulation > 1),
                              ("optimizer.max_grad_norm (clipping needs all gradients; set it to null)", clipping),
                              ("mixed_precision: fp16 (the loss scaler unscales all gradients at once)", fp16)):
            if present:
                why.append(f"memory.optimizer_in_backward steps each parameter during backward: it cannot work "
                           f"with {what}")
    return why


def compile_conflicts(*, compile: str, block_offload: bool, fp8_weights: bool, strategy: str,
                      nf4_weights: bool = False) -> list[str]:
    """Why `cogtune train` refuses speed.compile with these switches (empty: it does not); the trainer raises the
    first, the planner notes them all and proposes none of them."""
    if compile != "blocks":
        return []
    why = []
    if block_offload:
        why.append("speed.compile=blocks with memory.block_offload: the offload hooks swap each block's weights in place "
                   "around its forward, which breaks a compiled block's backward; turn one of them off")
    if fp8_weights:
        why.append("speed.compile=blocks with memory.fp8_weights: compiled blocks and the hooks that upcast fp8 weights "
                   "do not work together (a checkpoint recompute sees fp8 weights where the forward saw upcast ones); "
                   "turn one of them off")
    if nf4_weights:
        why.append("speed.compile=blocks with memory.nf4_weights: compiling blocks whose weights are NF4 tensors is not "
                   "tested yet; turn one of them off")
    if STRATEGIES[strategy].sharded:
        why.append(f"speed.compile=blocks with distributed.strategy={strategy}: compiled blocks under the hooks that "
                   "gather sharded weights around each block are not supported yet; use ddp or zero2, or "
                   "speed.compile: off")
    return why


class ValidationConfig(_Section):
    every_steps: int = Field(0, ge=0)  # 0 = only before and after training
    heldout_loss: bool = True  # loss on fixed clips, latents, noise and timesteps: before, every_steps, at the end
    # clips set aside from the dataset and never trained on: a count (2) or a share (0.1). Their loss is logged as
    # heldout_loss. 0: none set aside; the same loss is then taken on training clips and logged as train_fixed_loss
    holdout: float = Field(0, ge=0)
    # at most this many clips in that loss (None: every held-out clip; 2 training clips without a holdout)
    heldout_clips: int | None = Field(None, ge=1)
    prompts: list[str] = []  # videos generated with the current weights every_steps and at the end
    images: list[Path] = []  # I2V: one conditioning image per prompt
    inference_steps: int = Field(25, ge=1, le=1000)  # the schedulers have 1000 training timesteps
    guidance_scale: float | None = Field(None, ge=0)  # None: the model's default (ModelFacts.guidance)
    seed: Seed = 0
    frames: int | None = Field(None, ge=1, le=1025)  # None: data.frames / height / width
    height: int | None = Field(None, ge=16, le=8192)
    width: int | None = Field(None, ge=16, le=8192)


    @field_validator("holdout")
    @classmethod
    def _count_or_share(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError(f"a count of clips (2) or a share below 1 (0.1), got {v}")
        return v


class DistributedConfig(_Section):
    # auto: ddp when several processes, nothing when one. zero*: DeepSpeed (config generated from this file;
    # deepspeed_config: a JSON whose keys override the generated ones). fsdp2: torch FSDP2 through accelerate.
    strategy: Literal[tuple(STRATEGIES)] = "auto"
    deepspeed_config: Path | None = None


class EMAConfig(_Section):
    # an exponential moving average of the trained weights (LoRA adapters or the whole model), kept in fp32:
    # ema = decay * ema + (1 - decay) * weights, from start_step on (where it starts as the weights), every `every`
    # steps. Saved in checkpoints, exported beside the plain weights (lora_ema/, transformer_ema/)
    decay: float | None = Field(None, gt=0, lt=1)  # None: off; 0.999 is usual for thousands of steps
    start_step: int = Field(0, ge=0)
    every: int = Field(1, ge=1)
    on_host: bool = False  # keep the average in host RAM instead of on the accelerator
    for_validation: bool = False  # validation videos and the fixed-point loss with the averaged weights


class LoggingConfig(_Section):
    # where the scalars (loss, lr, held-out loss, ...) and validation videos go besides logs/metrics.jsonl (always
    # written). wandb: a W&B run (`wandb login` first, or WANDB_MODE=offline to keep it in logs/wandb/ for `wandb
    # sync`); a resumed run continues the same W&B run
    report_to: list[Literal["tensorboard", "wandb"]] = ["tensorboard"]
    wandb_project: str = "cogtune"
    wandb_name: str | None = None  # None: the output folder's name


class CheckpointConfig(_Section):
    every_steps: int = Field(0, ge=0)  # 0: only on SIGTERM/SIGINT
    keep_last: int | None = Field(3, ge=1)


class TrainConfig(_Section):
    model: ModelConfig
    data: DataConfig
    method: Literal["lora", "sft"] = "lora"
    lora: LoraConfig = LoraConfig()
    sft: SFTConfig = SFTConfig()
    i2v: I2VConfig = I2VConfig()
    memory: MemoryConfig = MemoryConfig()
    speed: SpeedConfig = SpeedConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    lr_scheduler: SchedulerConfig = SchedulerConfig()
    loss: LossConfig = LossConfig()
    validation: ValidationConfig = ValidationConfig()
    ema: EMAConfig = EMAConfig()
    logging: LoggingConfig = LoggingConfig()
    max_steps: int = Field(1000, ge=1, le=10**9)
    output_dir: Path = Path("runs/cogtune")
    seed: Seed = 42
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    log_every: int = Field(1, ge=1)

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v):
        return "no" if v is False else v  # YAML 1.1 reads an unquoted `no` as false
    distributed: DistributedConfig = DistributedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    resume: str | None = None  # latest (error if none), auto (latest or fresh), or a checkpoint-N path
    overwrite: bool = False  # a fresh run into an output_dir that holds a previous one deletes that run's files first
    on_nonfinite: Literal["stop", "skip_step"] = "stop"


def fill_native_shape(cfg: TrainConfig, facts) -> list[str]:
    """Set data.frames/height/width left unset to the model's native shape (`facts`: its ModelFacts), in place;
    returns the keys filled."""
    filled = []
    for key in ("frames", "height", "width"):
        if getattr(cfg.data, key) is None:
            setattr(cfg.data, key, getattr(facts, f"native_{key}"))
            filled.append(f"data.{key}")
    return filled


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise CogtuneError(f"override {bounded(dotted)}: {bounded(key)} is not a section")
        node = child
    node[leaf] = value


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Values a YAML node stands for once its aliases are expanded (aliases share nodes, hence the memo)."""
    if id(node) not in memo:
        memo[id(node)] = 1  # a recursive alias counts once instead of looping
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        memo[id(node)] = 1 + sum(_expanded_size(c, memo) for c in children)
    return memo[id(node)]


def safe_yaml(text: str, where: str) -> Any:
    """yaml.safe_load with limits: a bad document is one line naming `where`, an alias bomb is refused before it
    expands, and deep nesting cannot overflow the stack."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _expanded_size(node, {}) > MAX_CONFIG_NODES:
            raise CogtuneError(f"{where}: more than {MAX_CONFIG_NODES} values once its YAML aliases are expanded "
                               "(an alias bomb?); write the values out or use fewer aliases")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CogtuneError(f"{where}: not valid YAML ({bounded(str(e).splitlines()[0] if str(e) else e, 200)})") from None
    except RecursionError:
        raise CogtuneError(f"{where}: YAML nested too deeply") from None


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise CogtuneError(f"override {bounded(pair)} is not key=value (e.g. max_steps=100 or lora.rank=16)")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise CogtuneError(f"override {bounded(pair)}: the key is empty (e.g. max_steps=100 or lora.rank=16)")
        out.append((key, safe_yaml(raw, f"override {bounded(key)}") if raw.strip() else None))
    return out


def _field_names(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def config_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """Every settable key, dotted (`optimizer.lr`, `data.buckets.enabled`, ...)."""
    model = model or TrainConfig
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += config_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def did_you_mean(key: str) -> list[str]:
    """Keys close to an unknown one: the same last word elsewhere (`lr` → `optimizer.lr`), else close spellings."""
    keys = config_keys()
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[:3]
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
    if close:
        return close
    leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
    return [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=2, cutoff=0.8)]


RECORDED_ONLY = {"world_size": "world_size is what earlier cogtune runs recorded in config.yaml, not a setting: delete that line "
                               "(processes are set with --nproc N or torchrun)"}


def _one_line(err: ValidationError, source: str, overrides: dict[str, str]) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    dotted = ".".join(str(p) for p in loc)
    given = next((pair for key, pair in overrides.items() if dotted == key or dotted.startswith(key + ".")), None)
    if given is not None:  # the mistake is on the command line, not in the file
        source = f"override {bounded(given)}"
    key = bounded(dotted or "(top level)")
    if first["type"] == "extra_forbidden":
        if dotted in RECORDED_ONLY:
            return f"{source}: {RECORDED_ONLY[dotted]}"
        near = did_you_mean(dotted)
        hint = f"did you mean {' or '.join(near)}?" if near else \
            f"valid here: {', '.join(_field_names(TrainConfig, loc))}."
        return f"{source}: unknown key {key!r}: {hint} (`cogtune train --help-keys` lists every key)"
    if first["type"] == "missing":
        return f"{source}: missing required key {key!r}"
    got = first.get("input")
    got = f" (got {bounded(got)})" if got is not None and not isinstance(got, dict) else ""
    return f"{source}: {key}: {bounded(first['msg'], 300)}{got}"


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    tree: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        path = Path(path)
        source = display_path(path)
        if path.is_dir():
            raise CogtuneError(f"config {source} is a folder: give the YAML file (e.g. configs/quickstart.yaml)")
        if not path.is_file():
            raise CogtuneError(f"config file {source} does not exist")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise CogtuneError(f"{source}: {path.stat().st_size} bytes is too large for a config (at most "
                               f"{MAX_CONFIG_BYTES}); is it the right file?")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CogtuneError(f"{source}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
        except OSError as e:
            raise CogtuneError(os_error_text(e, f"reading config {source}")) from None
        loaded = safe_yaml(text, source) or {}
        if not isinstance(loaded, dict):
            raise CogtuneError(f"{source}: top level must be a mapping of keys, got {type(loaded).__name__}")
        bad = [k for k in loaded if not isinstance(k, str)]
        if bad:
            raise CogtuneError(f"{source}: key {bounded(bad[0])} is not a name; keys are words like max_steps")
        tree.update(loaded)
    given = {}
    for pair, (key, value) in zip(overrides, parse_overrides(list(overrides))):
        _set_dotted(tree, key, value)
        given[key] = pair
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as e:
        raise CogtuneError(_one_line(e, source, given)) from None
    except RecursionError:
        raise CogtuneError(f"{source}: values nested too deeply") from None
