"""Ray Serve: fairness-audited classifiers and generators over HTTP. A FastAPI ingress composed
with one batched ``Classifier`` deployment per model, an ``ImageGenerator`` and a
``TextGenerator`` (``deployments.py``). Every model carries its card: the training config,
the data provenance and the fairness audit that ``aimfair audit`` wrote beside it.

    aimfair serve                        # or: serve run serve/config.yaml
    curl 127.0.0.1:8000/v1/models

Routes: GET /healthz, GET / (the audit page), GET|POST /login, GET /docs and /redoc (offline),
GET /v1/models, GET /v1/models/{id}/card, POST /v1/classify (JSON base64 or multipart),
POST /v1/audit, POST /v1/generate/image, POST /v1/generate/text. Bad input gets a 4xx JSON error
that says what is wrong (``bodies.py``); a slow route a 504. An optional bearer token (``auth.py``)
covers every route but /healthz and /login; a browser signs in at /login for a session cookie.
"""

# (no `from __future__ import annotations`: FastAPI reads the route annotations at runtime)
import asyncio
import base64
import binascii
import os
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.security import HTTPBearer
from pydantic import ValidationError
from ray import serve
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from aimfair_ray import AimfairError
from aimfair_ray.serving import auth
from aimfair_ray.serving.batcher import Batcher
from aimfair_ray.serving.bodies import (
    ApiError,
    AuditRequest,
    ClassifyRequest,
    ImageRequest,
    ServeArgs,
    TextRequest,
    decode_images,
    error_text,
    loads,
    parse,
    small_samples,
)
from aimfair_ray.serving.cards import audit_page, login_page, model_card
from aimfair_ray.serving.deployments import Classifier, ImageGenerator, TextGenerator, n_params, predict
from aimfair_ray.storage import is_uri

OPEN = ("/healthz", "/login")  # answered without the token
STATIC = {"swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"}


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
    return 422, error_text(errors)


async def _json(request: Request) -> dict:
    """The JSON object of a route that reads its body itself (classify takes JSON or multipart)."""
    if not _is_json(request):
        raise ApiError(*_errors(request, []))
    body = loads(await request.body())
    if not isinstance(body, dict):
        raise ApiError(422, "the JSON body must be an object")
    return body


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "an image is not valid base64") from None


def _root(request: Request) -> str:
    """The app's URL prefix (Serve's route_prefix), for links and the cookie's path."""
    return request.scope.get("root_path", "").rstrip("/")


# ---- the ingress ------------------------------------------------------------------------------
api = FastAPI(title="aimfair-ray", description="Fairness-audited classifiers and generators (AIM-Fair, EGT)",
              docs_url=None, redoc_url=None)


@api.exception_handler(ApiError)
async def _api_error(_request: Request, exc: ApiError):
    return JSONResponse(status_code=exc.status, content={"error": exc.msg})


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    """Every typed body that does not validate: one 4xx JSON that says what is wrong."""
    status, msg = _errors(request, list(exc.errors()))
    return JSONResponse(status_code=status, content={"error": msg})


@api.exception_handler(HTTPException)
async def _http(_request: Request, exc: HTTPException):
    """FastAPI's own (a body it could not parse, e.g. nested too deeply: 400), in the same shape."""
    msg = "the body could not be parsed as JSON" if exc.status_code == 400 else str(exc.detail)
    return JSONResponse(status_code=exc.status_code, content={"error": msg})


@api.exception_handler(RecursionError)
async def _deep(_request: Request, _exc: RecursionError):
    return JSONResponse(status_code=400, content={"error": "the body is nested too deeply"})


@api.exception_handler(MemoryError)
async def _memory(_request: Request, _exc: MemoryError):
    return JSONResponse(status_code=413, content={"error": "the request needs more memory than the server gives one "
                                                           "request; send fewer or smaller images"})


_bearer = HTTPBearer(auto_error=False)


