"""`cogtune train --help-keys`: every config key with its type, default and meaning, read from the config model
itself (the meaning from the comments beside or above each field), so the list cannot drift from what is accepted."""

from __future__ import annotations

import inspect
import io
import sys
import tokenize
import types
import typing

from pydantic import BaseModel


def _comments(cls: type) -> dict[str, str]:
    """field name -> the comment on its line, else the comment lines directly above it."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comment_at = {t.start[0]: t.string.lstrip("# ").rstrip() for t in tokenize.generate_tokens(io.StringIO(source).readline)
                  if t.type == tokenize.COMMENT}
    out = {}
    for i, line in enumerate(lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0]
        if line.startswith("    ") and not line.startswith("     ") and ":" in stripped and name.isidentifier() \
                and name in cls.model_fields:
            if i in comment_at and not stripped.startswith("#"):
                out[name] = comment_at[i]
            else:
                above, j = [], i - 1
                while j in comment_at and lines[j - 1].strip().startswith("#"):
                    above.insert(0, comment_at[j])
                    j -= 1
                if not lines[j - 1].lstrip().startswith("class "):  # not the section's own comment
                    out[name] = " ".join(above)
    return out


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if annotation is type(None):
        return "None"
    return getattr(origin or annotation, "__name__", None) or str(annotation)


def rows(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for every settable key, in the order the model declares them."""
    from ..config import TrainConfig

    model = model or TrainConfig
    out, notes = [], _comments(model)
    for name, field in model.model_fields.items():
        ann = field.annotation
        section = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)),
                       None)
        if section is not None:  # a list of sections (data.datasets) shows its entries' keys as name[].key
            out += rows(section, f"{prefix}{name}{'[]' if typing.get_origin(ann) is list else ''}.")
            continue
        default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
        out.append((prefix + name, _type_name(ann), default, notes.get(name, "")))
    return out


def print_keys() -> None:
    table = rows()
    width = max(len(k) for k, *_ in table)
    text = "".join(f"{key:<{width}}  {kind}, default {default}\n" + (f"{'':<{width}}  {meaning}\n" if meaning else "")
                   for key, kind, default, meaning in table)
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`
        sys.stderr.close()
