"""The diffusion side of EGT, in plain PyTorch (no Ray).

Data: Colored MNIST digits whose stroke colour is the sensitive group, with captions that
name digit, colour and style. The fine-tuning set is group-imbalanced (``minority_share``
of group 1); the evaluation set is balanced, built from other digits, and the same for
every objective and seed.

Task: the per-sample denoising loss of a diffusers pipeline (the target follows the
scheduler's ``prediction_type``), with the timestep of each sample, so that the min–max
can act per noise level. The embedded pipeline is conditioned through its text projection;
a Stable-Diffusion-style pipeline (VAE, CLIP text encoder, cross-attention UNet) through
``encoder_hidden_states`` in its VAE's latent space.

Quality per group: the denoising loss averaged over a fixed grid of noise levels (the ELBO
proxy of the KL divergence), the Fréchet distance between generated and real images in
EfficientNet-Lite0 feature space, and the share of generated images whose stroke colour
(read off the pixels by the checker) is the requested group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from aimfair_ray.data.captions import caption_images
from aimfair_ray.data.cmnist import colorize, load_mnist_5k, stroke_color
from aimfair_ray.data.codecs import to_unit
from aimfair_ray.egt.tasks import EGTTask, register
from aimfair_ray.generate.t2i import AimfairT2IPipeline, TextEncoder, as_uint8, embedded_weights, load_pipeline


@dataclass
class ImageSet:
    images: np.ndarray          # uint8 [N, 32, 32, 3]
    captions: list[str]         # one per image
    groups: np.ndarray          # int [N]


def image_sets(colors, group_names, n_train: int, minority_share: float, n_eval_per_group: int, jitter: int,
               data_seed: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """(imbalanced fine-tuning set, balanced evaluation set) from disjoint real digits. The evaluation
    set depends on ``data_seed`` only; the fine-tuning draw on ``seed`` too."""
    digits, labels = load_mnist_5k()
    order = np.random.default_rng(data_seed).permutation(len(labels))
    G = len(colors)
    n_eval = G * n_eval_per_group
    if n_eval + n_train > len(labels):
        raise ValueError(f"egt image sets need {n_eval + n_train} digits; the bundled MNIST has {len(labels)}")
    ev = order[:n_eval]
    ev_groups = np.repeat(np.arange(G), n_eval_per_group)
    rng = np.random.default_rng(seed)
    tr = rng.permutation(order[n_eval:])[:n_train]
    n_min = int(round(minority_share * n_train))
    tr_groups = np.zeros(n_train, dtype=int)
    tr_groups[:n_min] = 1
    rng.shuffle(tr_groups)

    def make(idx, groups, rng_, cap_seed):
        imgs = colorize(digits[idx], groups, colors, jitter, 32, rng_)
        caps = [c[0] for c in caption_images(imgs, labels[idx], groups, group_names, 1, cap_seed)]
        return ImageSet(imgs, caps, groups)

    return (make(tr, tr_groups, rng, seed),
            make(ev, ev_groups, np.random.default_rng(data_seed + 1), data_seed))


class Denoiser(nn.Module):
    """The pipeline's trained parts as one module (so that DDP sees one forward)."""

    def __init__(self, unet: nn.Module, text_proj: nn.Module | None):
        super().__init__()
        self.unet, self.text_proj = unet, text_proj

    def forward(self, xt, t, tokens=None, mask=None, hidden=None):
        if self.text_proj is not None:  # the embedded model: pooled text through its projection
            return self.unet(xt, t, class_labels=self.text_proj(tokens, mask)).sample
        return self.unet(xt, t, encoder_hidden_states=hidden).sample


