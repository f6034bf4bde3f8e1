"""The config keys as `--help` lists them: every section and key with its type and default, generated from the
typed tree in trainer/config/schema.py (so it cannot drift), with the key's comment there where it has one."""
from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
import typing

from trainer.config import Config

_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


def type_name(annotation) -> str:
    """int, float, str, bool, one of 'a'|'b', list[float], ... or null (Optional)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "|".join(map(str, args))
    if origin is list:
        return f"list[{type_name(args[0])}]"
    if origin is not None and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{type_name(inner[0])} or null"
    if origin is typing.Union:  # a choice of kinds: model.local_score_weight is a number or auto
        return " or ".join(type_name(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))


def _comments(cls: type) -> dict[str, str]:
    """The inline comment of each field in the class's source (best effort: none when the source is absent)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in map(_COMMENT.match, source.splitlines()) if m}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _show(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value) \
        if isinstance(value, str) else str(value)


def config_keys_help(width: int = 110) -> str:
    """One block per section: `  section.key  TYPE = DEFAULT  comment`."""
    lines = ["config keys (section.key=value on the command line; TYPE = DEFAULT):"]
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        hints, comments = typing.get_type_hints(cls), _comments(cls)
        lines.append(f"  {section.name}:")
        for f in dataclasses.fields(cls):
            entry = f"    {section.name}.{f.name}  {type_name(hints[f.name])} = {_show(_default(f))}"
            comment = comments.get(f.name, "")
            if comment and len(entry) + len(comment) + 2 <= width:
                lines.append(f"{entry}  {comment}")
                continue
            lines.append(entry)
            if comment:  # too long for the key's line: wrapped below it
                lines.extend(textwrap.wrap(comment, width, initial_indent=" " * 8, subsequent_indent=" " * 8))
    return "\n".join(lines)
