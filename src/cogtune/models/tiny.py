"""Tiny random-weight CogVideoX pipelines (and the tiny T5-style tokenizer other families reuse), one per variant, built from configs with no download.

Each keeps its real variant's structure (sin-cos vs RoPE, learned positions, patch_size_t/patch_bias, ofs embedding,
I2V in_channels, VAE scaling_factor/invert_scale_latents, 8x spatial / 4x temporal VAE compression, scheduler class
and config) at a size where a CPU denoising step takes milliseconds. The folder is a plain diffusers pipeline folder:
`CogVideoXPipeline.from_pretrained(dir)` / `CogVideoXImageToVideoPipeline.from_pretrained(dir)` load it unchanged.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from .variants import get_variant, real_configs

TINY_PIXELS = (32, 48)  # height, width: latent 4x6, 2x3 patches per latent frame
TINY_DEFAULTS: dict[str, dict[str, int]] = {
    name: {"frames": 9 if "1.5" not in name else 17, "height": TINY_PIXELS[0], "width": TINY_PIXELS[1]}
    for name in ("cogvideox-2b", "cogvideox-5b", "cogvideox-5b-i2v", "cogvideox1.5-5b", "cogvideox1.5-5b-i2v")
}
TEXT_DIM = 32  # tiny T5 d_model = transformer text_embed_dim
MAX_TEXT_TOKENS = 226  # the stock pipelines' max_sequence_length default; kept so stock calls work unchanged

# Whole words get one token each; anything else falls back to single characters (never <unk> for ASCII text).
WORDS = """
a an the and or of on in at to with without from into onto over under above below near behind between through
is are was be being it its this that these those there here very slowly quickly fast slow small big large tiny
huge one two three many some each every while then first last left right up down forward backward around across
towards away upward downward clockwise counterclockwise moving moves move rotating rotates spinning bouncing
falling rising sliding floating flying walking running jumping drifting turning growing shrinking appears
disappears static still camera pan zoom scene video frame shot view closeup background foreground center middle
top bottom corner edge side plain solid bright dark light colorful
red green blue yellow purple pink orange white black gray grey brown cyan magenta gold silver
circle square triangle diamond rectangle star hexagon ball cube box dot line ring heart shape shapes
sky sea water grass tree trees road street city car dog cat bird fish person man woman girl boy child people
sun moon cloud clouds snow rain fire mountain river beach forest house room table window door
""".split()


def _vocab() -> list[tuple[str, float]]:
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]  # T5 ids: pad 0, eos 1, unk 2
    words = [("\u2581" + w, -1.0) for w in dict.fromkeys(WORDS)]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&%+=#@*"
    return specials + [("\u2581", -4.0)] + words + [(c, -8.0) for c in chars]


def build_tokenizer():
    """A T5-style Unigram tokenizer over a small vocabulary (pad 0, eos </s> 1, unk 2), no download."""
    from transformers import T5Tokenizer

    if "vocab" in inspect.signature(T5Tokenizer.__init__).parameters:  # transformers >= 5: T5Tokenizer is tokenizers-backed
        return T5Tokenizer(vocab=_vocab(), extra_ids=0, model_max_length=MAX_TEXT_TOKENS)
    # transformers 4.x: T5Tokenizer needs a sentencepiece file; build the same tokenizer by hand and wrap it.
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    tok = Tokenizer(Unigram(_vocab(), unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
    ])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=MAX_TEXT_TOKENS)


def tiny_configs(variant: str) -> dict[str, dict]:
    """The tiny transformer / VAE / scheduler configs of `variant`: the real ones with the sizes shrunk."""
    real = real_configs(variant)
    size = TINY_DEFAULTS[variant]
    transformer = real["transformer"] | {
        "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2, "time_embed_dim": 32,
        "text_embed_dim": TEXT_DIM, "max_text_seq_length": MAX_TEXT_TOKENS,
        "sample_frames": size["frames"], "sample_height": size["height"] // 8, "sample_width": size["width"] // 8,
    }
    if transformer["patch_size_t"]:
        # 1.5 reads sample_height/width only as the rotary grid's maximum (real: 300x300 latents, far above native);
        # keep it above the tiny native size too, so other sizes up to 128 px work as they do on the real model
        transformer |= {"sample_height": 16, "sample_width": 16}
    if transformer["ofs_embed_dim"]:
        transformer["ofs_embed_dim"] = transformer["time_embed_dim"]  # ofs_emb is added to the time embedding
    vae = real["vae"] | {
        "block_out_channels": [8, 8, 16, 16],  # 4 blocks: 8x spatial compression, as in the real VAE
        # sample_height/width stay the real ones: they set the tile size when VAE tiling is on (240x360 px tiles),
        # and tiles the size of the tiny native frames would be too small for the VAE's 3x3 convolutions
        "layers_per_block": 1, "norm_num_groups": 4,
    }
    return {"transformer": transformer, "vae": vae, "scheduler": real["scheduler"],
            "scheduler_class": real["scheduler_class"], "pipeline_class": real["pipeline_class"]}


def build_tiny_pipeline(variant: str, seed: int = 0):
    """The tiny pipeline object itself (float32, CPU), deterministic for `seed`."""
    import diffusers
    from transformers import T5Config, T5EncoderModel

    get_variant(variant)
    cfg = tiny_configs(variant)
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = diffusers.CogVideoXTransformer3DModel(**cfg["transformer"])
        if cfg["transformer"]["use_learned_positional_embeddings"]:
            # A learned table starts as sin-cos; perturb it so tests can tell it from a recomputed sin-cos one.
            # (diffusers builds it in float64; the published checkpoint stores it like every other weight.)
            pos = transformer.patch_embed.pos_embedding.float()
            pos[:, MAX_TEXT_TOKENS:] += 0.1 * torch.randn_like(pos[:, MAX_TEXT_TOKENS:])
            transformer.patch_embed.pos_embedding = pos
        vae = diffusers.AutoencoderKLCogVideoX(**cfg["vae"])
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = getattr(diffusers, cfg["scheduler_class"]).from_config(cfg["scheduler"])
    pipeline_cls = getattr(diffusers, cfg["pipeline_class"])
    return pipeline_cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)


def write_tiny_pipeline(out_dir: str | Path, variant: str, seed: int = 0) -> Path:
    """A tiny pipeline folder of any registered family (see cogtune.models.write_tiny_pipeline)."""
    from . import write_tiny_pipeline as write

    return write(out_dir, variant, seed)