@api.middleware("http")
async def _guard(request: Request, call_next):
    """Token or session cookie (every route but /healthz and /login), the request size limit and the body
    read timeout, before any route runs."""
    limits = request.app.state.limits
    token = limits["token"]
    root, path = _root(request), request.url.path
    path = (path[len(root):] if root and path.startswith(root) else path) or "/"
    if path not in OPEN and token:
        cred = await _bearer(request)
        if not (auth.same_token(cred.credentials if cred else None, token)
                or auth.valid_session(token, request.cookies.get(auth.COOKIE))):
            if request.method == "GET" and path in ("/", "/docs", "/redoc"):
                return RedirectResponse(f"{root}/login", status_code=303)
            return JSONResponse(status_code=401, content={"error": "missing or wrong bearer token: send "
                                                          "'Authorization: Bearer <token>' (a browser: sign in at /login)"})
    if request.method == "POST":
        length = request.headers.get("content-length")
        if length is None:
            return JSONResponse(status_code=411, content={"error": "send a Content-Length header"})
        if not length.isdigit():
            return JSONResponse(status_code=400, content={"error": "Content-Length is not a number"})
        if int(length) > limits["max_request_bytes"]:
            return JSONResponse(status_code=413, content={"error": f"request body of {length} bytes; the limit is "
                                                          f"{limits['max_request_bytes']} (max_request_bytes)"})
        try:  # a slow client is cut here, not left holding the replica's request slot
            await asyncio.wait_for(request.body(), limits["body_timeout_s"])
        except asyncio.TimeoutError:
            return JSONResponse(status_code=408, content={"error": f"the body did not arrive within "
                                                          f"{limits['body_timeout_s']} s (body_timeout_s)"})
    return await call_next(request)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(api)
