"""Command-line flags from typed dataclasses: one ``--flag`` per field, its help the field's trailing comment.

A field whose type is itself a dataclass (``ModelOptions``, ``EngineConfig``, ...) contributes its own fields,
so a subcommand's flags are the leaves of one config tree; ``from_args`` builds that tree back from the parsed
namespace, and the dataclasses' own validation turns bad values into one ``ConfigError`` line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import math
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from ..config import ConfigError


def finite_float(s: str) -> float:
    """argparse type: a finite float (nan and inf are refused by the parser)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if math.isnan(v) or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be finite, got {s!r}")
    return v


def field_help(cls: type) -> dict[str, str]:
    """Field name -> its trailing comment, continued on the comment lines below it."""
    src = inspect.getsource(cls).splitlines()
    tree = ast.parse("\n".join(src).strip() if src[0].startswith(" ") else "\n".join(src))
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in names:
            line = src[node.lineno - 1]
            if "#" not in line:
                continue
            text, k = line.split("#", 1)[1].strip(), node.end_lineno or node.lineno
            while k < len(src) and src[k].strip().startswith("#"):
                text += " " + src[k].strip()[1:].strip()
                k += 1
            out[node.target.id] = text
    return out


def _leaf_kind(hint: Any) -> type:
    """The scalar type argparse should parse for a field annotation (``int | None`` -> int)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is tuple:
        return tuple
    if args and typing.get_origin(hint) is not tuple:
        return str if len(args) > 1 else _leaf_kind(args[0])
    return hint if isinstance(hint, type) else str


def _add_one(p: argparse.ArgumentParser, f: dataclasses.Field, hint: Any, help_text: str, default: Any,
             required: bool) -> None:
    kind = _leaf_kind(hint)
    meta = f.metadata
    kw: dict[str, Any] = {"help": help_text}
    if meta.get("choices"):
        kw["choices"] = meta["choices"]
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    if kind is tuple:
        kw["nargs"] = "+"
    if meta.get("positional"):
        p.add_argument(f.name, **kw)
        return
    flag = "--" + f.name.replace("_", "-")
    if kind is bool:
        p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, **kw)
        return
    if required:
        p.add_argument(flag, dest=f.name, required=True, type=None if kind is tuple else _parse(kind), **kw)
        return
    if default is not None and not (isinstance(default, str) and not default):
        kw["help"] = f"{help_text} (default {default})" if help_text else f"(default {default})"
    p.add_argument(flag, dest=f.name, default=default, type=None if kind is tuple else _parse(kind), **kw)


def _parse(kind: type) -> Any:
    return {int: int, float: finite_float}.get(kind)


def add_flags(p: argparse.ArgumentParser, cls: type, defaults: Mapping[str, Any] | None = None,
              skip: Iterable[str] = (), only: Mapping[str, Iterable[str]] | None = None) -> None:
    """Add one flag per leaf field of ``cls``. ``defaults`` overrides the flag defaults by field name (a command
    whose --dtype defaults to fp32, say); ``skip`` drops fields (they keep their dataclass default); ``only``
    maps a nested dataclass type's name to the subset of its fields this command exposes."""
    defaults, skip, only = dict(defaults or {}), set(skip), {k: set(v) for k, v in (only or {}).items()}
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            sub_only = only.get(hint.__name__)
            sub_skip = skip | ({x.name for x in dataclasses.fields(hint)} - sub_only if sub_only is not None else set())
            add_flags(p, hint, defaults, sub_skip, only)
            continue
        if f.name in skip:
            continue
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = defaults.get(f.name, None if missing else f.default)
        _add_one(p, f, hint, helps.get(f.name, ""), default, required=missing)


def from_args(cls: type, ns: argparse.Namespace) -> Any:
    """Build ``cls`` (and its nested dataclasses) from the parsed flags; fields without a flag keep their
    defaults. A value the dataclass refuses is a ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kw[f.name] = from_args(hint, ns)
        elif f.name in vars(ns):
            v = vars(ns)[f.name]
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    try:
        return cls(**kw)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
