"""CSDG prompt stage: N prompts per (target, group) cell that name the cell's class and
group, with diverse contexts. Backends:
- ``template``: combinatorial context banks, no model;
- ``transformers``: a local HF model folder or GGUF file (default: the bundled
  SmolLM2-135M-Instruct) in a Ray Data actor pool;
- ``vllm``: ``ray.data.llm`` on GPU clusters.
Every prompt is checked: it must mention a phrase of its own class and group and none of
another's. Failures are dropped and counted, duplicates removed, and missing prompts
requested again (a few rounds) until each cell has N.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pandas as pd

from aimfair_ray import AimfairError
from aimfair_ray.data.captions import TEMPLATES, render


def cells(task) -> list[tuple[int, int]]:
    return [(c, g) for c in range(len(task.classes)) for g in range(len(task.groups))]


def _has(text: str, phrases: list[str]) -> bool:
    return any(re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", text, re.IGNORECASE) for p in phrases)


def check_prompt(text: str, task, c: int, g: int) -> str | None:
    """None if the prompt names its class and group (and no other), else the reason."""
    if not text or len(text) < 8:
        return "empty"
    if not _has(text, task.classes[c].phrases):
        return "class missing"
    if not _has(text, task.groups[g].phrases):
        return "group missing"
    if any(_has(text, k.phrases) for i, k in enumerate(task.classes) if i != c):
        return "other class"
    if any(_has(text, k.phrases) for i, k in enumerate(task.groups) if i != g):
        return "other group"
    return None


def requests(task, n_per_cell: dict, seed: int, round_: int) -> pd.DataFrame:
    """Rows to write prompts for: cell, labels, chosen phrases, context and a per-row seed."""
    rows = []
    for (c, g), n in n_per_cell.items():
        rng = np.random.default_rng([seed, round_, c, g])
        for _ in range(n):
            ctx = {axis: str(rng.choice(vals)) for axis, vals in task.context.items()}
            rows.append({
                "cell": f"y{c}_s{g}", "target": c, "group": g,
                "cls": str(rng.choice(task.classes[c].phrases)), "grp": str(rng.choice(task.groups[g].phrases)),
                "ctx": ", ".join(ctx.values()), "template": int(rng.integers(len(TEMPLATES))),
                "seed": int(rng.integers(2**31 - 1)),
            })
    return pd.DataFrame(rows)


def template_batch(batch: pd.DataFrame, subject: str) -> pd.DataFrame:
    out = batch.copy()
    out["prompt"] = [render(t, subject, c, g, x)
                     for t, c, g, x in zip(batch["template"], batch["cls"], batch["grp"], batch["ctx"])]
    return out


def llm_messages(cls: str, grp: str, ctx: str, subject: str) -> list[dict]:
    return [
        {"role": "system", "content": "You write short, concrete captions for an image generator."},
        {"role": "user", "content": f"Write one short caption, under 20 words, for a picture of {subject} {cls} "
                                    f"written in {grp} ink, {ctx}. Use the words '{cls}' and '{grp}'. "
                                    "Reply with the caption only."},
    ]


def clean(text: str) -> str:
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^(caption|here is.*?):\s*", "", line.strip(), flags=re.IGNORECASE)
    return line.strip().strip('"\'“”').strip()


class PromptWriter:
    """Ray Data UDF: a causal LM (transformers) writes one caption per request row."""

    def __init__(self, llm: str | None, subject: str, max_new_tokens: int, temperature: float, threads: int = 1):
        import torch

        from aimfair_ray.llm import load_causal_lm

        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok, self.model = load_causal_lm(llm, self.device, padding_side="left")
        self.model.eval()
        self.subject, self.max_new, self.temp = subject, max_new_tokens, temperature

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        texts = [self.tok.apply_chat_template(llm_messages(c, g, x, self.subject), tokenize=False, add_generation_prompt=True)
                 for c, g, x in zip(batch["cls"], batch["grp"], batch["ctx"])]
        enc = self.tok(texts, return_tensors="pt", padding=True).to(self.device)
        torch.manual_seed(int(batch["seed"].iloc[0]))  # deterministic per batch of requests
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new, do_sample=self.temp > 0,
                                      temperature=max(self.temp, 1e-5), top_p=0.95, pad_token_id=self.tok.pad_token_id)
        gen = self.tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        res = batch.copy()
        res["prompt"] = [clean(t) for t in gen]
        return res


def _vllm(ds, gcfg):
    if importlib.util.find_spec("vllm") is None:
        raise AimfairError("generate.backend=vllm needs vLLM, which runs on CUDA GPUs only: install the gpu extra "
                           "(pip install 'aimfair-ray[gpu]') on the GPU cluster, or use generate.backend=transformers "
                           "or template here")
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from aimfair_ray.llm import resolve_llm

    path, gguf = resolve_llm(gcfg.llm)
    subject, temp, max_new = gcfg.task.subject, gcfg.temperature, gcfg.max_new_tokens
    config = vLLMEngineProcessorConfig(
        model_source=str(Path(path) / gguf) if gguf else path,
        engine_kwargs=gcfg.vllm_engine_kwargs,
        batch_size=gcfg.llm_batch_size,
        concurrency=gcfg.llm_actors,
        should_continue_on_error=True,
    )
    processor = build_processor(
        config,
        preprocess=lambda row: dict(row, messages=llm_messages(row["cls"], row["grp"], row["ctx"], subject),
                                    sampling_params={"temperature": temp, "max_tokens": max_new, "seed": row["seed"]}),
        postprocess=lambda row: {k: row[k] for k in ("cell", "target", "group", "cls", "grp", "ctx", "template", "seed")}
        | {"prompt": clean(row.get("generated_text") or "")},
    )
    return processor(ds)


def write_batch(ds, gcfg):
    """Apply the configured backend to a Ray Dataset of request rows."""
    import ray

    if gcfg.backend == "template":
        return ds.map_batches(template_batch, fn_kwargs={"subject": gcfg.task.subject}, batch_format="pandas")
    if gcfg.backend == "vllm":
        return _vllm(ds, gcfg)
    return ds.map_batches(
        PromptWriter,
        fn_constructor_kwargs={"llm": gcfg.llm, "subject": gcfg.task.subject, "max_new_tokens": gcfg.max_new_tokens,
                               "temperature": gcfg.temperature, "threads": max(1, int(gcfg.llm_cpus))},
        batch_size=gcfg.llm_batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=gcfg.llm_actors),
        num_cpus=gcfg.llm_cpus,
        num_gpus=gcfg.llm_gpus or None,
    )


def generate_prompts(gcfg, rounds: int = 4, log=print) -> tuple[pd.DataFrame, dict]:
    """Prompts for every cell, checked and de-duplicated; returns (table, report)."""
    import ray

    task = gcfg.task
    need = {cell: gcfg.prompts_per_cell for cell in cells(task)}
    kept: dict[tuple, list] = {cell: [] for cell in need}
    seen: set[str] = set()
    dropped: dict[str, int] = {}
    duplicates = 0
    for r in range(rounds):
        todo = {cell: int(np.ceil((n - len(kept[cell])) * (1.0 if r == 0 else 1.5))) for cell, n in need.items()
                if len(kept[cell]) < n}
        if not todo:
            break
        req = requests(task, todo, gcfg.seed, r)
        out = write_batch(ray.data.from_pandas(req), gcfg).to_pandas()
        for row in out.itertuples(index=False):
            cell = (int(row.target), int(row.group))
            reason = check_prompt(row.prompt, task, *cell)
            if reason:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            key = row.prompt.lower()
            if key in seen:
                duplicates += 1
                continue
            if len(kept[cell]) < need[cell]:
                seen.add(key)
                kept[cell].append({"cell": row.cell, "target": cell[0], "group": cell[1], "prompt": row.prompt,
                                   "backend": gcfg.backend, "seed": int(row.seed)})
        log(f"prompts: round {r + 1}: {sum(map(len, kept.values()))}/{sum(need.values())} kept, dropped {dropped}, "
            f"duplicates {duplicates}")
    short = {f"y{c}_s{g}": need[(c, g)] - len(v) for (c, g), v in kept.items() if len(v) < need[(c, g)]}
    rows = [dict(r, id=f"p-{r['cell']}-{i:05d}") for v in kept.values() for i, r in enumerate(v)]
    table = pd.DataFrame(rows, columns=["id", "cell", "target", "group", "prompt", "backend", "seed"])
    report = {"backend": gcfg.backend, "per_cell": {f"y{c}_s{g}": len(v) for (c, g), v in kept.items()},
              "dropped": dropped, "duplicates": duplicates, "short": short}
    if short:
        log(f"prompts: warning: cells short of prompts after {rounds} rounds: {short}")
    return table, report
