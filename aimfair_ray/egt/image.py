"""The diffusion side of EGT, in plain PyTorch (no Ray).

Data: Colored MNIST digits whose stroke colour is the sensitive group. The fine-tuning set is
group-imbalanced (``minority_share`` of group 1); the evaluation set is balanced, built from
other digits, and the same for every objective and seed.

Two settings. **Unconditional** (the paper's main one; objectives erm, reweight, minmax): the
captions name digit and style but not the colour, so the model is trained and sampled without
its group; generated images are sorted into groups by the checker (the stroke colour read off
the pixels) as oracle, with rejection sampling up to the per-group count. **Conditional**
(objective ``conditional``): the captions name the colour, and each group's images are drawn
from its own captions.

Task: the per-sample denoising loss of a diffusers pipeline (the target follows the
scheduler's ``prediction_type``), with the timestep of each sample, so that the min–max
can act per noise level. The embedded pipeline is conditioned through its text projection;
a Stable-Diffusion-style pipeline (VAE, CLIP text encoder, cross-attention UNet) through
``encoder_hidden_states`` in its VAE's latent space, in full or through LoRA adapters (peft)
on its attention projections, saved in the diffusers LoRA format.

Quality per group (:mod:`egt.quality`): FID, precision, recall, density and coverage of the
generated images against the group's real ones in a pretrained feature space, and the
denoising loss averaged over a fixed grid of noise levels (the ELBO proxy of the KL divergence).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aimfair_ray import AimfairError
from aimfair_ray.data.captions import caption_images
from aimfair_ray.data.cmnist import colorize, load_mnist_5k, stroke_color
from aimfair_ray.data.codecs import to_unit
from aimfair_ray.egt.tasks import EGTTask, register
from aimfair_ray.generate.t2i import LORA_WEIGHTS, AimfairT2IPipeline, TextEncoder, as_uint8, embedded_weights, load_pipeline


@dataclass
class ImageSet:
    images: np.ndarray          # uint8 [N, 32, 32, 3]
    captions: list[str]         # one per image
    groups: np.ndarray          # int [N]


BLIND = "colour"  # the colour word of a group-blind caption (unconditional setting)
LORA_FILE, ADAPTER = LORA_WEIGHTS, "adapter.json"  # an SD LoRA model folder


def image_sets(colors, group_names, n_train: int, minority_share: float, n_eval_per_group: int, jitter: int,
               data_seed: int, seed: int, conditional: bool = True) -> tuple[ImageSet, ImageSet]:
    """(imbalanced fine-tuning set, balanced evaluation set) from disjoint real digits. The evaluation
    set depends on ``data_seed`` only; the fine-tuning draw on ``seed`` too. Without ``conditional``
    the captions do not name the colour."""
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
        names = group_names if conditional else [BLIND] * len(group_names)
        caps = [c[0] for c in caption_images(imgs, labels[idx], groups, names, 1, cap_seed)]
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

    def __init__(self, pipeline: str | None, device: str = "cpu", lora_rank: int = 0):
        self.pipe = load_pipeline(pipeline or embedded_weights(), device=device)
        self.embedded = isinstance(self.pipe, AimfairT2IPipeline)
        self.device, self.lora_rank, self.base = device, lora_rank, pipeline
        self.sched = self.pipe.scheduler
        self.T = int(self.sched.config.num_train_timesteps)
        if self.embedded:
            self._encoder = TextEncoder(device)
        if lora_rank:
            self._lora(lora_rank)
        self.model = Denoiser(self.pipe.unet, self.pipe.text_proj if self.embedded else None)  # the trained tensors
        self.vae = getattr(self.pipe, "vae", None)
        if self.vae is not None:
            self.vae.requires_grad_(False)

    def _lora(self, rank: int) -> None:
        """LoRA adapters on the UNet's attention projections; only they train."""
        if self.embedded:
            raise AimfairError("egt.image.lora_rank needs a Stable-Diffusion-architecture pipeline (egt.image.pipeline); "
                               "the embedded model trains in full: set egt.image.lora_rank=0")
        try:
            from peft import LoraConfig
        except ImportError:
            raise AimfairError("egt.image.lora_rank > 0 needs peft: pip install 'aimfair-ray[lora]', "
                               "or set egt.image.lora_rank=0") from None
        self.pipe.unet.requires_grad_(False)
        self.pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))

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
        prediction = self.sched.config.prediction_type
        target = (noise if prediction == "epsilon" else self.sched.get_velocity(x0, noise, t) if prediction == "v_prediction"
                  else x0)
        pred = model(xt, t, **text)
        return ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, x0.dim()))), t

    def trained_state(self) -> dict:
        """Every tensor of the trained module, or its LoRA adapters only."""
        keep = {n for n, p in self.model.named_parameters() if p.requires_grad} if self.lora_rank else None
        return {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items() if keep is None or k in keep}

    def load_trained(self, state: dict) -> None:
        if self.lora_rank:
            missing = {n for n, p in self.model.named_parameters() if p.requires_grad} - set(state)
            if missing:
                raise AimfairError(f"trained weights lack {len(missing)} LoRA tensors, e.g. {sorted(missing)[:2]}")
        self.model.load_state_dict(state, strict=not self.lora_rank)

    def save(self, directory: str) -> None:
        """A diffusers pipeline folder; with LoRA, the adapters in the diffusers format (``load_lora_weights``
        loads them into the base pipeline, which ``adapter.json`` names)."""
        if not self.lora_rank:
            self.pipe.save_pretrained(directory)
            return
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.pipe.unet))
        type(self.pipe).save_lora_weights(directory, unet_lora_layers=layers, weight_name=LORA_FILE, safe_serialization=True)
        base = str(Path(self.base).absolute()) if Path(self.base).exists() else self.base
        Path(directory, ADAPTER).write_text(json.dumps({"base_pipeline": base, "lora_rank": self.lora_rank}))


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
             batch_size: int = 64, offset: int = 0) -> np.ndarray:
    """Images of the prompts; image ``i`` from the noise of seed ``(seed, offset + i)``."""
    task.model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(seed * 100_003 + offset + i + j) for j in range(len(prompts[i:i + batch_size]))]
        res = task.pipe(prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                        generator=gens, output_type="np")
        imgs = as_uint8(res.images)
        if imgs.shape[1] != 32:
            from PIL import Image

            imgs = np.stack([np.asarray(Image.fromarray(im).resize((32, 32))) for im in imgs])
        out.append(imgs)
    return np.concatenate(out)


