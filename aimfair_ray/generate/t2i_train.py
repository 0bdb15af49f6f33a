"""Training recipe of the embedded text-to-image model, in plain PyTorch (no Ray).

Data: the Colored MNIST ``generator`` split (uniform colours), with captions that name
the digit (as a word or numeral), its colour and its style (stroke thickness, slant),
in several phrasings. Caption bank ``all`` (the default) adds the prompt stage's own
template phrasings with its context words (pen, marker, background...), so that
generation prompts are in-distribution; ``recipe`` uses the recipe's templates only.
Objective: v-prediction on a cosine noise schedule, 10% of captions dropped for classifier-free
guidance, AdamW with warm-up and cosine decay, EMA weights. Checkpoints every ``save_every`` steps make the run resumable; the EMA
pipeline is exported with ``save_pretrained``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from aimfair_ray.data.captions import caption_images
from aimfair_ray.data.cmnist import load_mnist_5k
from aimfair_ray.data.codecs import decode_png, to_unit
from aimfair_ray.generate.t2i import TEXT_DIM, AimfairT2IPipeline, TextEncoder, TextProjection, make_scheduler, make_unet
from aimfair_ray.models import load_optimizer, save_optimizer


def load_generator_split(split_dir: str, group_names: list[str], k: int, seed: int, bank: str = "all"):
    """Images [N, 3, 32, 32] in [-1, 1] and k captions per image."""
    from aimfair_ray.data.io import read_table

    table = read_table(split_dir, ["id", "image", "group"])
    _, labels = load_mnist_5k()
    imgs = np.stack([decode_png(b) for b in table["image"].to_pylist()])
    digits = [int(labels[int(i.rsplit("-", 1)[1])]) for i in table["id"].to_pylist()]
    groups = table["group"].to_pylist()
    caps = caption_images(imgs, digits, groups, group_names, k, seed, bank)
    return to_unit(imgs), caps, np.array(digits), np.array(groups)


def train(split_dir: str, out_dir: str, group_names: list[str], steps: int = 4000, batch_size: int = 64,
          lr: float = 4e-4, ema_decay: float = 0.999, cond_drop: float = 0.1, save_every: int = 250,
          captions_per_image: int = 8, seed: int = 0, threads: int = 2, caption_bank: str = "all",
          stop_at: int | None = None, log=print) -> str:
    """Train (or resume) to ``steps``; ``stop_at`` ends the run early at that step, with the
    learning-rate schedule still that of ``steps``."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out_dir)
    ck = out / "ckpt"
    ck.mkdir(parents=True, exist_ok=True)
    x, caps, _, _ = load_generator_split(split_dir, group_names, captions_per_image, seed, caption_bank)
    enc = TextEncoder()
    flat = [c for cs in caps for c in cs]
    L = max(len(enc.tokenizer(c)["input_ids"]) for c in flat)
    parts = [enc(flat[i:i + 256], length=L) for i in range(0, len(flat), 256)]
    tokens = torch.cat([p[0] for p in parts]).view(len(caps), captions_per_image, L, TEXT_DIM)
    masks = torch.cat([p[1] for p in parts]).view(len(caps), captions_per_image, L)
    null_t, null_m = enc([""], length=L)  # caption dropout uses the empty prompt
    log(f"t2i: {len(x)} images, {len(flat)} captions encoded ({L} tokens, bank {caption_bank})")

    unet, proj, sched = make_unet(), TextProjection(out_dim=128), make_scheduler()
    params = list(unet.parameters()) + list(proj.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    start, banks = 0, []
    if (ck / "state.json").is_file():
        state = json.loads((ck / "state.json").read_text())
        w = load_file(str(ck / "train.safetensors"))
        for i, p in enumerate(params):
            p.data.copy_(w[f"p{i}"])
            ema[i].copy_(w[f"ema{i}"])
        load_optimizer(opt, ck / "optim")
        start, banks = state["step"], state.get("caption_banks", [[0, "recipe"]])
        log(f"t2i: resuming at step {start}")
    warm = 200

    def lr_at(s):
        return lr * min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))

    if not banks or banks[-1][1] != caption_bank:
        banks.append([start, caption_bank])  # [first step, bank]: the recipe's caption history
    g = torch.Generator().manual_seed(seed + start)
    t0, losses = time.time(), []
    end = min(steps, stop_at or steps)
    for step in range(start, end):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        x0 = x[idx]
        j = torch.randint(0, captions_per_image, (batch_size,), generator=g)
        tk, mk = tokens[idx, j], masks[idx, j]
        drop = torch.rand(batch_size, generator=g) < cond_drop
        tk = torch.where(drop[:, None, None], null_t.expand_as(tk), tk)
        mk = torch.where(drop[:, None], null_m.expand_as(mk), mk)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=g)
        xt = sched.add_noise(x0, noise, t)
        target = sched.get_velocity(x0, noise, t)
        loss = F.mse_loss(unet(xt, t, class_labels=proj(tk, mk)).sample, target)
        for pg in opt.param_groups:
            pg["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema, params):
                pe.lerp_(p.detach(), 1 - d)
        losses.append(float(loss.detach()))
        if (step + 1) % 50 == 0:
            log(f"t2i: step {step + 1}/{steps} loss {np.mean(losses[-50:]):.4f} {(time.time() - t0) / len(losses):.2f}s/step")
        if (step + 1) % save_every == 0 or step + 1 == end:
            w = {f"p{i}": p.detach().contiguous() for i, p in enumerate(params)}
            w.update({f"ema{i}": pe.contiguous() for i, pe in enumerate(ema)})
            save_file(w, str(ck / "train.safetensors.tmp"))
            (ck / "optim.tmp").mkdir(exist_ok=True)
            save_optimizer(opt, ck / "optim.tmp")
            (ck / "train.safetensors.tmp").replace(ck / "train.safetensors")
            shutil.rmtree(ck / "optim", ignore_errors=True)
            (ck / "optim.tmp").replace(ck / "optim")
            (ck / "state.json").write_text(json.dumps({"step": step + 1, "loss": float(np.mean(losses[-50:])),
                                                         "caption_banks": banks}))
            export(unet, proj, sched, params, ema, out / "pipeline")
    return str(out / "pipeline")


def export(unet, proj, sched, params, ema, path: Path) -> None:
    """Save the EMA weights as a diffusers pipeline folder (atomically)."""
    import copy
    import shutil

    u, p = copy.deepcopy(unet), copy.deepcopy(proj)
    for dst, src in zip(list(u.parameters()) + list(p.parameters()), ema):
        dst.data.copy_(src)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    AimfairT2IPipeline(unet=u, text_proj=p, scheduler=sched).save_pretrained(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)
