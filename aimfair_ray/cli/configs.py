"""``aimfair config``: the shipped presets and resource layers, and a resolved config."""

from __future__ import annotations

from typing import List, Optional

import typer

from aimfair_ray.cli.common import ConfigOpt, PresetOpt, SetOpt, console, run
from aimfair_ray.config import RECIPE_DIR, list_presets, list_resource_layers, load_config

config_app = typer.Typer(no_args_is_help=True, help="Show presets and resolved configs.")
GROUPS = {"config": config_app}


@config_app.command("show")
def config_show(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt):
    """Print the resolved config."""
    run(lambda: console.print(load_config(preset, config or [], set_ or []).to_yaml(), highlight=False))


@config_app.command("presets")
def config_presets():
    """List the shipped presets and --config layers (resources: cpu, gpu, laptop; recipes: aimfair-official)."""
    for p in list_presets():
        console.print(p)
    for p in list_resource_layers():
        kind = "recipe" if (RECIPE_DIR / f"{p}.yaml").is_file() else "resource"
        console.print(f"{p} ({kind} layer: --config {p})")
