"""MkDocs hooks: the pages that are generated, and the figures that must match their results files.

- ``<!-- reference: config -->`` becomes the config reference, read off the pydantic models
  (``aimfair_ray.config.Config``): every section, every field with its type, default and description.
- ``<!-- reference: cli -->`` becomes the CLI reference, read off the ``aimfair`` command tree (click, under
  typer): every command with its help, arguments and options.
- A page whose ``<!-- figures: ... -->`` block differs from its results file fails the build
  (``python -m aimfair_ray.figures docs/PAGE.md`` writes it again), so a figure can't be typed by hand.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]


def _type(annotation) -> str:
    """A field's type as a reader writes it: ``int | null``, ``list[str]``, ``'sgd' | 'adamw'``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is typing.Union or str(origin) == "types.UnionType":
        return " | ".join("null" if a is type(None) else _type(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type(a) for a in args if a is not Ellipsis)}]"
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{_cell(json.dumps(value, default=str))}`"


def config_reference() -> str:
    """Every config section and field, from the pydantic models (what ``--set section.field=value`` sets)."""
    from aimfair_ray.config import Config

    out = []

    def section(model: type[BaseModel], prefix: str) -> None:
        rows, subs = [], []
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                subs.append((ann, f"{prefix}{name}."))
                continue
            rows.append(f"| `{prefix}{name}` | {_cell(_type(ann))} | {_default(field)} | {_cell(field.description or '')} |")
        if rows:
            title = prefix.rstrip(".") or "top level"
            doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            out.extend([f"## `{title}`", "", doc, "", "| setting | type | default | what |", "|---|---|---|---|", *rows, ""])
        for sub, p in subs:
            section(sub, p)

    section(Config, "")
    return "\n".join(out)


def _command_doc(cmd, path: str) -> list[str]:
    lines = [f"### `{path}`", ""]
    if cmd.help:
        lines += [cmd.help.strip().replace("\b\n", ""), ""]
    ctx = cmd.context_class(cmd, info_name=path)
    lines += ["```", " ".join(cmd.collect_usage_pieces(ctx)).join([f"{path} ", ""]), "```", ""]
    rows = []
    for p in cmd.params:
        if getattr(p, "hidden", False):
            continue
        if p.param_type_name == "argument":
            name = f"`{p.name.upper()}`"
        else:
            name = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
        default = "" if p.required or p.default in (None, False, ()) or callable(p.default) else f"`{p.default}`"
        rows.append(f"| {name} | {_cell(getattr(p, 'help', None) or '')} | {default} |")
    if rows:
        lines += ["| argument or option | what | default |", "|---|---|---|", *rows, ""]
    return lines


def cli_reference() -> str:
    """Every ``aimfair`` command with its help, arguments and options (the command tree of ``aimfair_ray.cli``)."""
    import typer

    from aimfair_ray.cli import app

    root = typer.main.get_command(app)
    out = []

    def walk(cmd, path: str) -> None:  # typer's own click: duck-typed, a group has .commands
        if getattr(cmd, "hidden", False):
            return
        if hasattr(cmd, "commands"):
            for name in sorted(cmd.commands):
                walk(cmd.commands[name], f"{path} {name}")
        else:
            out.extend(_command_doc(cmd, path))

    walk(root, "aimfair")
    return "\n".join(out)


GENERATED = {"<!-- reference: config -->": config_reference, "<!-- reference: cli -->": cli_reference}


def on_page_markdown(markdown: str, page, config, files) -> str:
    from mkdocs.exceptions import PluginError

    from aimfair_ray.figures import synced

    _, stale = synced(markdown, ROOT)
    if stale:
        raise PluginError(f"{page.file.src_path}: figures differ from {', '.join(stale)}; "
                          f"run `python -m aimfair_ray.figures docs/{page.file.src_path}`")
    for marker, make in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
