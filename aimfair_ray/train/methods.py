"""Fine-tuning methods: each is a name and a function that chooses which tensors train.

A method gets the :class:`Candidates` (the baseline's tensors, the fine-tuning config and
the AIM-Fair scores, computed on Ray Train only when a method asks for them) and returns a
:class:`Choice`. Registering one here is all it takes for config validation, the CLI help,
``aimfair finetune --method`` and the benchmark's rows to know it::

    @register("bias_only", "the k highest-bias tensors, ignoring the domain score")
    def bias_only(c: Candidates) -> Choice:
        k = sel.resolve_k(c.ft.k, len(c.names))
        return Choice(sorted(c.names, key=lambda n: -c.scores()["bias"][n])[:k])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from torch import nn

from aimfair_ray.train import selective as sel


@dataclass
class Candidates:
    """What a method chooses from."""

    model: nn.Module                      # the baseline
    names: list[str]                      # its parameter tensors, in order
    ft: object                            # the FinetuneConfig
    scores: Callable[[], dict]            # {"domain": {name: score}, "bias": {...}}; computed when first called
    grads: Callable[[], dict]             # mean gradients {"rb"|"sb"|"su": {name: tensor}}
    log: Callable = print


@dataclass
class Choice:
    trainable: list[str]                  # tensors that train
    masks: Optional[dict] = None          # per-element masks {name: bool tensor}
    info: dict = field(default_factory=dict)  # k, k_used, and the scores behind the choice


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    choose: Callable[[Candidates], Choice]


METHODS: dict[str, Method] = {}


def register(name: str, help: str):
    """Decorator: register ``fn(Candidates) -> Choice`` as fine-tuning method ``name``."""
    def deco(fn):
        METHODS[name] = Method(name, help, fn)
        return fn
    return deco


def names() -> list[str]:
    return list(METHODS)


def describe() -> str:
    """``full | linear | ...``, for help texts."""
    return " | ".join(METHODS)


@register("full", "every tensor")
def full(c: Candidates) -> Choice:
    return Choice(list(c.names))


@register("linear", "the last nn.Linear only")
def linear(c: Candidates) -> Choice:
    return Choice(sel.head_tensors(c.model))


@register("random", "as many tensors as selective, drawn by finetune.seed")
def random(c: Candidates) -> Choice:
    picked = selective(c)
    return Choice(sel.random_tensors(c.names, len(picked.trainable), c.ft.seed), info=picked.info)


@register("selective", "AIM-Fair: the k lowest-domain among the k highest-bias tensors")
def selective(c: Candidates) -> Choice:
    from aimfair_ray import AimfairError

    ft, sc = c.ft, c.scores()
    k = sel.resolve_k(ft.k, len(c.names))
    masks = None
    if ft.mask == "element":
        numel = sum(p.numel() for p in c.model.parameters())
        masks = sel.element_masks(c.grads(), ft.k if ft.k < 1 else ft.k / numel)
        chosen, k_used = [n for n in c.names if bool(masks[n].any())], k
    else:
        chosen, k_used = sel.select_at_least(sc["domain"], sc["bias"], k, ft.min_selected)
        if k_used != k:
            c.log(f"selective: only {len(sel.select(sc['domain'], sc['bias'], k))} tensor(s) in both top-{k} lists; "
                  f"k grown to {k_used} (finetune.min_selected={ft.min_selected})")
    if not chosen:
        raise AimfairError(f"selective: no tensor is both among the {k} lowest-domain and the {k} highest-bias "
                           f"tensors; raise finetune.k (now {ft.k}) or set finetune.min_selected=1")
    return Choice(chosen, masks, {"k": k, "k_used": k_used, "domain": sc["domain"], "bias": sc["bias"]})
