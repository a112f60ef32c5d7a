"""Model families. The trainer asks for a spec here and talks to it only through models/spec.py's ModelSpec."""

from __future__ import annotations


def load_spec(path, variant: str | None = None, dtypes: dict | None = None):
    """The ModelSpec for a local diffusers model folder (today: the CogVideoX family, all five variants).
    `dtypes`: component name → the torch dtype it is read in ("default" for the rest; fp32 when not given)."""
    from .cogvideox import CogVideoXSpec

    return CogVideoXSpec.load(path, variant, dtypes)


def resolve_variant(path, variant: str | None = None):
    """The variant of a model folder, from its configs, without loading weights."""
    from .cogvideox import resolve_variant as resolve

    return resolve(path, variant)
