"""The configuration reference (docs/guide/configuration-reference.md), generated from the
dataclasses of fsl_dist/config.py: every key with its type, default, the values validate()
accepts where config.py lists them, and the docstring written under its field, so the reference
cannot drift from the code.

    python -m fsl_dist.config_reference > docs/guide/configuration-reference.md

tests/test_config_reference.py fails when the file differs from `render()`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
import typing
from typing import Union

from fsl_dist import config

OUTPUT = "docs/guide/configuration-reference.md"
COMMAND = f"python -m fsl_dist.config_reference > {OUTPUT}"
HEADER = f"""# Configuration reference

Generated from the field docstrings of `fsl_dist/config.py`; do not edit by hand. Regenerate:

    {COMMAND}

A config file is YAML with one mapping per section (`train: {{steps: 500}}`), may start with
`inherit: base.yaml`, and every key can be overridden on the command line as `section.key=value`
(`train.steps=500`, `algorithm.inner_lr.features=0.3`). Unknown keys, wrong types and values
outside the choices stop the run before training, naming the key. How to use them:
[training.md](training.md).
"""


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key as the reference shows it."""

    dotted: str
    type: str
    default: str
    allowed: str
    doc: str


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (a string literal right after the
    annotated assignment), keyed by field name; fields without one are absent."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def sections() -> list[tuple[str, type]]:
    """("", Config) for the top-level keys, then (name, dataclass) for each section, in order."""
    hints = typing.get_type_hints(config.Config)
    nested = [(f.name, hints[f.name]) for f in dataclasses.fields(config.Config)
              if dataclasses.is_dataclass(hints[f.name])]
    return [("", config.Config)] + nested


def keys(prefix: str, cls) -> list[Key]:
    """The leaf keys of section `cls` (nested sections excluded), in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    result = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        result.append(Key(dotted, type_name(hints[f.name]), show(default_of(f)),
                          allowed(dotted), docs.get(f.name, "")))
    return result


def allowed(dotted: str) -> str:
    """The values validate() accepts, where config.py lists them: choices or a sign."""
    if dotted in config.CHOICES:
        return ", ".join(show(c) for c in config.CHOICES[dotted] if c is not None)
    if dotted in config.POSITIVE:
        return "> 0"
    if dotted in config.NON_NEGATIVE:
        return ">= 0"
    return ""


def default_of(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def type_name(hint) -> str:
    """`int`, `float or null`, `list of float`, `float or mapping of str to float`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(named + (["null"] if type(None) in args else []))
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}"
    return getattr(hint, "__name__", str(hint))


def show(value) -> str:
    """A value as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def cell(text: str) -> str:
    """Text for one markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    """The whole reference as markdown."""
    out = [HEADER]
    for name, cls in sections():
        title = f"`{name}`" if name else "Top level"
        out.append(f"## {title}\n\n{cell(inspect.getdoc(cls) or '')}\n")
        out.append("| key | type | default | allowed | meaning |\n| --- | --- | --- | --- | --- |")
        for key in keys(name, cls):
            default = f"`{key.default}`" if key.default else ""
            out.append(f"| `{key.dotted}` | {key.type} | {default} | {cell(key.allowed)} | "
                       f"{cell(key.doc)} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
