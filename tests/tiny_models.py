"""Real architectures at tiny size with random weights, built in the tests (no weights can be had here):
a Stable-Diffusion pipeline (CLIPTextModel, UNet2DConditionModel in an AutoencoderKL's latent space)
and a CLIP model, both with a character-level CLIP tokenizer, saved with ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

from aimfair_ray.generate.random_arch import TINY, char_tokenizer, random_sd
from aimfair_ray.generate.random_arch import special_ids as _special

tiny_tokenizer = char_tokenizer


def tiny_sd(path: Path, seed: int = 0) -> str:
    """A tiny Stable-Diffusion-architecture pipeline: 32 px images from an 16 px latent."""
    out = path / "sd"
    random_sd(path, TINY, seed).save_pretrained(str(out))
    return str(out)


def tiny_clip(path: Path, seed: int = 0) -> str:
    """A tiny CLIP model with its processor (character tokenizer, 32 px images)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tok = tiny_tokenizer(path / "_tok")
    cfg = CLIPConfig(text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
                                  **_special(tok)},
                     vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    out = path / "clip"
    CLIPModel(cfg).save_pretrained(str(out))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                         tokenizer=tok)
    proc.save_pretrained(str(out))
    return str(out)