def sample_groups(task: DiffusionTask, data: ImageSet, colors, s, conditional: bool, seed: int = 0):
    """Generated images and their groups for the quality metrics, with what to report of them.

    Conditional: one image per evaluation caption, its group the one the caption names (and the
    share the checker confirms). Unconditional: group-blind captions in a fixed shuffled order,
    each draw with its own noise; the checker sorts them into groups until each has
    ``n_eval_per_group`` (rejection sampling), at most ``max_draws`` times that many draws."""
    from aimfair_ray.egt.quality import rejection_sample

    G, n = len(colors), s.n_eval_per_group
    if conditional:
        gen = generate(task, data.captions, s.sample_steps, s.guidance_scale, seed)
        ok = stroke_color(gen, colors) == data.groups
        return gen, data.groups, {"group_confirmed": [float(ok[data.groups == g].mean()) for g in range(G)]}
    order = np.random.default_rng(seed).permutation(len(data.captions))

    def draw(start: int, k: int) -> np.ndarray:
        prompts = [data.captions[order[(start + i) % len(order)]] for i in range(k)]
        return generate(task, prompts, s.sample_steps, s.guidance_scale, seed, offset=start)

    kept, info = rejection_sample(draw, lambda x: stroke_color(x, colors), G, n, 64, s.max_draws * G * n)
    few = {g: len(kept[g]) for g in range(G) if len(kept[g]) <= s.nearest_k}
    if few:
        raise AimfairError(f"the model made {', '.join(f'{c} images of group {g}' for g, c in few.items())} in "
                           f"{info['drawn']} unconditional draws, too few to measure; raise egt.image.max_draws "
                           f"(now {s.max_draws}) or lower egt.image.n_eval_per_group")
    groups = np.concatenate([np.full(len(k), g) for g, k in enumerate(kept)])
    return np.concatenate(kept), groups, {"share": info["share"], "drawn": info["drawn"],
                                          "generated": [len(k) for k in kept]}


