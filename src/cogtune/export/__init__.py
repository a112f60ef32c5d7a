"""Exports: diffusers model folders (sharded safetensors) and DeepSpeed ZeRO checkpoint conversion."""

from cogtune.export.shards import ShardWriter, TensorSpec, save_transformer_folder, verify_transformer_folder

__all__ = ["ShardWriter", "TensorSpec", "save_transformer_folder", "verify_transformer_folder", "convert_zero"]


def __getattr__(name: str):
    if name == "convert_zero":  # imported lazily: it needs diffusers
        from cogtune.export.zero import convert_zero

        return convert_zero
    raise AttributeError(name)
