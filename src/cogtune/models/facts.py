"""What the rest of cogtune may know about a model, as one family-neutral record read from its configs.

A family (models/<family>.py) fills one `ModelFacts` per variant; data planning, training, inference, export and the
planner read these fields and never a model's class or module names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CogtuneError


DROP_KEY = "model.drop_learned_positions"  # the config key that drops a learned positional table


class UndetectableVariant(CogtuneError):
    """The configs match no official variant of a family (a custom model): only then may a given variant decide."""


@dataclass(frozen=True)
class ModelFacts:
    name: str  # the variant, e.g. "cogvideox-5b" or "wan2.1-t2v-1.3b"
    family: str  # the registered family that handles it, e.g. "cogvideox"
    i2v: bool  # takes a first frame as well as the prompt
    frame_step: int  # frames must be frame_step * N + 1 ...
    max_n: int  # ... with 1 <= N <= max_n
    native_frames: int
    native_height: int
    native_width: int
    fps: int
    size_multiple: int  # height and width must be multiples of this (VAE compression × patch size)
    fixed_resolution: bool  # learned positional embeddings lock the size to native_height x native_width
    text_tokens: int  # the prompt length the pipeline encodes (padding included)
    guidance: float  # the pipeline's default classifier-free guidance scale
    objective: str  # "v_prediction" or "flow_matching" (see cogtune/objectives.py)
    lora_targets: tuple[str, ...]  # module names a LoRA adapts by default
    block_classes: tuple[str, ...]  # class names of the transformer's repeated blocks
    fp8_skip: tuple[str, ...]  # module-name patterns that keep their dtype when weights are stored in fp8 or NF4
    transformer_class: str  # the diffusers class of the transformer
    generation: str = ""  # a finer grouping inside the family (CogVideoX "1.0" / "1.5")
    hub_id: str = ""  # where the published weights are (presets name the folder after it)
    release_dtype: str = "bf16"  # the mixed precision the variant was trained and released in
    notes: tuple[str, ...] = field(default=())  # what the run summary should say about this variant
    # why the variant takes no still images as samples; "" when it takes them as one-frame clips (one latent
    # frame, which the spec pads to the transformer's temporal patch as the pipeline pads a 1-frame request)
    no_stills: str = ""
    # The transformer config flag whose True value is the learned positional table that fixes the size ("" when
    # there is none); set False, the model is built without that table and takes any size of size_multiple.
    size_lock_key: str = ""
    positions_dropped: bool = False  # run without that table (model.drop_learned_positions, a LoRA, or the folder)
    # whether the family's diffusers attention processors call diffusers' attention dispatcher, so that
    # `set_attention_backend` takes effect (False: they call torch's SDPA directly, and a dispatcher backend would be
    # silently ignored; tests/train/test_speed.py checks both against the installed diffusers)
    attention_dispatch: bool = False

    def transformer_overrides(self) -> dict:
        """The transformer config values that build the model as these facts describe it (from_pretrained kwargs)."""
        return {self.size_lock_key: False} if self.positions_dropped and self.size_lock_key else {}

    def allowed_frames(self) -> list[int]:
        return [self.frame_step * n + 1 for n in range(1, self.max_n + 1)]

    def check_frames(self, n: int) -> str | None:
        """None if `n` frames is valid for this variant, else a one-line message saying what is."""
        allowed = self.allowed_frames()
        if n in allowed:
            return None
        shown = ", ".join(map(str, allowed)) if len(allowed) <= 12 else (
            f"{', '.join(map(str, allowed[:4]))}, ..., {allowed[-1]}")
        return (f"{self.name} takes {self.frame_step}N+1 frames with 1 <= N <= {self.max_n} "
                f"({shown}; native {self.native_frames}), not {n}")

    def check_still(self) -> str | None:
        """None if a still image trains as a one-frame clip on this variant, else a one-line reason. Only images
        take this rule: a video still needs `check_frames`' counts."""
        return f"{self.name} takes no still images: {self.no_stills}" if self.no_stills else None

    def check_size(self, frames: int, height: int, width: int, key: str = "data") -> str | None:
        """None if the model trains and samples at this size, else one line (keys named under `key`)."""
        problem = self.check_frames(frames)
        if problem:
            return f"{key}.frames={frames}: {problem}"
        unit = self.size_multiple
        if height % unit or width % unit:
            return f"{key}.height/width {height}x{width}: both must be multiples of {unit} for {self.name}"
        if self.fixed_resolution and (height, width) != (self.native_height, self.native_width):
            return (f"{key}.height/width {height}x{width}: {self.name} has learned positional embeddings that fix "
                    f"its size to {self.native_height}x{self.native_width}; set {key}.height={self.native_height} "
                    f"{key}.width={self.native_width}, or {DROP_KEY}=true to train without that table at any size "
                    f"(inference must then drop it too)")
        return None
