"""Ray Serve: fairness-audited classifiers and generators over HTTP. A FastAPI ingress composed
with one batched ``Classifier`` deployment per model, an ``ImageGenerator`` and a
``TextGenerator`` (``deployments.py``). Every model carries its card: the training config,
the data provenance and the fairness audit that ``aimfair audit`` wrote beside it.

    aimfair serve                        # or: serve run serve/config.yaml
    curl 127.0.0.1:8000/v1/models

Routes: GET /healthz, GET / (the audit page), GET /docs, GET /v1/models,
GET /v1/models/{id}/card, POST /v1/classify (JSON base64 or multipart), POST /v1/audit,
POST /v1/generate/image, POST /v1/generate/text. Bad input gets a 4xx JSON error that says
what is wrong; an optional bearer token covers every route but /healthz.
"""

# (no `from __future__ import annotations`: FastAPI reads the route annotations at runtime)
import asyncio
import base64
import binascii
import hmac
import os
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field, ValidationError
from ray import serve

from aimfair_ray import AimfairError
from aimfair_ray.serving.cards import audit_page, model_card
from aimfair_ray.serving.deployments import Classifier, ImageGenerator, TextGenerator

TOKEN_ENV = "AIMFAIR_SERVE_TOKEN"


class ServeArgs(BaseModel):
    """The application's args (the ``args:`` of serve/config.yaml)."""

    models: dict[str, str] = Field(description="model id -> model folder (model.safetensors + model.json)")
    image_pipeline: Optional[str] = Field("embedded", description="diffusers pipeline folder or hub id; "
                                                                  "'embedded': the bundled model; null: no image route")
    text_model: Optional[str] = Field("smollm2", description="HF folder, GGUF file or hub id; 'smollm2': the "
                                                             "bundled SmolLM2-135M-Instruct; null: no text route")
    max_batch_size: int = Field(32, ge=1)
    classifier_replicas: Optional[int] = Field(None, ge=1, description="fixed replicas of each model's Classifier; "
                                               "null: the deployment's own num_replicas or autoscaling_config")
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_images_per_request: int = Field(256, ge=1)
    max_request_bytes: int = Field(8 * 2**20, ge=1024, description="larger request bodies get 413")
    max_prompts_per_request: int = Field(16, ge=1)
    max_steps: int = Field(100, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    token: Optional[str] = Field(None, description=f"bearer token for every route but /healthz; null: ${TOKEN_ENV} "
                                                   "or no auth")


class ClassifyRequest(BaseModel):
    model: Optional[str] = Field(None, description="model id; default: the first served model")
    images: list[str] = Field(min_length=1, description="base64-encoded PNG or JPEG images")


class AuditRequest(ClassifyRequest):
    targets: list[int] = Field(min_length=1, description="true class of each image")
    groups: list[int] = Field(min_length=1, description="sensitive group of each image")


class ImageRequest(BaseModel):
    prompts: list[str] = Field(min_length=1, description="one image per prompt")
    seed: int = Field(0, ge=0, description="image i uses seed + i")
    steps: int = Field(30, ge=1)


class TextRequest(BaseModel):
    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.7, ge=0, le=2)
    seed: int = Field(0, ge=0)


class BadRequest(Exception):
    def __init__(self, status: int, msg: str):
        self.status, self.msg = status, msg


def decode_image(data: bytes, size: int) -> np.ndarray:
    """PNG/JPEG bytes -> HxWx3 uint8 at the model's size; BadRequest(422) if unreadable."""
    from PIL import Image, UnidentifiedImageError

    from aimfair_ray.data.codecs import decode_png

    try:
        img = decode_png(data)
    except (UnidentifiedImageError, OSError) as e:
        raise BadRequest(422, f"an image is not a readable PNG or JPEG: {e}") from None
    return img if img.shape[:2] == (size, size) else np.asarray(Image.fromarray(img).resize((size, size)))


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadRequest(422, f"an image is not valid base64: {e}") from None


def _is_json(request: Request) -> bool:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return ctype in ("application/json", "") or (ctype.startswith("application/") and ctype.endswith("+json"))


def _errors(request: Optional[Request], errors: list) -> tuple[int, str]:
    """The status and message of a body that did not validate: 415 for a body that is not JSON,
    400 for invalid JSON, 422 for a JSON value that is not the request model."""
    if request is not None and not _is_json(request):
        return 415, f"content type {request.headers.get('content-type')!r}: send application/json"
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the body is not valid JSON: " + "; ".join(str(e.get("ctx", {}).get("error", e["msg"])) for e in errors)
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") in ("model_attributes_type", "dict_type")
           for e in errors):
        return 422, "the JSON body must be an object"
    parts = [f"{'.'.join(str(x) for x in e['loc'] if x != 'body') or 'body'}: {e['msg']}" for e in errors]
    return 422, "; ".join(parts)