def image_quality(task: DiffusionTask, data: ImageSet, group_names: list[str], colors, features, s,
                  conditional: bool, seed: int = 0) -> dict:
    """Per-group quality of the task's current weights on the balanced evaluation set (``s``: the
    ``egt.image`` settings): FID, precision, recall, density, coverage, the denoising loss."""
    from aimfair_ray.egt.quality import gap, per_group

    den = denoising_quality(task, data, s.noise_levels, seed)
    gen, gen_groups, info = sample_groups(task, data, colors, s, conditional, seed)
    out = per_group(features(data.images), data.groups, features(gen), gen_groups, group_names, s.nearest_k)
    out["denoise"] = {name: float(den[data.groups == g].mean()) for g, name in enumerate(group_names)}
    out["gap"]["denoise"], out["overall"]["denoise"] = gap(out["denoise"]), float(den.mean())
    for key in ("group_confirmed", "share"):
        if key in info:
            out[key] = dict(zip(group_names, info.pop(key)))
    out.update(info, setting="conditional" if conditional else "unconditional", n_per_group=s.n_eval_per_group)
    return out


@register
class ImageTask(EGTTask):
    """EGT on a text-to-image pipeline: Colored MNIST digits, stroke colour as the group; the
    min–max weights act per noise bucket."""

    name = "image"
    objectives = ("erm", "reweight", "minmax", "conditional")
    metrics = ("fid", "precision", "recall", "density", "coverage", "denoise")
    extra_metrics = {"group_confirmed": "conditional: share of each group's generated images in the requested colour "
                                        "(the checker)",
                     "share": "unconditional: share of the draws the checker puts in each group"}
    noise_levels = True
    val_metric = "denoise"

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
                          e.image.n_eval_per_group, cfg.data.color_jitter, cfg.data.seed, seed,
                          conditional=ImageTask.conditional_eval(cfg))

    @staticmethod
    def settings(cfg):
        return cfg.egt.image

    @staticmethod
    def data_key(cfg) -> dict:
        from aimfair_ray.data.datasets import egt_image_source

        egt_image_source(cfg.data)  # on the driver, before any work
        return {"colors": cfg.data.colors, "color_jitter": cfg.data.color_jitter, "seed": cfg.data.seed}

    @staticmethod
    def model_name(cfg) -> str:
        i = cfg.egt.image
        return (i.pipeline or "the embedded text-to-image model") + (f" (LoRA rank {i.lora_rank})" if i.lora_rank else "")

    @staticmethod
    def conditional_eval(cfg) -> bool:
        return cfg.egt.objective == "conditional"

    def __init__(self, cfg, device: str):
        self.task = DiffusionTask(cfg.egt.image.pipeline, device, cfg.egt.image.lora_rank)
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

    def validate(self, cfg, eval_set) -> dict:
        den = denoising_quality(self.task, eval_set, cfg.egt.image.noise_levels, cfg.data.seed)
        return {name: float(den[eval_set.groups == g].mean()) for g, name in enumerate(self.group_names(cfg))}

    def quality(self, cfg, eval_set) -> dict:
        from aimfair_ray.egt.quality import Features

        i = cfg.egt.image
        return image_quality(self.task, eval_set, self.group_names(cfg), cfg.data.colors,
                             Features(i.features, i.feature_size, self.device), i, self.conditional_eval(cfg), cfg.data.seed)

    def save(self, cfg, directory: str) -> None:
        self.task.save(directory)  # a diffusers pipeline folder (or LoRA adapters) that Serve can load
