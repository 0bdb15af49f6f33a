"""CSDG prompt stage: N prompts per (target, group) cell that name the cell's class and
group, with diverse contexts, for the run's task (``aimfair_ray.prompt_tasks``: digits, faces). Backends:
- ``template``: the task's templates and context banks, no model;
- ``transformers``: a local HF model folder or GGUF file (default: the bundled
  SmolLM2-135M-Instruct) in a Ray Data actor pool;
- ``vllm``: ``ray.data.llm`` on GPU clusters (``vllm_config`` builds its processor config,
  which ``aimfair generate prompts --dry-run`` prints without vLLM installed);
- ``file``: fixed lists per cell (``generate.prompt_file``), as the official AIM-Fair code.
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
from aimfair_ray.prompt_tasks import phrase_spans


def cells(task) -> list[tuple[int, int]]:
    return [(c, g) for c in range(len(task.classes)) for g in range(len(task.groups))]


def _free(spans: list, cover: list) -> list:
    """The spans not inside a longer span of ``cover``: "smiling" inside "not smiling" is not "smiling"."""
    return [(a, b) for a, b in spans if not any(c <= a and b <= d and d - c > b - a for c, d in cover)]


def _names(text: str, kinds, own: int) -> tuple[bool, bool]:
    """Whether ``text`` names the class or group ``own``, and whether it names another (of classes, or of groups)."""
    mine = phrase_spans(text, kinds[own].phrases)
    other = [sp for i, k in enumerate(kinds) if i != own for sp in phrase_spans(text, k.phrases)]
    return bool(_free(mine, other)), bool(_free(other, mine))


def check_prompt(text: str, task, c: int, g: int) -> str | None:
    """None if the prompt names its class and group (and no other), else the reason."""
    if not text or len(text) < 8:
        return "empty"
    has_cls, other_cls = _names(text, task.classes, c)
    has_grp, other_grp = _names(text, task.groups, g)
    if not has_cls:
        return "class missing"
    if not has_grp:
        return "group missing"
    if other_cls:
        return "other class"
    if other_grp:
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
                "cls": str(rng.choice(task.classes[c].wording or task.classes[c].phrases)),
                "grp": str(rng.choice(task.groups[g].wording or task.groups[g].phrases)),
                "ctx": ", ".join(ctx.values()), "template": int(rng.integers(len(task.templates))),
                "seed": int(rng.integers(2**31 - 1)),
            })
    return pd.DataFrame(rows)


_AN = re.compile(r"\b([Aa]) (?=(?!one\b|uni|eu|use|usu|ur)[aeiouAEIOU])")


def fill(template: str, subject: str, cls: str, grp: str, ctx: str) -> str:
    """A template or instruction filled in ("a Indian man" -> "an Indian man"; an empty context leaves no
    dangling comma)."""
    if not ctx:
        for joined in (", {ctx}", "{ctx}, ", "{ctx}: "):
            template = template.replace(joined, "")
    return _AN.sub(r"\1n ", template.format(subject=subject, cls=cls, grp=grp, ctx=ctx))


def template_batch(batch: pd.DataFrame, task) -> pd.DataFrame:
    out = batch.copy()
    out["prompt"] = [fill(task.templates[t], task.subject, c, g, x)
                     for t, c, g, x in zip(batch["template"], batch["cls"], batch["grp"], batch["ctx"])]
    return out


def llm_messages(cls: str, grp: str, ctx: str, task) -> list[dict]:
    return [
        {"role": "system", "content": "You write short, concrete captions for an image generator."},
        {"role": "user", "content": fill(task.instruction, task.subject, cls, grp, ctx)},
    ]


def clean(text: str) -> str:
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^(caption|here is.*?):\s*", "", line.strip(), flags=re.IGNORECASE)
    return line.strip().strip('"\'“”').strip()


class PromptWriter:
    """Ray Data UDF: a causal LM (transformers) writes one caption per request row."""

    def __init__(self, llm: str | None, task, max_new_tokens: int, temperature: float, threads: int = 1):
        import torch

        from aimfair_ray.llm import load_causal_lm

        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok, self.model = load_causal_lm(llm, self.device, padding_side="left")
        self.model.eval()
        self.task, self.max_new, self.temp = task, max_new_tokens, temperature

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import torch

        texts = [self.tok.apply_chat_template(llm_messages(c, g, x, self.task), tokenize=False, add_generation_prompt=True)
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


def vllm_config(gcfg):
    """The ``ray.data.llm`` processor config of the vllm backend, built and validated by Ray's own
    model (no vLLM needed): what ``aimfair generate prompts --dry-run`` prints."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from aimfair_ray.llm import resolve_llm

    path, gguf = resolve_llm(gcfg.llm)
    if gcfg.llm_gpus > 1 and gcfg.llm_gpus != int(gcfg.llm_gpus):
        raise AimfairError(f"generate.llm_gpus={gcfg.llm_gpus}: a vLLM engine takes whole GPUs (its tensor-parallel size)")
    engine = ({"tensor_parallel_size": int(gcfg.llm_gpus)} if gcfg.llm_gpus >= 1 else {}) | gcfg.vllm_engine_kwargs
    try:
        return vLLMEngineProcessorConfig(
            model_source=str(Path(path) / gguf) if gguf else path,
            engine_kwargs=engine,
            batch_size=gcfg.llm_batch_size,
            concurrency=gcfg.llm_actors,
            should_continue_on_error=True,
        )
    except Exception as e:  # pydantic's ValidationError: the user's engine kwargs or sizes
        raise AimfairError(f"generate.vllm_engine_kwargs / llm_batch_size / llm_actors do not make a vLLM processor "
                           f"config: {str(e).splitlines()[0]}") from None


