"""A fixed CPU score for this machine, so that test-suite and benchmark times from different machines can be
compared as ratios: a few seconds of the kind of work the suite does (small torch convolutions and matrix
products, a forward and backward pass, on one thread; then plain Python: dicts, sorting, JSON).

    python benchmarks/machine_score.py [--json FILE]

Each part runs a fixed amount of work, best of 3 tries; its score is 100 x REFERENCE_S / seconds, so
the machine the references came from scores about 100 and a machine twice as fast about 200. The score
is their geometric mean. `make test` runs it first and the suite's summary prints it beside the suite's
time: a suite time divided by (100 / score) is what it would have taken on the reference machine.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time

# seconds per part on the reference machine (idle, the median of 3 runs): 2 cores (x86_64), 24 GiB, no GPU;
# torch 2.13.0+cpu, Python 3.11 (2026-12-07)
REFERENCE_S = {"torch": 0.95, "python": 0.74}


def _torch_work() -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, padding=1),
                               torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 2))
    x = torch.randn(32, 3, 32, 32, generator=g)
    y = torch.randint(0, 2, (32,), generator=g)
    for _ in range(36):
        conv.zero_grad()
        torch.nn.functional.cross_entropy(conv(x), y).backward()
    a = torch.randn(256, 256, generator=g)
    for _ in range(180):
        a = torch.tanh(a @ a.T / 256)


def _python_work() -> None:
    rng = random.Random(0)
    rows = [{"id": i, "cell": f"y{rng.randrange(2)}_s{rng.randrange(2)}", "score": rng.random()} for i in range(120_000)]
    by_cell: dict[str, list[float]] = {}
    for r in rows:
        by_cell.setdefault(r["cell"], []).append(r["score"])
    for scores in by_cell.values():
        scores.sort()
    json.loads(json.dumps(rows))
    sorted(rows, key=lambda r: (r["cell"], -r["score"]))


def _best_of(fn, tries: int = 3) -> float:
    best = math.inf
    for _ in range(tries):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def score() -> dict:
    """Run both parts; their seconds, scores, the combined score, and the machine in words."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _torch_work()  # warm-up: first-call allocations and kernel selection are not the machine's speed
        secs = {"torch": _best_of(_torch_work), "python": _best_of(_python_work)}
    finally:
        torch.set_num_threads(threads)
    parts = {k: 100 * REFERENCE_S[k] / s for k, s in secs.items()}
    from aimfair_ray.tables import stamp

    return {"score": round(math.prod(parts.values()) ** (1 / len(parts)), 1),
            "parts": {k: round(v, 1) for k, v in parts.items()}, "seconds": {k: round(v, 3) for k, v in secs.items()},
            "reference_s": REFERENCE_S, **stamp(" ".join(["python", *sys.argv]))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args(argv)
    res = score()
    print(f"machine score {res['score']} (torch {res['parts']['torch']}, python {res['parts']['python']}; "
          f"reference machine = 100) on {res['machine']}")
    if a.json:
        from pathlib import Path

        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
