"""Stable-Diffusion-architecture pipelines with random weights, built from their configs: where no
weights can be had (tests, a bare GPU machine for the benchmark suite), the real architecture's cost and
code path. A character-level CLIP tokenizer (CLIP's byte alphabet, no merges) stands in for CLIP's BPE
vocabulary; the text encoder keeps the architecture's width and depth."""

from __future__ import annotations

import json
from pathlib import Path

# Stable Diffusion 1.5's UNet, VAE and text encoder (their published configs), and a tiny one for CPU tests.
SD15 = {
    "unet": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
    "vae": dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), latent_channels=4,
                layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512),
    "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
}
TINY = {
    "unet": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8),
    "vae": dict(in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                norm_num_groups=8, sample_size=32),
    "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
}


def _byte_chars() -> list[str]:
    """CLIP's byte-to-unicode alphabet (printable bytes as themselves, the rest shifted past 255)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def char_tokenizer(path: Path):
    """A real CLIPTokenizer whose vocabulary is single characters (no merges), saved under ``path``."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)


def special_ids(tok) -> dict:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def random_sd(path: Path, arch: dict = TINY, seed: int = 0):
    """A ``StableDiffusionPipeline`` of ``arch`` (``SD15`` or ``TINY``) with random weights and SD's DDIM
    scheduler settings, not saved (``save_pretrained`` it to get a folder)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = char_tokenizer(Path(path) / "_tok")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77, **arch["text"],
                                        **special_ids(tok)))
    unet = UNet2DConditionModel(**arch["unet"])
    vae = AutoencoderKL(**arch["vae"])
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
