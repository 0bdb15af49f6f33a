"""The plain-PyTorch cores timed on one accelerator, no Ray (it fits a bare GPU machine):

- generation: images/s of a Stable-Diffusion-1.5-architecture pipeline with random weights (built from its
  configs, ``generate/random_arch.py``) through the project's one-batch function ``generate_batch``, at 512²,
  50 DDIM steps with classifier-free guidance, in fp16 and bf16; switches: SDPA attention (else diffusers'
  plain attention), channels-last, ``torch.compile`` of the UNet; and a 20-step DPM-Solver row;
- training: samples/s of ResNet-18 at 224², batch 128, through the project's ``train_step``: full fine-tuning,
  and selective fine-tuning (the tensors of layer4 and the head, ``selective.freeze``), with autocast.

    python benchmarks/gpu_suite.py                    # on a GPU: the full table
    python benchmarks/gpu_suite.py --tiny             # CPU-sized architectures: checks the suite runs
    python benchmarks/gpu_suite.py --only generate --switches base,compile

Prints the device and a table; writes benchmarks/results/gpu_suite[-tiny].json. The SD-1.5 compute floor:
70.2 TFLOP per 512² image at 50 steps with guidance (11.4 images/s on an H100 at its measured bf16 rate).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLUMNS = ["workload", "dtype", "switches", "batch", "steps", "per_s", "unit", "ms_per_batch"]
SD15_TFLOP_PER_IMAGE = 70.2


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Seconds per call after one warm-up call (which also pays compilation)."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def generation_rows(tiny: bool, device: str, dtypes: list[str], switches: list[str], batch: int, repeats: int) -> list:
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from aimfair_ray.generate.images import generate_batch
    from aimfair_ray.generate.random_arch import SD15, TINY, random_sd

    size, steps = (32, 4) if tiny else (512, 50)
    prompts = [f"a photo of a smiling person, number {i}" for i in range(batch)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = random_sd(Path(tmp), TINY if tiny else SD15)
        for dtype in dtypes:
            pipe = base.to(device, getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype]))
            pipe.set_progress_bar_config(disable=True)
            for sw in switches:
                pipe.unet.set_attn_processor(AttnProcessor() if sw == "no-sdpa" else AttnProcessor2_0())
                pipe.unet.to(memory_format=torch.channels_last if sw == "channels-last" else torch.contiguous_format)
                unet = pipe.unet
                if sw == "compile":
                    pipe.unet = torch.compile(unet)
                n_steps, sched = (20, "dpm") if sw == "dpm-20" else (steps, "ddim")
                ddim = pipe.scheduler
                if sched == "dpm":
                    pipe.scheduler = DPMSolverMultistepScheduler.from_config(ddim.config)
                secs = timed(functools.partial(generate_batch, pipe, prompts, list(range(batch)), n_steps, 7.5,
                                               size=size), device, repeats)
                arch = "tiny-sd" if tiny else "sd15-arch"
                rows.append({"workload": f"{arch} {size}px cfg", "dtype": dtype, "switches": sw, "batch": batch,
                             "steps": n_steps, "per_s": round(batch / secs, 3), "unit": "images/s",
                             "ms_per_batch": round(secs * 1000, 1)})
                pipe.unet, pipe.scheduler = unet, ddim
                print(_line(rows[-1]), flush=True)
    return rows


def train_rate(device: str, dtype: str, mode: str, size: int, batch: int, repeats: int) -> tuple[float, int]:
    """(seconds per step, trained parameters) of ResNet-18 fine-tuning, ``full`` or ``selective``."""
    import torch

    from aimfair_ray.models import build_model
    from aimfair_ray.train.loop import train_step
    from aimfair_ray.train.selective import freeze, head_tensors

    torch.manual_seed(0)
    model = build_model("resnet18", 2, size, pretrained=False).to(device).to(memory_format=torch.channels_last)
    if mode == "selective":  # the last stage (layer4) and the head: 17 of 62 tensors, about 75% of the weights
        freeze(model, [n for n, _ in model.named_parameters() if "stages.3." in n or n.startswith("layer4.")]
               + head_tensors(model))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=device)
    cast = getattr(torch, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype])
    scaler = torch.amp.GradScaler(device, enabled=dtype == "fp16")

    def step():
        if dtype != "fp16":  # the project's own step (as the Ray Train loop runs it), under autocast
            with torch.autocast(device, dtype=cast, enabled=dtype != "fp32"):
                train_step(model, x, y, opt)
            return
        with torch.autocast(device, dtype=cast):  # fp16 needs a loss scaler, which train_step has not
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return timed(step, device, repeats), sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_rows(tiny: bool, device: str, dtypes: list[str], batch: int, repeats: int) -> list:
    size = 32 if tiny else 224
    rows = []
    for dtype in dtypes:
        for mode in ("full", "selective"):
            secs, trained = train_rate(device, dtype, mode, size, batch, repeats)
            rows.append({"workload": f"resnet18 {size}px {mode} ({trained / 1e6:.1f}M trained)", "dtype": dtype,
                         "switches": "channels-last", "batch": batch, "steps": 1, "per_s": round(batch / secs, 1),
                         "unit": "samples/s", "ms_per_batch": round(secs * 1000, 1)})
            print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict) -> str:
    return (f"{r['workload']:42} {r['dtype']:5} {r['switches']:14} {r['batch']:>5} {r['steps']:>5} "
            f"{r['per_s']:>10} {r['unit']:9} {r['ms_per_batch']:>10}")


def main(argv=None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny architectures (a CPU check of the suite)")
    ap.add_argument("--only", choices=["generate", "train"], help="one half of the suite")
    ap.add_argument("--dtypes", help="comma list of fp16, bf16, fp32 (default: fp16,bf16 on a GPU, fp32 on CPU)")
    ap.add_argument("--switches", default="base,no-sdpa,channels-last,compile,dpm-20",
                    help="generation variants: base (SDPA), no-sdpa, channels-last, compile, dpm-20")
    ap.add_argument("--gen-batch", type=int, default=None, help="images per generation batch (default 8; tiny 2)")
    ap.add_argument("--train-batch", type=int, default=None, help="default 128; tiny 4")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls after the warm-up (default 3; tiny 1)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    dtypes = a.dtypes.split(",") if a.dtypes else (["fp16", "bf16"] if device == "cuda" else ["fp32"])
    repeats = a.repeats or (1 if a.tiny else 3)
    name = device_name(device)
    print(f"device: {name}; torch {torch.__version__}; {'tiny' if a.tiny else 'full-size'} architectures", flush=True)
    print(f"{'workload':42} {'dtype':5} {'switches':14} {'batch':>5} {'steps':>5} {'per_s':>10} {'unit':9} {'ms/batch':>10}")
    rows = []
    if a.only in (None, "generate"):
        rows += generation_rows(a.tiny, device, dtypes, a.switches.split(","), a.gen_batch or (2 if a.tiny else 8),
                                repeats)
    if a.only in (None, "train"):
        rows += training_rows(a.tiny, device, dtypes, a.train_batch or (4 if a.tiny else 128), repeats)
    gen = [r for r in rows if r["unit"] == "images/s" and r["steps"] == 50]
    if gen and not a.tiny:
        best = max(gen, key=lambda r: r["per_s"])
        print(f"best 50-step rate {best['per_s']} images/s ({best['dtype']}, {best['switches']}): "
              f"{best['per_s'] * SD15_TFLOP_PER_IMAGE:.0f} TFLOP/s of the SD-1.5 floor's 70.2 TFLOP per image; "
              "goal >= 5 images/s per H100-class GPU")
    out = Path(a.out or f"benchmarks/results/gpu_suite{'-tiny' if a.tiny else ''}.json")
    result = {"device": name, "torch": torch.__version__, "tiny": a.tiny, "columns": COLUMNS, "rows": rows,
              "date": time.strftime("%Y-%m-%d")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
