"""Ray Serve: audited classifiers over HTTP. A FastAPI ingress composed with one batched
``Classifier`` deployment per model; every model carries its card (training config and the
fairness audit that ``aimfair audit`` wrote beside it).

    serve run serve/config.yaml          # or: aimfair serve
    curl 127.0.0.1:8000/v1/models

Routes: GET /healthz, GET /v1/models, GET /v1/models/{id}/card, POST /v1/classify
(JSON ``{"model": id, "images": [base64 PNG, ...]}``). Bad input gets a 4xx JSON error.
"""

# (no `from __future__ import annotations`: FastAPI reads the route annotations at runtime)

import base64
import binascii
import json
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve

from aimfair_ray import AimfairError


class ServeArgs(BaseModel):
    """The application's args (the ``args:`` of serve/config.yaml)."""

    models: dict[str, str] = Field(description="model id -> model folder (model.safetensors + model.json)")
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_images_per_request: int = Field(256, ge=1)


class ClassifyRequest(BaseModel):
    model: Optional[str] = Field(None, description="model id; default: the first served model")
    images: list[str] = Field(min_length=1, description="base64-encoded PNG or JPEG images")


def model_card(model_id: str, model_dir: str) -> dict:
    """The card: checkpoint metadata, the run's training config and its audit (when written)."""
    from aimfair_ray.train.models import check_checkpoint_dir

    d = check_checkpoint_dir(model_dir)
    meta = json.loads((d / "model.json").read_text())
    card = {"id": model_id, "path": str(d.resolve()), "backbone": meta["backbone"],
            "target_names": meta["target_names"], "group_names": meta["group_names"],
            "image_size": meta["image_size"], "dataset": meta.get("dataset"), "val_metrics": meta.get("metrics"),
            "config": None, "audit": None}
    import yaml

    if (d.parent / "config.yaml").is_file():
        card["config"] = yaml.safe_load((d.parent / "config.yaml").read_text())
    if (d.parent / "audit" / "audit.json").is_file():
        a = json.loads((d.parent / "audit" / "audit.json").read_text())
        card["audit"] = {k: a[k] for k in ("acc", "wst", "std", "eo", "eod_worst", "dp", "group_acc", "n") if k in a}
    return card


def decode_image(text: str, size: int) -> np.ndarray:
    """A base64 PNG/JPEG -> HxWx3 uint8 at the model's size; AimfairError on bad input."""
    from PIL import Image, UnidentifiedImageError

    from aimfair_ray.data.io import decode_png

    try:
        img = decode_png(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError) as e:
        raise AimfairError(f"an image is not valid base64: {e}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise AimfairError(f"an image is not a readable PNG or JPEG: {e}") from None
    return img if img.shape[:2] == (size, size) else np.asarray(Image.fromarray(img).resize((size, size)))


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class Classifier:
    """One model; requests are batched across callers with ``@serve.batch``."""

    def __init__(self, model_dir: str, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.01):
        import torch

        from aimfair_ray.train.models import load_classifier

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.meta = load_classifier(model_dir)
        self.model.to(self.device)
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def predict_batch(self, images: list[np.ndarray]) -> list[dict]:
        import torch

        from aimfair_ray.train.loop import to_input

        x = to_input(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), self.meta["mean"], self.meta["std"],
                     self.device)
        with torch.no_grad():
            probs = self.model(x).float().softmax(1).cpu().numpy()
        names = self.meta["target_names"]
        return [{"label": names[int(p.argmax())], "target": int(p.argmax()), "probability": float(p.max())}
                for p in probs]

    async def __call__(self, image: np.ndarray) -> dict:
        return await self.predict_batch(image)


api = FastAPI(title="aimfair-ray", description="Fairness-audited classifiers")


def _error(status: int, msg: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": msg})


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Api:
    def __init__(self, classifiers: dict, cards: dict, max_images_per_request: int = 256):
        self.classifiers, self.cards, self.max_images = classifiers, cards, max_images_per_request

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "models": list(self.cards)}

    @api.get("/v1/models")
    def models(self) -> dict:
        return {"models": [{"id": i, "backbone": c["backbone"],
                            "audit": {k: c["audit"][k] for k in ("acc", "wst", "std", "eo")} if c["audit"] else None}
                           for i, c in self.cards.items()]}

    @api.get("/v1/models/{model_id}/card")
    def card(self, model_id: str):
        if model_id not in self.cards:
            return _error(404, f"unknown model id {model_id!r}; served: {', '.join(self.cards)}")
        return self.cards[model_id]

    @api.post("/v1/classify")
    async def classify(self, req: ClassifyRequest):
        import asyncio

        model_id = req.model or next(iter(self.cards))
        if model_id not in self.cards:
            return _error(404, f"unknown model id {model_id!r}; served: {', '.join(self.cards)}")
        if len(req.images) > self.max_images:
            return _error(413, f"{len(req.images)} images in one request; the limit is {self.max_images}")
        size = self.cards[model_id]["image_size"]
        try:
            images = [decode_image(t, size) for t in req.images]
        except AimfairError as e:
            return _error(422, str(e))
        handle = self.classifiers[model_id]
        preds = await asyncio.gather(*[handle.remote(img) for img in images])
        return {"model": model_id, "predictions": preds}


def build_app(args: dict) -> serve.Application:
    """The application from its args (``serve run serve/config.yaml`` calls this)."""
    a = ServeArgs.model_validate(args)
    if not a.models:
        raise AimfairError("serve args: models is empty; give at least one id: model folder")
    cards = {i: model_card(i, p) for i, p in a.models.items()}
    classifiers = {i: Classifier.options(name=f"Classifier-{i}").bind(str(Path(p).resolve()), a.max_batch_size,
                                                                       a.batch_wait_timeout_s)
                   for i, p in a.models.items()}
    return Api.bind(classifiers, cards, a.max_images_per_request)
