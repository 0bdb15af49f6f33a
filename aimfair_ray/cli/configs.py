"""``aimfair config``: the shipped presets and resource layers, and a resolved config; ``aimfair plan``:
what a run will ask of the cluster."""

from __future__ import annotations

from typing import List, Optional

import typer

from aimfair_ray.cli.common import ConfigOpt, PresetOpt, SetOpt, console, run
from aimfair_ray.config import RECIPE_DIR, list_presets, list_resource_layers, load_config

top = typer.Typer()
config_app = typer.Typer(no_args_is_help=True, help="Show presets and resolved configs.")
GROUPS = {None: top, "config": config_app}


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
        layer_type = "recipe" if (RECIPE_DIR / f"{p}.yaml").is_file() else "resource"
        console.print(f"{p} ({layer_type} layer: --config {p})")


@top.command("plan")
def plan_cmd(preset: str = PresetOpt, config: Optional[List[str]] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
             images_per_gpu_s: float = typer.Option(None, "--images-per-gpu-s",
                                                    help="Stable Diffusion throughput per GPU for the time estimate "
                                                         "(default: an assumed A10G-class figure)"),
             as_json: bool = typer.Option(False, "--json", help="print the plan as JSON")):
    """Per stage: the actors, CPUs and GPUs it will request, what it makes, the models it loads and where
    outputs go. Needs no data; connected to a cluster (ray.address / RAY_ADDRESS), refuses what it cannot hold."""
    import json

    from rich.table import Table

    from aimfair_ray.plan import SD_IMAGES_PER_GPU_S, check_cluster, cluster_nodes, make_plan

    def body():
        cfg = load_config(preset, config or [], set_ or [])
        plan = make_plan(cfg, images_per_gpu_s or SD_IMAGES_PER_GPU_S)
        nodes = cluster_nodes(cfg.ray.address)
        plan["cluster"] = ({"nodes": len(nodes), "checked": check_cluster(plan, nodes)} if nodes is not None else
                           "not checked: no cluster (set RAY_ADDRESS or ray.address to check against one)")
        if as_json:
            console.print_json(json.dumps(plan))
            return
        d = plan["data"]
        console.print(f"[bold]plan[/] for run {plan['run']}: {d['dataset']} at {d['root']} (target {d['target']}, "
                      f"sensitive {d['sensitive']}, {d['image_size']} px)", highlight=False)
        tab = Table("stage", "actors / workers", "CPUs (each)", "GPUs (each)", "makes", "models", "outputs (in the run)")
        for s in plan["stages"]:
            tab.add_row(s["stage"], str(s["units"] or "driver"), f"{s['cpus']:g} ({s['cpus_each']:g})",
                        f"{s['gpus']:g} ({s['gpus_each']:g})", s["makes"], s["models"],
                        s["outputs"].replace(plan["run"] + "/", ""))
        console.print(tab)
        for s in plan["stages"]:
            if "estimate" in s:
                e = s["estimate"]
                console.print(f"{s['stage']}: about {e['hours']} h on {s['gpus']:g} GPUs ({e['gpu_hours']} GPU-hours) at "
                              f"{e['assumed_images_per_gpu_s']} images/s per GPU: {e['status']}", highlight=False)
        c = plan["cluster"]
        console.print(c if isinstance(c, str) else f"cluster ({c['nodes']} nodes) holds it: " + "; ".join(c["checked"]),
                      highlight=False)

    run(body)
