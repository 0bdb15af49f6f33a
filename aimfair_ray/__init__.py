"""aimfair-ray: fairer models with synthetic data (AIM-Fair, EGT) at cluster scale on Ray.

Stages, in the one direction data flows:
    data -> generate -> train (and egt) -> evaluate -> serving
with shared pieces below them: ``config``, ``paths``, ``storage``, ``models`` (classifiers and
their safetensors checkpoints), ``llm`` (causal LMs), ``data.codecs``, ``distributed`` (the one
Ray Train runner), ``metrics``, ``minmax`` and ``tables``. Algorithms are plain PyTorch
(``metrics``, ``minmax``, ``train.loop``, ``train.selective``); the Ray code wraps them.
``pipeline`` chains the stages; ``cli`` exposes them as the ``aimfair`` command.
"""

__version__ = "0.1.0"


class AimfairError(Exception):
    """A user-facing error: the message names the problem and how to fix it."""


RENAMED = {  # old spelling -> (new spelling, what it names); accepted until 0.2 with a one-line notice
    "aimfair minmax": ("aimfair egt", "the EGT command"),
    "sweep minmax": ("sweep group_dro", "the Group DRO sweep"),
    "submit minmax": ("submit egt", "the EGT job"),
}


def renamed(old: str) -> str:
    """The new spelling of ``old``, after one line on stderr saying so."""
    import sys

    new, what = RENAMED[old]
    print(f"note: `{old}` is now `{new}` ({what}); the old spelling is accepted until aimfair-ray 0.2", file=sys.stderr)
    return new


def __getattr__(name: str):
    # diffusers resolves a saved pipeline's custom components as getattr(aimfair_ray, ClassName).
    if name in ("AimfairT2IPipeline", "TextProjection"):
        from aimfair_ray.generate import t2i

        return getattr(t2i, name)
    raise AttributeError(f"module 'aimfair_ray' has no attribute {name!r}")