def _vllm(ds, gcfg):
    if importlib.util.find_spec("vllm") is None:
        raise AimfairError("generate.backend=vllm needs vLLM, which runs on CUDA GPUs only: install the gpu extra "
                           "(pip install 'aimfair-ray[gpu]') on the GPU cluster, or use generate.backend=transformers "
                           "or template here")
    from ray.data.llm import build_processor

    task, temp, max_new = gcfg.task, gcfg.temperature, gcfg.max_new_tokens
    processor = build_processor(
        vllm_config(gcfg),
        preprocess=lambda row: dict(row, messages=llm_messages(row["cls"], row["grp"], row["ctx"], task),
                                    sampling_params={"temperature": temp, "max_tokens": max_new, "seed": row["seed"]}),
        postprocess=lambda row: {k: row[k] for k in ("cell", "target", "group", "cls", "grp", "ctx", "template", "seed")}
        | {"prompt": clean(row.get("generated_text") or "")},
    )
    return processor(ds)


def write_batch(ds, gcfg):
    """Apply the configured backend to a Ray Dataset of request rows."""
    import ray

    if gcfg.backend == "template":
        return ds.map_batches(template_batch, fn_kwargs={"task": gcfg.task}, batch_format="pandas")
    if gcfg.backend == "vllm":
        return _vllm(ds, gcfg)
    from aimfair_ray.runtime import require

    require("the LLM actor pool", gcfg.llm_actors, gcfg.llm_cpus, gcfg.llm_gpus,
            "generate.llm_actors, generate.llm_cpus or generate.llm_gpus")
    return ds.map_batches(
        PromptWriter,
        fn_constructor_kwargs={"llm": gcfg.llm, "task": gcfg.task, "max_new_tokens": gcfg.max_new_tokens,
                               "temperature": gcfg.temperature, "threads": max(1, int(gcfg.llm_cpus))},
        batch_size=gcfg.llm_batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=gcfg.llm_actors),
        num_cpus=gcfg.llm_cpus,
        num_gpus=gcfg.llm_gpus or None,
    )


