"""What the API accepts: the app's args and their limits, the typed request bodies (every number
bounded), and bounded image decoding. Everything a request can get wrong is an :class:`ApiError`
with a 4xx status and a message that names the problem and the limit, never a 5xx."""

from __future__ import annotations

import io
import json
from typing import Annotated, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

SEED_MAX = 2**32 - 1
ROUTES = ("classify", "audit", "generate_image", "generate_text")


class ApiError(Exception):
    """A request the API refuses or cannot finish: its HTTP status and one line for the client."""

    def __init__(self, status: int, msg: str):
        super().__init__(msg)
        self.status, self.msg = status, msg


class ServeArgs(BaseModel):
    """The application's args (the ``args:`` of serve/config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    models: dict[str, str] = Field(description="model id -> model folder (model.safetensors + model.json)")
    image_pipeline: Optional[str] = Field("embedded", description="diffusers pipeline folder or hub id; "
                                                                  "'embedded': the bundled model; null: no image route")
    image_adapters: dict[str, str] = Field({}, description="adapter id -> an EGT LoRA model folder (adapter.json and "
                                           "its LoRA weights) over image_pipeline, which must be its base; a request "
                                           "picks one by its model field (Ray Serve model multiplexing)")
    text_model: Optional[str] = Field("smollm2", description="HF folder, GGUF file or hub id; 'smollm2': the "
                                                             "bundled SmolLM2-135M-Instruct; null: no text route")
    max_batch_size: int = Field(32, ge=1, le=4096)
    classifier_replicas: Optional[int] = Field(None, ge=1, description="fixed replicas of each model's Classifier; "
                                               "null: the deployment's own num_replicas or autoscaling_config")
    classify_in_ingress: Optional[bool] = Field(None, description="run models in the ingress replica (one hop less: "
                                                "lower latency for small models) or in their batched Classifier "
                                                "deployment; null: in the ingress at most ingress_max_params parameters")
    ingress_max_params: int = Field(2_000_000, ge=0)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10)
    max_images_per_request: int = Field(256, ge=1)
    max_request_bytes: int = Field(8 * 2**20, ge=1024, description="larger request bodies get 413")
    max_pixels: int = Field(2048 * 2048, ge=1, description="pixels of one image, read from its header before it is "
                                                           "decoded; larger images get 413")
    max_request_pixels: int = Field(32 * 2**20, ge=1, description="pixels of all the images of one request; 413 above")
    max_prompts_per_request: int = Field(16, ge=1)
    max_prompt_chars: int = Field(2000, ge=1, description="characters of one image prompt")
    max_prompt_tokens: int = Field(512, ge=1, description="tokens of a text prompt, by the text model's tokenizer")
    max_steps: int = Field(100, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    request_timeout_s: dict[str, float] = Field(
        default_factory=lambda: {"classify": 30.0, "audit": 60.0, "generate_image": 300.0, "generate_text": 120.0},
        description=f"per route ({', '.join(ROUTES)}): slower requests get 504")
    body_timeout_s: float = Field(30.0, gt=0, description="a body not received within this gets 408")
    min_cell: int = Field(30, ge=1, description="live audits warn about cells with fewer images")
    token_file: Optional[str] = Field(None, description="a file holding the bearer token (e.g. a mounted Secret); "
                                                        "null: $AIMFAIR_SERVE_TOKEN in the replicas' environment, or "
                                                        "no auth")

    @model_validator(mode="before")
    @classmethod
    def _no_token_in_args(cls, data):
        if isinstance(data, dict) and data.get("token") is not None:
            raise ValueError("a token in the app's args is written into the resolved config and Serve's logs: put it in "
                             "a file (args.token_file, or aimfair serve --token-file) or in $AIMFAIR_SERVE_TOKEN")
        if isinstance(data, dict) and "token" in data:
            data = {k: v for k, v in data.items() if k != "token"}  # `token: null` (older configs) means no token
        return data

    @model_validator(mode="after")
    def _routes(self):
        unknown = set(self.request_timeout_s) - set(ROUTES)
        if unknown:
            raise ValueError(f"request_timeout_s: unknown routes {sorted(unknown)}; the routes are {', '.join(ROUTES)}")
        if any(v <= 0 for v in self.request_timeout_s.values()):
            raise ValueError("request_timeout_s: every timeout must be > 0")
        self.request_timeout_s = {**ServeArgs.model_fields["request_timeout_s"].default_factory(),
                                  **self.request_timeout_s}
        return self


def error_text(errors: list, whole: str = "body") -> str:
    """Pydantic errors as 'field: message; ...', without the values (no secret is ever echoed)."""
    return "; ".join(f"{'.'.join(str(x) for x in e['loc'] if x != 'body') or whole}: {e['msg']}" for e in errors)


Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
Index = Annotated[int, Field(ge=0, le=2**31 - 1)]


class ClassifyRequest(BaseModel):
    model: Optional[str] = Field(None, max_length=200, description="model id; default: the first served model")
    images: list[str] = Field(min_length=1, description="base64-encoded PNG or JPEG images")


class AuditRequest(ClassifyRequest):
    targets: list[Index] = Field(min_length=1, description="true class of each image")
    groups: list[Index] = Field(min_length=1, description="sensitive group of each image")


class ImageRequest(BaseModel):
    prompts: list[Annotated[str, Field(min_length=1, max_length=20_000)]] = Field(min_length=1,
                                                                                  description="one image per prompt")
    seed: Seed = Field(0, description=f"image i uses seed + i (at most {SEED_MAX})")
    steps: int = Field(30, ge=1, le=10_000)
    model: Optional[str] = Field(None, max_length=200, description="an adapter id of args.image_adapters (GET "
                                 "/v1/models lists them); null: the base pipeline")


class TextRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=200_000, description="at most args.max_prompt_tokens tokens")
    max_new_tokens: int = Field(64, ge=1, le=1_000_000)
    temperature: float = Field(0.7, ge=0, le=2)
    seed: Seed = 0


def parse(model: type[BaseModel], raw: dict):
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ApiError(422, error_text(e.errors())) from None


def loads(body: bytes):
    """JSON, with nesting too deep for the parser a 400 like any other invalid body."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None