async def _json(request: Request) -> dict:
    """The JSON object of a route that reads its body itself (classify and audit take JSON or multipart);
    a body that is not one is a :class:`BadRequest` with the status the typed routes give."""
    import json

    if not _is_json(request):
        raise BadRequest(*_errors(request, []))
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest(422, "the JSON body must be an object")
    return body


def _parse(model: type[BaseModel], raw: dict):
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise BadRequest(*_errors(None, [dict(x, loc=("body", *x["loc"])) for x in e.errors()])) from None


# ---- the ingress ------------------------------------------------------------------------------
api = FastAPI(title="aimfair-ray", description="Fairness-audited classifiers and generators (AIM-Fair, EGT)")


@api.exception_handler(BadRequest)
async def _bad_request(_request: Request, exc: BadRequest):
    return JSONResponse(status_code=exc.status, content={"error": exc.msg})


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    """Every typed body that does not validate: one 4xx JSON that says what is wrong."""
    status, msg = _errors(request, list(exc.errors()))
    return JSONResponse(status_code=status, content={"error": msg})


_bearer = HTTPBearer(auto_error=False)


@api.middleware("http")
async def _guard(request: Request, call_next):
    """Bearer token (every route but /healthz) and the request size limit, before any route runs."""
    limits = request.app.state.limits
    if request.url.path != "/healthz" and limits["token"]:
        cred = await _bearer(request)
        given = cred.credentials if cred is not None else ""
        if not hmac.compare_digest(given.encode(), limits["token"].encode()):
            return JSONResponse(status_code=401, content={"error": "missing or wrong bearer token: send "
                                                          "'Authorization: Bearer <token>'"})
    if request.method == "POST":
        length = request.headers.get("content-length")
        if length is None:
            return JSONResponse(status_code=411, content={"error": "send a Content-Length header"})
        if int(length) > limits["max_request_bytes"]:
            return JSONResponse(status_code=413, content={"error": f"request body of {length} bytes; the limit is "
                                                          f"{limits['max_request_bytes']} (max_request_bytes)"})
    return await call_next(request)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(api)