class DiffusionTask:
    """What the min–max trains: a pipeline's denoiser (and the embedded model's text projection)."""

    def __init__(self, pipeline: str | None, device: str = "cpu"):
        self.pipe = load_pipeline(pipeline or embedded_weights(), device=device)
        self.embedded = isinstance(self.pipe, AimfairT2IPipeline)
        self.device = device
        self.sched = self.pipe.scheduler
        self.T = int(self.sched.config.num_train_timesteps)
        if self.embedded:
            self._encoder = TextEncoder(device)
        self.model = Denoiser(self.pipe.unet, self.pipe.text_proj if self.embedded else None)  # the trained tensors
        self.vae = getattr(self.pipe, "vae", None)
        if self.vae is not None:
            self.vae.requires_grad_(False)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> dict:
        """Frozen text features of the captions (computed once per set)."""
        if self.embedded:
            tok, mask = self._encoder(captions, length=64)
            return {"tokens": tok, "mask": mask}
        ids = self.pipe.tokenizer(captions, padding="max_length", truncation=True,
                                  max_length=self.pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
        return {"hidden": torch.cat([self.pipe.text_encoder(ids[i:i + 64].to(self.device))[0]
                                     for i in range(0, len(ids), 64)])}

    @torch.no_grad()
    def encode_images(self, images: np.ndarray) -> torch.Tensor:
        x = to_unit(images).to(self.device)
        if self.vae is None:
            return x
        size = self.pipe.unet.config.sample_size * getattr(self.pipe, "vae_scale_factor", 8)
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    def losses(self, model: nn.Module, x0: torch.Tensor, text: dict, generator: torch.Generator,
               t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample denoising losses and their timesteps (drawn uniformly unless given)."""
        n = len(x0)
        if t is None:
            t = torch.randint(0, self.T, (n,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        t = t.to(x0.device)
        xt = self.sched.add_noise(x0, noise, t)
        kind = self.sched.config.prediction_type
        target = noise if kind == "epsilon" else self.sched.get_velocity(x0, noise, t) if kind == "v_prediction" else x0
        pred = model(xt, t, **text)
        return ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, x0.dim()))), t

    def trained_state(self) -> dict:
        return {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}

    def load_trained(self, state: dict) -> None:
        self.model.load_state_dict(state)


def _text_rows(text: dict, idx) -> dict:
    return {k: v[idx] for k, v in text.items()}


@torch.no_grad()
def denoising_quality(task: DiffusionTask, data: ImageSet, n_levels: int = 8, seed: int = 0,
                      batch_size: int = 128) -> np.ndarray:
    """Per-image denoising loss averaged over ``n_levels`` evenly spaced noise levels, with fixed
    noise: the same numbers for the same weights."""
    model = task.model.eval()
    x0, text = task.encode_images(data.images), task.encode_text(data.captions)
    levels = ((torch.arange(n_levels) + 0.5) * task.T / n_levels).long()
    total = torch.zeros(len(x0))
    g = torch.Generator().manual_seed(seed)
    for t in levels:
        for i in range(0, len(x0), batch_size):
            sl = slice(i, i + batch_size)
            loss, _ = task.losses(model, x0[sl], _text_rows(text, sl), g, torch.full((len(x0[sl]),), int(t)))
            total[sl] += loss.cpu()
    return (total / n_levels).numpy()


@torch.no_grad()
def generate(task: DiffusionTask, prompts: list[str], steps: int, guidance: float, seed: int,
             batch_size: int = 64) -> np.ndarray:
    task.model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(seed * 100_003 + i + j) for j in range(len(prompts[i:i + batch_size]))]
        res = task.pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                        generator=gens, output_type="np")
        imgs = as_uint8(res.images)
        if imgs.shape[1] != 32:
            from PIL import Image

            imgs = np.stack([np.asarray(Image.fromarray(im).resize((32, 32))) for im in imgs])
        out.append(imgs)
    return np.concatenate(out)


def image_quality(task: DiffusionTask, data: ImageSet, group_names: list[str], colors, features, n_levels: int,
                  steps: int, guidance: float, seed: int = 0) -> dict:
    """Per-group quality of the task's current weights on the balanced evaluation set."""
    from aimfair_ray.egt.quality import frechet_distance, gap

    den = denoising_quality(task, data, n_levels, seed)
    gen = generate(task, data.captions, steps, guidance, seed)
    real_f, gen_f = features(data.images), features(gen)
    confirmed = stroke_color(gen, colors) == data.groups
    out = {"denoise": {}, "fd": {}, "group_confirmed": {}}
    for g, name in enumerate(group_names):
        sel = data.groups == g
        out["denoise"][name] = float(den[sel].mean())
        out["fd"][name] = frechet_distance(real_f[sel], gen_f[sel])
        out["group_confirmed"][name] = float(confirmed[sel].mean())
    out["gap"] = {"denoise": gap(out["denoise"]), "fd": gap(out["fd"])}
    out["overall"] = {"denoise": float(den.mean()), "fd": frechet_distance(real_f, gen_f),
                      "group_confirmed": float(confirmed.mean())}
    out["n_per_group"] = int((data.groups == 0).sum())
    return out


@register
class ImageTask(EGTTask):
    """EGT on a text-to-image pipeline: Colored MNIST digits, stroke colour as the group; the
    min–max weights act per noise bucket."""

    kind = "image"
    objectives = ("erm", "reweight", "minmax")
    metrics = ("denoise", "fd")
    extra_metrics = {"group_confirmed": "group confirmed by the checker (share of generated images in the requested colour)"}
    noise_levels = True

    @staticmethod
    def group_names(cfg) -> list[str]:
        from aimfair_ray.data.cmnist import group_names

        return group_names(cfg.data.colors)

    @staticmethod
    def datasets(cfg, seed: int):
        from aimfair_ray import AimfairError

        if len(cfg.data.colors) != 2:
            raise AimfairError("EGT on images compares 2 groups: set data.colors to 2 colours")
        e = cfg.egt
        return image_sets(cfg.data.colors, ImageTask.group_names(cfg), e.image.n_train, e.minority_share,
                          e.image.n_eval_per_group, cfg.data.color_jitter, cfg.data.seed, seed)

    @staticmethod
    def settings(cfg):
        return cfg.egt.image

    @staticmethod
    def data_key(cfg) -> dict:
        return {"colors": cfg.data.colors, "color_jitter": cfg.data.color_jitter, "seed": cfg.data.seed}

    @staticmethod
    def model_name(cfg) -> str:
        return cfg.egt.image.pipeline or "the embedded text-to-image model"

    def __init__(self, cfg, device: str):
        self.task = DiffusionTask(cfg.egt.image.pipeline, device)
        self.model, self.T, self.device = self.task.model, self.task.T, device

    def bind(self, train_set, shard) -> None:  # frozen encodings of the shard, once
        self.x0 = self.task.encode_images(train_set.images[shard])
        self.text = self.task.encode_text([train_set.captions[i] for i in shard])

    def losses(self, model, batch: torch.Tensor, generator: torch.Generator):
        return self.task.losses(model, self.x0[batch].to(self.device),
                                {k: v[batch].to(self.device) for k, v in self.text.items()}, generator)

    def trained_state(self) -> dict:
        return self.task.trained_state()

    def load_trained(self, state: dict) -> None:
        self.task.load_trained(state)

    def quality(self, cfg, eval_set) -> dict:
        from aimfair_ray.egt.quality import Features

        i = cfg.egt.image
        return image_quality(self.task, eval_set, self.group_names(cfg), cfg.data.colors,
                             Features(i.features, i.feature_size, self.device), i.noise_levels, i.sample_steps,
                             i.guidance_scale, cfg.data.seed)

    def save(self, cfg, directory: str) -> None:
        self.task.pipe.save_pretrained(directory)  # a diffusers pipeline folder that Serve can load