def image_header(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header alone, nothing decoded; 422 for what is not a PNG or JPEG, 413 over
    ``max_pixels`` (a small file can hold a huge flat image: a 20 KB PNG of 13000 x 13000 pixels)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
            if fmt == "PNG":
                im.verify()  # every chunk present and its CRC right; nothing decompressed
    except Image.DecompressionBombError:  # PIL's own guard, at twice its limit: far over ours
        raise ApiError(413, f"an image of over {2 * Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb); the limit "
                            f"is {max_pixels} pixels (max_pixels)") from None
    except Exception:  # noqa: BLE001 - anything PIL cannot open is a bad image, whatever it raises
        raise ApiError(422, "an image is not a readable PNG or JPEG") from None
    if fmt not in ("PNG", "JPEG"):
        raise ApiError(422, f"an image is {fmt}; send PNG or JPEG")
    if w * h > max_pixels:
        raise ApiError(413, f"an image of {w}x{h} pixels; the limit is {max_pixels} pixels (max_pixels)")
    return w, h


def decode_image(data: bytes, size: int) -> np.ndarray:
    """PNG/JPEG bytes whose header passed ``image_header`` -> size x size x 3 uint8."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
    except MemoryError:
        raise ApiError(413, "an image is too large to decode") from None
    except Exception:  # noqa: BLE001 - truncated or corrupt data, a decoder error: the client's image
        raise ApiError(422, "an image is not a readable PNG or JPEG (truncated or corrupt)") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return np.asarray(rgb)


def decode_images(raw: list[bytes], size: int, max_pixels: int, max_request_pixels: int) -> list[np.ndarray]:
    """Every image's header first (the request's pixel total checked), then the decoding. Run it in a thread:
    never on the ingress's event loop."""
    total = sum(w * h for w, h in (image_header(b, max_pixels) for b in raw))
    if total > max_request_pixels:
        raise ApiError(413, f"the images hold {total} pixels in all; the limit is {max_request_pixels} "
                            "(max_request_pixels)")
    return [decode_image(b, size) for b in raw]


def small_samples(report: dict, n_groups: int, group_names: list, min_cell: int) -> list[str]:
    """Warnings for a live audit: cells under ``min_cell`` images, and groups with none (their figures say
    nothing: one image gives STD 0 and EO 0)."""
    from aimfair_ray.evaluate import small_cells

    counts = report.get("cell_counts", {})
    out = small_cells(report, min_cell, "images", "min_cell")
    out += [f"cell {k} has no images: its accuracy is unknown" for k, n in counts.items() if not n]
    seen = {int(k.split("_s")[1]) for k, n in counts.items() if n}
    out += [f"group {g} ({group_names[g]}) has no images: STD, EO and WST do not compare groups"
            for g in range(n_groups) if g not in seen]
    return out
