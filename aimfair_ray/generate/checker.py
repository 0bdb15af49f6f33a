"""An independent checker for Colored MNIST images, real or generated: a 10-way digit CNN
trained on real MNIST digits (grey: colour plays no part), and the stroke colour read
off the pixels (the nearest configured colour). Used for the embedded model's quality
report and for the faithfulness filter. Plain PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from aimfair_ray import progress
from aimfair_ray.data.cmnist import load_mnist_5k, stroke_color
from aimfair_ray.models import SmallCNN


def grey(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 1, 32, 32] stroke intensity."""
    g = torch.from_numpy(np.ascontiguousarray(images)).float().amax(dim=3, keepdim=True).permute(0, 3, 1, 2) / 255.0
    g = g / g.amax(dim=(2, 3), keepdim=True).clamp(min=1e-3)  # colour brightness does not matter
    return F.interpolate(g, size=32, mode="bilinear", align_corners=False) if g.shape[-1] != 32 else g


class Checker:
    def __init__(self, colors, model: SmallCNN | None = None):
        self.colors = [list(c) for c in colors]
        self.model = (model or SmallCNN(10, 16)).eval()
        _adapt(self.model)

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> dict:
        digits = torch.cat([self.model(grey(images[i:i + 512])).argmax(1) for i in range(0, len(images), 512)]).numpy()
        return {"digit": digits, "target": (digits >= 5).astype(int), "group": stroke_color(images, self.colors)}

    def save(self, path: str) -> None:
        """Whole (a temporary folder renamed into place), with its manifest (sha256 of the weights)."""
        from aimfair_ray import manifest
        from aimfair_ray.storage import atomic_dir

        with atomic_dir(path) as tmp:
            p = Path(tmp)
            p.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(p / "checker.safetensors"))
            (p / "checker.json").write_text(json.dumps({"colors": self.colors}))
            manifest.write(tmp, redo="aimfair generate filter")

    @classmethod
    def load(cls, path: str) -> "Checker":
        from aimfair_ray import manifest
        from aimfair_ray.storage import local_copy

        manifest.verify(path, f"remove {path} (the filter trains it again)")
        path = local_copy(path)  # on an object store: this node's copy
        c = cls(json.loads((Path(path) / "checker.json").read_text())["colors"])
        c.model.load_state_dict(load_file(str(Path(path) / "checker.safetensors")))
        return c


def _adapt(model: SmallCNN) -> None:
    conv = model.features[0][0]
    if conv.in_channels != 1:
        model.features[0][0] = torch.nn.Conv2d(1, conv.out_channels, 3, padding=1, bias=False)


def train_checker(colors, exclude: set[int] = frozenset(), epochs: int = 10, seed: int = 0, threads: int = 2,
                  log=print) -> tuple[Checker, float]:
    """Train on real digits (minus ``exclude`` indices); returns the checker and its held-out accuracy."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    digits, labels = load_mnist_5k()
    keep = np.array([i for i in range(len(labels)) if i not in exclude])
    rng = np.random.default_rng(seed)
    rng.shuffle(keep)
    hold, tr = keep[:400], keep[400:]
    x = torch.from_numpy(np.pad(digits, ((0, 0), (2, 2), (2, 2)))).float().unsqueeze(1) / 255.0
    y = torch.from_numpy(labels).long()
    ck = Checker(colors)
    model = ck.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * ((len(tr) + 127) // 128))
    best, best_state = -1.0, None
    log(f"checker: training the digit checker on {len(tr)} real digits, {epochs} epochs (once per run)")
    for epoch in range(epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(tr))
        for i in range(0, len(perm), 128):
            b = perm[i:i + 128]
            xb = x[b]
            shift = tuple(int(s) for s in rng.integers(-2, 3, size=2))  # small translations
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(x[hold]).argmax(1) == y[hold]).float().mean())
        if acc > best:
            best, best_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
        progress.update("checker epochs", epoch + 1, epochs)
    model.load_state_dict(best_state)
    acc = best
    log(f"checker: digit accuracy on {len(hold)} held-out real digits: {acc:.4f}")
    return ck, acc
