"""EGT's per-group quality as the paper measures it (plain NumPy/PyTorch, no Ray): precision,
recall, density and coverage on toy point sets with known answers, FID through torchmetrics,
the unconditional setting's rejection sampling, and LoRA EGT on a tiny Stable-Diffusion pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aimfair_ray.egt.quality import frechet_distance, per_group, prdc, rejection_sample


def test_precision_recall_density_coverage_on_toy_sets_with_known_answers():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 4))
    same = prdc(real, real.copy(), k=5)
    assert same == {"precision": 1.0, "recall": 1.0, "density": 1.0, "coverage": 1.0}  # identical sets
    far = prdc(real, real + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}  # disjoint sets
    half = np.concatenate([real[:50], real[:50] + 100.0])  # half of the generated points on the real manifold
    assert prdc(real, half, k=5)["precision"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="more than 5 samples"):
        prdc(real[:5], real, k=5)


def test_fid_is_zero_for_identical_sets_and_the_squared_shift_for_a_shifted_one():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0, 3.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)  # same covariance


def test_per_group_metrics_gaps_and_full_rank():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(120, 3))
    groups = np.repeat([0, 1], 60)
    fake = real.copy()
    fake[groups == 1] += 50.0  # group 1 generated far from its real images
    q = per_group(real, groups, fake, groups, ["a", "b"], k=3)
    assert q["precision"] == {"a": 1.0, "b": 0.0} and q["recall"] == {"a": 1.0, "b": 0.0}
    assert q["gap"]["precision"] == 1.0 and q["gap"]["recall"] == 1.0
    assert q["fid"]["a"] == pytest.approx(0.0, abs=1e-6) and q["fid"]["b"] > 1000
    assert q["gap"]["fid"] == pytest.approx(q["fid"]["b"] - q["fid"]["a"])
    assert q["full_rank"]  # 60 samples per group > 3 dimensions
    assert not per_group(real[:, :1].repeat(100, 1), groups, fake[:, :1].repeat(100, 1), groups, ["a", "b"], k=3)["full_rank"]


def test_rejection_sampling_reaches_the_count_of_every_group_and_reports_the_draws():
    """A model that makes group 1 in 1 of 10 draws: the oracle sorts the stream until both groups have 20."""
    def draw(start, k):
        return np.arange(start, start + k)  # sample i is the number i

    oracle = lambda x: (x % 10 == 3).astype(int)
    kept, info = rejection_sample(draw, oracle, 2, 20, batch_size=16, max_draws=1000)
    assert [len(k) for k in kept] == [20, 20] and info["short"] == {}
    assert (kept[1] % 10 == 3).all() and not (kept[0] % 10 == 3).any()
    assert kept[0].tolist() == [i for i in range(30) if i % 10 != 3][:20]  # the first of the stream, in order
    assert info["drawn"] == 208 and info["share"][1] == pytest.approx(21 / 208)  # 13 batches of 16
    again, _ = rejection_sample(draw, oracle, 2, 20, batch_size=16, max_draws=1000)
    assert all(np.array_equal(a, b) for a, b in zip(kept, again))  # the same stream, the same samples
    short, info = rejection_sample(draw, oracle, 2, 20, batch_size=16, max_draws=100)
    assert info["drawn"] == 100 and info["short"] == {1: 10} and len(short[1]) == 10


def test_lora_egt_on_a_tiny_sd_pipeline_saves_adapters_that_load_lora_weights_loads(tmp_path):
    """LoRA adapters on the UNet of a tiny random SD pipeline: only they train; saved in the diffusers
    format, loaded by ``load_lora_weights`` (and by ``load_pipeline``, what Serve's image generator
    uses), they change the pipeline's images."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from tiny_models import tiny_sd

    from aimfair_ray.egt.image import DiffusionTask
    from aimfair_ray.generate.t2i import load_pipeline
    from aimfair_ray.minmax import Objective

    base = tiny_sd(tmp_path)
    task = DiffusionTask(base, lora_rank=2)
    trained = [n for n, p in task.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    frozen = {n: p.detach().clone() for n, p in task.model.named_parameters() if not p.requires_grad}
    imgs = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    x0, text = task.encode_images(imgs), task.encode_text(["a red digit"] * 4 + ["a green digit"] * 4)
    groups = torch.tensor([0] * 6 + [1] * 2)
    objective = Objective("minmax", 2, eta=1.0, n_buckets=2, num_timesteps=task.T, rule="worst", ema=0.5)
    opt = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        losses, t = task.losses(task.model, x0, text, g)
        opt.zero_grad()
        objective(losses, groups, t).backward()
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in task.model.named_parameters() if not p.requires_grad)
    assert set(task.trained_state()) == set(trained)

    out = tmp_path / "model"
    out.mkdir()
    task.save(str(out))
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert saved and all(k.startswith("unet.") and "lora" in k for k in saved)  # the diffusers LoRA format
    assert json.loads((out / "adapter.json").read_text())["lora_rank"] == 2

    def images(pipe):
        return pipe(["a red digit"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    plain = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    before = images(plain)
    plain.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")  # diffusers' own loader
    assert not np.allclose(images(plain), before)
    served = load_pipeline(str(out))  # what `aimfair serve --image-pipeline <model>` loads
    assert np.allclose(images(served), images(plain), atol=1e-5)
