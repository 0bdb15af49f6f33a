"""Image codecs: PNG bytes <-> uint8 [H, W, 3] arrays, and uint8 images -> the [-1, 1]
float range diffusion models use."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def encode_png(img: np.ndarray) -> bytes:
    """uint8 HxWx3 array -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG (or any PIL-readable) bytes -> uint8 HxWx3 array."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def to_unit(imgs: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], the diffusion model's range."""
    return torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