class Api:
    def __init__(self, classifiers: dict, cards: dict, charts: dict, image_gen=None, text_gen=None,
                 limits: Optional[dict] = None):
        self.classifiers, self.cards, self.charts = classifiers, cards, charts
        self.image_gen, self.text_gen = image_gen, text_gen
        self.limits = limits or ServeArgs(models={}).model_dump()
        self.limits["token"] = self.limits.get("token") or os.environ.get(TOKEN_ENV) or None
        api.state.limits = self.limits
        self.page = audit_page(cards, charts)

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "models": list(self.cards),
                "generators": {"image": self.image_gen is not None, "text": self.text_gen is not None}}

    @api.get("/", response_class=HTMLResponse)
    def page(self):
        return HTMLResponse(self.page)

    @api.get("/v1/models")
    def models(self) -> dict:
        return {"models": [{"id": i, "backbone": c["backbone"], "provenance": c["provenance"],
                            "audit": {k: c["audit"][k] for k in ("acc", "wst", "std", "eo")} if c["audit"] else None}
                           for i, c in self.cards.items()]}

    @api.get("/v1/models/{model_id}/card")
    def card(self, model_id: str):
        return self.cards[self._model(model_id)]

    def _model(self, model_id: Optional[str]) -> str:
        mid = model_id or next(iter(self.cards))
        if mid not in self.cards:
            raise BadRequest(404, f"unknown model id {mid!r}; served: {', '.join(self.cards)}")
        return mid

    async def _images(self, request: Request) -> tuple[str, list[np.ndarray], dict]:
        """(model id, decoded images, the JSON body or the form fields) from JSON base64 or multipart."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form()
            files = form.getlist("images")
            if not files or not all(hasattr(f, "read") for f in files):
                raise BadRequest(422, "multipart: send the images as file fields named 'images'")
            fields = {k: v for k, v in form.items() if k != "images"}
            mid, raw = self._model(fields.get("model")), [await f.read() for f in files]
        else:
            fields = await _json(request)
            req = _parse(ClassifyRequest, {k: fields.get(k) for k in ("model", "images") if k in fields})
            mid, raw = self._model(req.model), [_b64(t) for t in req.images]
        self._cap(len(raw), "max_images_per_request", "images in one request", 413)
        size = self.cards[mid]["image_size"]
        return mid, [decode_image(b, size) for b in raw], fields

    def _cap(self, value: int, key: str, what: str, status: int) -> None:
        """A 413/422 naming the value and its limit when ``value`` is over ``limits[key]``."""
        if value > self.limits[key]:
            raise BadRequest(status, f"{value} {what}; the limit is {self.limits[key]} ({key})")

    async def _predict(self, mid: str, images: list[np.ndarray]) -> list[dict]:
        return list(await asyncio.gather(*[self.classifiers[mid].remote(img) for img in images]))

    @api.post("/v1/classify", openapi_extra={"requestBody": {"content": {
        "application/json": {"schema": ClassifyRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "model": {"type": "string"}, "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}})
    async def classify(self, request: Request):
        mid, images, _ = await self._images(request)
        return {"model": mid, "predictions": await self._predict(mid, images)}

    @api.post("/v1/audit")
    async def audit(self, req: AuditRequest):
        from aimfair_ray.metrics import fairness_report

        mid = self._model(req.model)
        card = self.cards[mid]
        n_cls, n_grp = len(card["target_names"]), len(card["group_names"])
        if not len(req.images) == len(req.targets) == len(req.groups):
            raise BadRequest(422, f"images ({len(req.images)}), targets ({len(req.targets)}) and groups "
                                  f"({len(req.groups)}) must have the same length")
        if any(not 0 <= t < n_cls for t in req.targets) or any(not 0 <= g < n_grp for g in req.groups):
            raise BadRequest(422, f"targets must be in 0..{n_cls - 1} ({card['target_names']}) and groups in "
                                  f"0..{n_grp - 1} ({card['group_names']})")
        self._cap(len(req.images), "max_images_per_request", "images", 413)
        preds = await self._predict(mid, [decode_image(_b64(t), card["image_size"]) for t in req.images])
        rep = fairness_report(req.targets, [p["target"] for p in preds], req.groups, n_cls, n_grp)
        return {"model": mid, "audit": rep, "target_names": card["target_names"], "group_names": card["group_names"]}

    @api.post("/v1/generate/image")
    async def generate_image(self, req: ImageRequest):
        if self.image_gen is None:
            raise BadRequest(404, "no image generator is configured (args.image_pipeline is null)")
        self._cap(len(req.prompts), "max_prompts_per_request", "prompts", 413)
        self._cap(req.steps, "max_steps", "steps", 422)
        pngs = await self.image_gen.remote(req.prompts, req.seed, req.steps)
        return {"images": [base64.b64encode(p).decode() for p in pngs], "format": "png", "seed": req.seed,
                "steps": req.steps, "prompts": req.prompts}

    @api.post("/v1/generate/text")
    async def generate_text(self, req: TextRequest):
        if self.text_gen is None:
            raise BadRequest(404, "no text generator is configured (args.text_model is null)")
        self._cap(req.max_new_tokens, "max_new_tokens", "max_new_tokens", 422)
        text = await self.text_gen.remote(req.prompt, req.max_new_tokens, req.temperature, req.seed)
        return {"text": text, "prompt": req.prompt}


def build_app(args: dict) -> serve.Application:
    """The application from its args (``serve run serve/config.yaml`` and ``aimfair serve`` call this)."""
    try:
        a = ServeArgs.model_validate(args)
    except ValidationError as e:
        raise AimfairError(f"serve args: {e}") from None
    if not a.models:
        raise AimfairError("serve args: models is empty; give at least one id: model folder")
    cards, charts = {}, {}
    for i, p in a.models.items():
        cards[i], charts[i] = model_card(i, p)
    replicas = {} if a.classifier_replicas is None else {"num_replicas": a.classifier_replicas}
    classifiers = {i: Classifier.options(name=f"Classifier-{i}", **replicas).bind(str(Path(p).resolve()), a.max_batch_size,
                                                                       a.batch_wait_timeout_s)
                   for i, p in a.models.items()}
    image_gen = None if a.image_pipeline is None else ImageGenerator.bind(
        None if a.image_pipeline == "embedded" else a.image_pipeline)
    text_gen = None if a.text_model is None else TextGenerator.bind(None if a.text_model == "smollm2" else a.text_model)
    limits = a.model_dump(include={"max_images_per_request", "max_request_bytes", "max_prompts_per_request",
                                   "max_steps", "max_new_tokens", "token"})
    return Api.bind(classifiers, cards, charts, image_gen, text_gen, limits)
