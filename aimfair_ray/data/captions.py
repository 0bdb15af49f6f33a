"""Captions and prompt phrasings, shared by the prompt stage (``generate.prompts``), the
embedded text-to-image recipe (``generate.t2i_train``) and EGT's image task.

``TEMPLATES``/``render``: the prompt stage's template prompts. ``RECIPE_TEMPLATES``: the
recipe's own caption phrasings. ``caption_images``: captions that name a Colored MNIST
image's digit, colour and style (thickness by tercile, slant).
"""

from __future__ import annotations

import numpy as np

from aimfair_ray.config import DIGITS as WORDS
from aimfair_ray.config import TaskConfig
from aimfair_ray.prompt_tasks import DIGIT_TASK

TEMPLATES = DIGIT_TASK.templates


def render(template: int, subject: str, cls: str, grp: str, ctx: str) -> str:
    """One template prompt: ``TEMPLATES[template]`` filled with the class and group phrases and the context."""
    return TEMPLATES[template].format(subject=subject, cls=cls, grp=grp, ctx=ctx)


RECIPE_TEMPLATES = [
    "a handwritten digit {num} in {color}",
    "the number {word} written in {color} ink, {thick} stroke, {slant}",
    "a {color} {word} on a black background",
    "a {thick} {color} handwritten {word}, {slant}",
    "an image of the digit {num}, drawn with a {thick} {color} pen",
    "{word} ({num}) in {color}, {slant}",
    "a photo of a {color} number {num}",
    "a {slant} {color} digit {word} with a {thick} stroke on black",
]


def style(img: np.ndarray) -> tuple[float, float]:
    """(ink fraction, slant) of an RGB digit image."""
    ink = img.max(axis=2) > 64
    ys, xs = np.nonzero(ink)
    if len(xs) < 3:
        return 0.0, 0.0
    yc, xc = ys - ys.mean(), xs - xs.mean()
    return float(ink.mean()), float(-(xc * yc).sum() / max((yc * yc).sum(), 1e-6))  # > 0 leans right


def captions(digit: int, color: str, thick: str, slant: str, rng, k: int) -> list[str]:
    picks = rng.choice(len(RECIPE_TEMPLATES), size=k, replace=k > len(RECIPE_TEMPLATES))
    return [RECIPE_TEMPLATES[i].format(num=digit, word=WORDS[digit], color=color, thick=thick, slant=slant) for i in picks]


def stage_captions(digit: int, color: str, thick: str, slant: str, rng, k: int, task: TaskConfig) -> list[str]:
    """Captions in the prompt stage's template phrasings, with the image's true slant and
    thickness and random other context words (the task's context axes)."""
    out = []
    for _ in range(k):
        ctx = {a: str(rng.choice(v)) for a, v in task.context.items()}
        ctx.update({a: v for a, v in (("slant", slant), ("thickness", thick)) if a in ctx})
        cls = WORDS[digit] if rng.random() < 0.5 else str(digit)
        out.append(render(int(rng.integers(len(TEMPLATES))), task.subject, cls, color, ", ".join(ctx.values())))
    return out


def caption_images(imgs: np.ndarray, digits, groups, group_names: list[str], k: int, seed: int,
                   bank: str = "all") -> list[list[str]]:
    """k captions per RGB digit image, naming its digit, colour and style (thickness by tercile, slant);
    with bank ``all``, half of them in the prompt stage's phrasings."""
    if bank not in ("all", "recipe"):
        raise ValueError(f"caption bank {bank!r}: choose all or recipe")
    task = DIGIT_TASK  # the Colored MNIST task's context axes
    st = np.array([style(im) for im in imgs])
    t1, t2 = np.quantile(st[:, 0], [1 / 3, 2 / 3])
    rng = np.random.default_rng(seed)
    caps = []
    for (ink, sl), d, g in zip(st, digits, groups):
        thick = "thin" if ink < t1 else "medium" if ink < t2 else "thick"
        slant = "slanted right" if sl > 0.15 else "slanted left" if sl < -0.15 else "upright"
        n = k if bank == "recipe" else k // 2
        cs = captions(int(d), group_names[int(g)], thick, slant, rng, n)
        if bank == "all":
            cs += stage_captions(int(d), group_names[int(g)], thick, slant, rng, k - n, task)
        caps.append(cs)
    return caps
