"""Model families. The trainer asks for a spec here and talks to it only through models/spec.py's ModelSpec."""

from __future__ import annotations


def load_spec(path, variant: str | None = None, dtypes: dict | None = None):
    """The ModelSpec for a local diffusers model folder (today: the CogVideoX family, all five variants).
    `dtypes`: component name → the torch dtype it is read in ("default" for the rest; fp32 when not given)."""
    from .cogvideox import CogVideoXSpec

    return CogVideoXSpec.load(path, variant, dtypes)


def resolve_variant(path, variant: str | None = None, weights: bool = True):
    """The variant of a model folder, from its configs, without loading weights (their files are checked whole with
    `weights`). A `variant` given (a config's `model.variant`) must agree with the folder; it decides alone only for a
    folder that matches no official variant."""
    from .folder import resolve_variant as resolve

    return resolve(path, variant, weights=weights)


def transformer_skeleton(path):
    """The model folder's transformer on the meta device (its module names and shapes, no weights read)."""
    from .cogvideox import transformer_skeleton as skeleton

    return skeleton(path)