def read_prompt_file(path: str, task) -> dict[tuple[int, int], list[str]]:
    """Fixed prompt lists per cell: a YAML/JSON mapping whose keys are cells (``y1_s0``) or
    ``class name/group name``, or a folder of ``y<c>_s<g>.txt`` files (one prompt per line)."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raw = {f.stem: [ln.strip() for ln in f.read_text().splitlines() if ln.strip()] for f in sorted(p.glob("*.txt"))}
    elif p.is_file():
        try:
            raw = yaml.safe_load(p.read_text())  # JSON is YAML
        except yaml.YAMLError as e:
            raise AimfairError(f"generate.prompt_file {p}: not valid YAML or JSON ({str(e).splitlines()[0]})") from None
    else:
        raise AimfairError(f"generate.prompt_file {path} does not exist: give a YAML/JSON file or a folder of "
                           "<cell>.txt files (generate.backend=file)")
    if not isinstance(raw, dict):
        raise AimfairError(f"generate.prompt_file {p}: expected a mapping of cell to a list of prompts")
    keys = {f"y{c}_s{g}": (c, g) for c, g in cells(task)}
    keys |= {f"{task.classes[c].name}/{task.groups[g].name}": (c, g) for c, g in cells(task)}
    out: dict[tuple[int, int], list[str]] = {cell: [] for cell in cells(task)}
    for key, prompts in raw.items():
        if str(key) not in keys:
            names = list(keys)
            raise AimfairError(f"generate.prompt_file {p}: unknown cell {key!r}; cells are y<class>_s<group> "
                               f"({', '.join(names[:len(out)])}) or 'class/group' names ({', '.join(names[len(out):])})")
        if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
            raise AimfairError(f"generate.prompt_file {p}: cell {key!r} must hold a list of prompt strings")
        out[keys[str(key)]] += [x.strip() for x in prompts if x.strip()]
    empty = [f"y{c}_s{g}" for (c, g), v in out.items() if not v]
    if empty:
        raise AimfairError(f"generate.prompt_file {p}: no prompts for cells {empty}: give every cell its list")
    return out


class Sieve:
    """The prompts kept per cell: each offered prompt is checked, a duplicate (any cell, any case) dropped,
    and a full cell (``need``) takes no more; drops and duplicates are counted."""

    def __init__(self, task, need: dict | None = None):
        self.task, self.need = task, need
        self.kept: dict[tuple, list] = {cell: [] for cell in cells(task)}
        self.dropped: dict[str, int] = {}
        self.duplicates = 0
        self.seen: set[str] = set()

    def offer(self, text: str, c: int, g: int, backend: str, seed: int) -> str | None:
        """Keep the prompt or say why not (None: kept or the cell was full)."""
        reason = check_prompt(text, self.task, c, g)
        if reason:
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
            return reason
        if text.lower() in self.seen:
            self.duplicates += 1
            return "duplicate"
        if self.need is None or len(self.kept[(c, g)]) < self.need[(c, g)]:
            self.seen.add(text.lower())
            self.kept[(c, g)].append({"cell": f"y{c}_s{g}", "target": c, "group": g, "prompt": text, "backend": backend,
                                      "seed": seed})
        return None

    def report(self, backend: str, short: dict) -> tuple[pd.DataFrame, dict]:
        """The kept prompts as a table (ids ``p-<cell>-<k>``) and the stage's report."""
        rows = [dict(r, id=f"p-{r['cell']}-{i:05d}") for v in self.kept.values() for i, r in enumerate(v)]
        table = pd.DataFrame(rows, columns=["id", "cell", "target", "group", "prompt", "backend", "seed"])
        return table, {"backend": backend, "dropped": self.dropped, "duplicates": self.duplicates, "short": short,
                       "per_cell": {f"y{c}_s{g}": len(v) for (c, g), v in self.kept.items()}}


def generate_prompts(gcfg, rounds: int = 4, log=print) -> tuple[pd.DataFrame, dict]:
    """Prompts for every cell, checked and de-duplicated; returns (table, report)."""
    import ray

    task = gcfg.task
    if gcfg.backend == "file":  # every listed prompt that passes the check, once
        sieve = Sieve(task)
        for (c, g), prompts in read_prompt_file(gcfg.prompt_file, task).items():
            for text in prompts:
                reason = sieve.offer(text, c, g, "file", 0)
                if reason and reason != "duplicate":
                    log(f"prompts: y{c}_s{g}: dropped ({reason}): {text}")
        empty = sorted(f"y{c}_s{g}" for (c, g), v in sieve.kept.items() if not v)
        if empty:
            raise AimfairError(f"generate.prompt_file {gcfg.prompt_file}: no prompt of cells {empty} passes the "
                               f"phrase check ({sieve.dropped}): each must name its class and group, and no other")
        return sieve.report("file", {})
    need = {cell: gcfg.prompts_per_cell for cell in cells(task)}
    sieve = Sieve(task, need)
    kept = sieve.kept
    for r in range(rounds):
        todo = {cell: int(np.ceil((n - len(kept[cell])) * (1.0 if r == 0 else 1.5))) for cell, n in need.items()
                if len(kept[cell]) < n}
        if not todo:
            break
        req = requests(task, todo, gcfg.seed, r)
        out = write_batch(ray.data.from_pandas(req), gcfg).to_pandas()
        for row in out.itertuples(index=False):
            sieve.offer(row.prompt, int(row.target), int(row.group), gcfg.backend, int(row.seed))
        log(f"prompts: round {r + 1}: {sum(map(len, kept.values()))}/{sum(need.values())} kept, dropped {sieve.dropped}, "
            f"duplicates {sieve.duplicates}")
    short = {f"y{c}_s{g}": need[(c, g)] - len(v) for (c, g), v in kept.items() if len(v) < need[(c, g)]}
    if short:
        log(f"prompts: warning: cells short of prompts after {rounds} rounds: {short}")
    return sieve.report(gcfg.backend, short)
