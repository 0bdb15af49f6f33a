"""Real architectures at tiny size with random weights, built in the tests (no weights can be had here):
a Stable-Diffusion pipeline (CLIPTextModel, UNet2DConditionModel in an AutoencoderKL's latent space)
and a CLIP model, both with a character-level CLIP tokenizer, saved with ``save_pretrained``."""

from __future__ import annotations

import json
from pathlib import Path


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


def tiny_tokenizer(path: Path):
    """A real CLIPTokenizer whose vocabulary is single characters (no merges)."""
    from transformers import CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)


def _special(tok) -> dict:
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def tiny_sd(path: Path, seed: int = 0) -> str:
    """A tiny Stable-Diffusion-architecture pipeline: 32 px images from an 16 px latent."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer(path / "_tok")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, **_special(tok)))
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # SD 2.1 base's own scheduler settings
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = path / "sd"
    pipe.save_pretrained(str(out))
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
