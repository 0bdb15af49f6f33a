"""What every results writer shares (the AIM-Fair and EGT benchmarks, sweeps, audits, the
selection chart): a matplotlib figure as PNG bytes, mean ± std over seeds, and Markdown and
CSV tables."""

from __future__ import annotations

import functools
import io
import math
from typing import Iterable, Sequence

import numpy as np


@functools.cache
def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed); the backend is set on the first call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    pyplot().close(fig)
    return buf.getvalue()


def mean_std(values: Sequence[float]) -> dict:
    """``{"mean", "std", "values"}``: the sample standard deviation (ddof 1), 0 for a single value."""
    vals = [float(v) for v in values]
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, "values": vals}


def t95(n: int) -> float:
    """The two-sided 95% Student-t quantile for n values (n - 1 degrees of freedom)."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def summary(values) -> dict:
    """Mean, sample std, the 95% interval of the mean, and the values."""
    out = mean_std(values)
    half = t95(len(out["values"])) * out["std"] / math.sqrt(len(out["values"]))
    out["ci95"] = [out["mean"] - half, out["mean"] + half] if len(out["values"]) > 1 else [out["mean"], out["mean"]]
    return out


def verdict(d: dict, higher: bool) -> str:
    """What a paired difference (``ref - other`` over seeds, with its 95% interval) says: "better" or "worse" when
    the interval excludes 0, else that the data do not decide at this many seeds."""
    lo, hi = d["ci95"]
    if d["n"] > 1 and (lo > 0 if higher else hi < 0):
        return "better"
    if d["n"] > 1 and (hi < 0 if higher else lo > 0):
        return "worse"
    return f"not decided at {d['n']} seed{'s' if d['n'] != 1 else ''}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    """A Markdown table's lines: ``| a | b |``, the rule, then one line per row (cells as ``str``)."""
    return (["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def csv_text(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """CSV text with a header line (pandas; cells written as given, ``None`` as empty)."""
    import pandas as pd

    return pd.DataFrame(list(rows), columns=list(header), dtype=object).to_csv(index=False, lineterminator="\n")


def machine() -> str:
    """The machine a benchmark ran on, in words."""
    import os
    import platform

    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {mem:.0f} GiB, {gpu}; torch {torch.__version__}"


def stamp(command: str) -> dict:
    """What a results file records about its making: ``{"command", "machine", "date"}`` (UTC, to the second)."""
    from datetime import datetime, timezone

    return {"command": command, "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