class Api:
    def __init__(self, classifiers: dict, cards: dict, images: dict, image_gen=None, text_gen=None,
                 limits: Optional[dict] = None, local: Optional[dict] = None, adapters: Optional[dict] = None):
        self.classifiers, self.cards, self.adapters = classifiers, cards, dict(adapters or {})
        self.image_gen, self.text_gen = image_gen, text_gen
        self.limits = dict(limits or ServeArgs(models={}).model_dump())
        self.limits["token"] = auth.read_token(self.limits.get("token_file"))
        api.state.limits = self.limits
        self.local = {}  # small models, run here (batched, in a thread) rather than one hop away
        if local:
            import functools

            import torch

            from aimfair_ray.models import load_classifier

            torch.set_num_threads(1)  # a small model's forward pass: threads cost more than they give
            for mid, path in local.items():
                model, meta = load_classifier(path)
                self.local[mid] = Batcher(functools.partial(predict, model, meta), self.limits["max_batch_size"])
        self.page = audit_page(cards, images)

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "models": list(self.cards),
                "generators": {"image": self.image_gen is not None, "text": self.text_gen is not None}}

    @api.get("/", response_class=HTMLResponse)
    def page(self):
        return HTMLResponse(self.page)

    @api.get("/login", response_class=HTMLResponse)
    def login_form(self, request: Request):
        return HTMLResponse(login_page(_root(request), enabled=bool(self.limits["token"])))

    @api.post("/login", response_class=HTMLResponse)
    async def login(self, request: Request):
        """The form's token for a session cookie (HttpOnly, SameSite=Strict, signed with the token)."""
        token, root = self.limits["token"], _root(request)
        form = await request.form()
        given = form.get("token") if isinstance(form.get("token"), str) else None
        if not token or not auth.same_token(given, token):
            return HTMLResponse(login_page(root, enabled=bool(token), failed=True), status_code=401)
        r = RedirectResponse(f"{root}/", status_code=303)
        r.set_cookie(auth.COOKIE, auth.session_cookie(token), max_age=auth.SESSION_S, path=f"{root}/",
                     httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return r

    @api.get("/docs", include_in_schema=False)
    def docs(self, request: Request):
        root = _root(request)
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="aimfair-ray API",
                                   swagger_js_url=f"{root}/static/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/static/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/static/favicon.png")

    @api.get("/redoc", include_in_schema=False)
    def redoc(self, request: Request):
        root = _root(request)
        return get_redoc_html(openapi_url=f"{root}/openapi.json", title="aimfair-ray API",
                              redoc_js_url=f"{root}/static/redoc.standalone.js",
                              redoc_favicon_url=f"{root}/static/favicon.png", with_google_fonts=False)

    @api.get("/static/{name}", include_in_schema=False)
    def static(self, name: str):
        """Swagger UI and ReDoc, from the fastapi-offline package: the docs work without a network."""
        import fastapi_offline

        if name not in STATIC:
            raise ApiError(404, f"no static file {name!r}")
        return FileResponse(Path(fastapi_offline.__file__).parent / "static" / name)

    @api.get("/v1/models")
    def models(self) -> dict:
        return {"adapters": list(self.adapters.values()),
                "models": [{"id": i, "backbone": c["backbone"], "provenance": c["provenance"],
                            "audit": {k: c["audit"][k] for k in ("acc", "wst", "std", "eo")} if c["audit"] else None,
                            "model_card": c.get("model_card")}
                           for i, c in self.cards.items()]}

    @api.get("/v1/models/{model_id}/card")
    def card(self, model_id: str):
        return self.cards[self._model(model_id)]

    def _model(self, model_id: Optional[str]) -> str:
        mid = model_id or next(iter(self.cards))
        if mid not in self.cards:
            raise ApiError(404, f"unknown model id {str(mid)[:100]!r}; served: {', '.join(self.cards)}")
        return mid

    async def _decode(self, raw: list[bytes], mid: str) -> list[np.ndarray]:
        """Bounded decoding in a thread: the event loop (and /healthz) never waits on a decoder."""
        self._cap(len(raw), "max_images_per_request", "images in one request", 413)
        return await run_in_threadpool(decode_images, raw, self.cards[mid]["image_size"], self.limits["max_pixels"],
                                       self.limits["max_request_pixels"])

    async def _images(self, request: Request) -> tuple[str, list[np.ndarray]]:
        """(model id, decoded images) from JSON base64 or multipart."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=self.limits["max_images_per_request"] + 1)
            files = form.getlist("images")
            if not files or not all(hasattr(f, "read") for f in files):
                raise ApiError(422, "multipart: send the images as file fields named 'images'")
            model = form.get("model")
            mid, raw = self._model(model if isinstance(model, str) else None), [await f.read() for f in files]
        else:
            fields = await _json(request)
            req = parse(ClassifyRequest, {k: fields.get(k) for k in ("model", "images") if k in fields})
            mid, raw = self._model(req.model), [_b64(t) for t in req.images]
        return mid, await self._decode(raw, mid)

    def _cap(self, value: int, key: str, what: str, status: int) -> None:
        """A 413/422 naming the value and its limit when ``value`` is over ``limits[key]``."""
        if value > self.limits[key]:
            raise ApiError(status, f"{value} {what}; the limit is {self.limits[key]} ({key})")

    async def _within(self, route: str, calls: list):
        """The deployments' answers, or a 504 (and the calls cancelled) after ``request_timeout_s[route]``."""
        limit = self.limits["request_timeout_s"][route]
        try:
            return await asyncio.wait_for(asyncio.gather(*calls), limit)
        except asyncio.TimeoutError:
            for c in calls:
                if hasattr(c, "cancel"):  # a deployment's response (wait_for cancelled the local ones)
                    c.cancel()
            raise ApiError(504, f"{route} took over {limit} s (request_timeout_s.{route}); retry with less work, "
                                "or raise the limit") from None

    async def _predict(self, mid: str, images: list[np.ndarray], route: str) -> list[dict]:
        if mid in self.local:
            return list(await self._within(route, [self.local[mid](img) for img in images]))
        return list(await self._within(route, [self.classifiers[mid].remote(img) for img in images]))

    @api.post("/v1/classify", openapi_extra={"requestBody": {"content": {
        "application/json": {"schema": ClassifyRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "model": {"type": "string"}, "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}})
    async def classify(self, request: Request):
        mid, images = await self._images(request)
        return {"model": mid, "predictions": await self._predict(mid, images, "classify")}

    @api.post("/v1/audit")
    async def audit(self, req: AuditRequest):
        from aimfair_ray.evaluate import with_evidence
        from aimfair_ray.metrics import fairness_report

        mid = self._model(req.model)
        card = self.cards[mid]
        n_cls, n_grp = len(card["target_names"]), len(card["group_names"])
        if not len(req.images) == len(req.targets) == len(req.groups):
            raise ApiError(422, f"images ({len(req.images)}), targets ({len(req.targets)}) and groups "
                                f"({len(req.groups)}) must have the same length")
        if any(not 0 <= t < n_cls for t in req.targets) or any(not 0 <= g < n_grp for g in req.groups):
            raise ApiError(422, f"targets must be in 0..{n_cls - 1} ({card['target_names']}) and groups in "
                                f"0..{n_grp - 1} ({card['group_names']})")
        images = await self._decode([_b64(t) for t in req.images], mid)
        preds = await self._predict(mid, images, "audit")
        pred = [p["target"] for p in preds]
        rep = fairness_report(req.targets, pred, req.groups, n_cls, n_grp)
        rep["warnings"] = small_samples(rep, n_grp, card["group_names"], self.limits["min_cell"])
        with_evidence(rep, req.targets, pred, req.groups, 1000, 0, card["target_names"])  # 95% intervals, ~ms
        return {"model": mid, "audit": rep, "target_names": card["target_names"], "group_names": card["group_names"]}

    @api.post("/v1/generate/image")
    async def generate_image(self, req: ImageRequest):
        if self.image_gen is None:
            raise ApiError(404, "no image generator is configured (args.image_pipeline is null)")
        self._cap(len(req.prompts), "max_prompts_per_request", "prompts", 413)
        self._cap(max(len(p) for p in req.prompts), "max_prompt_chars", "characters in a prompt", 422)
        self._cap(req.steps, "max_steps", "steps", 422)
        gen = self.image_gen
        if req.model is not None:
            if req.model not in self.adapters:
                raise ApiError(404, f"unknown adapter {req.model!r}; known: {', '.join(self.adapters) or 'none'} "
                                    "(GET /v1/models), or leave model out for the base pipeline")
            gen = gen.options(multiplexed_model_id=req.model)
        pngs, = await self._within("generate_image", [gen.remote(req.prompts, req.seed, req.steps)])
        return {"images": [base64.b64encode(p).decode() for p in pngs], "format": "png", "seed": req.seed,
                "steps": req.steps, "prompts": req.prompts, "model": req.model}

    @api.post("/v1/generate/text")
    async def generate_text(self, req: TextRequest):
        if self.text_gen is None:
            raise ApiError(404, "no text generator is configured (args.text_model is null)")
        self._cap(req.max_new_tokens, "max_new_tokens", "max_new_tokens", 422)
        chars = 20 * self.limits["max_prompt_tokens"]  # a bound before the tokenizer runs: no tokenizer makes
        if len(req.prompt) > chars:                      # fewer than 1 token per 20 characters
            raise ApiError(422, f"{len(req.prompt)} characters in the prompt; the limit is {chars} "
                                f"(20 x max_prompt_tokens)")
        out, = await self._within("generate_text", [self.text_gen.remote(req.prompt, req.max_new_tokens, req.temperature,
                                                                         req.seed, self.limits["max_prompt_tokens"])])
        if "error" in out:
            raise ApiError(out["status"], out["error"])
        return {"text": out["text"], "prompt": req.prompt}


def in_ingress(a: ServeArgs) -> set[str]:
    """The models the ingress runs itself: all or none when ``classify_in_ingress`` says so, else the small ones."""
    if a.classify_in_ingress is not None:
        return set(a.models) if a.classify_in_ingress else set()
    return {i for i, p in a.models.items() if n_params(p) <= a.ingress_max_params}


def build_app(args: dict) -> serve.Application:
    """The application from its args (``serve run serve/config.yaml`` and ``aimfair serve`` call this)."""
    try:
        a = ServeArgs.model_validate(args)
    except ValidationError as e:
        raise AimfairError(f"serve args: {error_text(e.errors(), 'args')}") from None
    if not a.models:
        raise AimfairError("serve args: models is empty; give at least one id: model folder")
    auth.check_token_file(a.token_file)
    cards, images = {}, {}
    root = os.getcwd()
    for i, p in a.models.items():
        cards[i], images[i] = model_card(i, p, root)
    replicas = {} if a.classifier_replicas is None else {"num_replicas": a.classifier_replicas}
    local = in_ingress(a)
    classifiers = {i: Classifier.options(name=f"Classifier-{i}", **replicas).bind(_where(p), a.max_batch_size,
                                                                       a.batch_wait_timeout_s)
                   for i, p in a.models.items() if i not in local}
    adapters = adapter_cards(a)
    image_gen = None if a.image_pipeline is None else ImageGenerator.bind(
        None if a.image_pipeline == "embedded" else a.image_pipeline,
        adapters={i: _where(p) for i, p in a.image_adapters.items()})
    text_gen = None if a.text_model is None else TextGenerator.bind(None if a.text_model == "smollm2" else a.text_model)
    limits = a.model_dump(exclude={"models", "image_pipeline", "image_adapters", "text_model", "classifier_replicas",
                                   "batch_wait_timeout_s", "classify_in_ingress", "ingress_max_params"})
    if a.token_file:
        limits["token_file"] = str(Path(a.token_file).resolve())
    return Api.bind(classifiers, cards, images, image_gen, text_gen, limits,
                    {i: _where(a.models[i]) for i in local}, adapters)


def adapter_cards(a: ServeArgs) -> dict[str, dict]:
    """Each EGT adapter's entry of ``/v1/models``: its base and its EGT card (per-group quality and gaps); every
    adapter must be a LoRA folder over ``image_pipeline`` (one line naming the adapter otherwise)."""
    from huggingface_hub import ModelCard

    from aimfair_ray.generate.t2i import adapter_base
    from aimfair_ray.modelcard import CARD
    from aimfair_ray.storage import exists, read_text

    out = {}
    for i, p in a.image_adapters.items():
        base = adapter_base(p)
        if base is None:
            raise AimfairError(f"image_adapters.{i}: {p} has no adapter.json; pass the model/ folder of an `aimfair egt "
                               "image` run with egt.image.lora_rank > 0")
        if a.image_pipeline in (None, "embedded") or _where(base) != _where(a.image_pipeline):
            raise AimfairError(f"image_adapters.{i}: its base pipeline is {base}, but image_pipeline is "
                               f"{a.image_pipeline}; serve its base (--image-pipeline {base})")
        card = ModelCard(read_text(f"{p}/{CARD}")).data.to_dict() if exists(f"{p}/{CARD}") else None
        out[i] = {"id": i, "base_pipeline": base, "path": p if is_uri(p) else str(Path(p).resolve()),
                  "egt": (card or {}).get("egt"), "egt_quality": (card or {}).get("egt_quality"), "model_card": card}
    return out


def _where(model_dir: str) -> str:
    """A model folder as a replica on any node reads it: a URI as it is, a local path made absolute."""
    return model_dir if is_uri(model_dir) else str(Path(model_dir).resolve())
