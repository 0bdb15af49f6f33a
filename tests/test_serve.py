"""The Serve app (serve/config.yaml, the RayService) over real HTTP on loopback: classify,
cards, live audit, generators, bad input (a 4xx for each, never a 5xx), bearer token,
and the audit page in headless Chromium."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess

import numpy as np
import pytest
import requests
from conftest import _free_ports

TOKEN = "s3cret-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}



def _model(root, name, seed, with_audit=True):
    import torch

    from aimfair_ray.metrics import fairness_report
    from aimfair_ray.models import build_model, save_classifier

    torch.manual_seed(seed)
    model = build_model("small_cnn", 2, 32, width=8).eval()
    meta = {"backbone": "small_cnn", "width": 8, "num_classes": 2, "image_size": 32, "mean": [0.5] * 3,
            "std": [0.5] * 3, "target_names": ["digit<5", "digit>=5"], "group_names": ["red", "green"],
            "dataset": "colored_mnist", "method": name,
            # what the training stage records (train/baseline.py); model cards read it, never a folder name
            "provenance": {"real_share": 1.0, "synthetic_share": 0.0, "generator": None, "method": name}}
    save_classifier(model, meta, str(root / name / "model"))
    rep = None
    if with_audit:
        rng = np.random.default_rng(seed)
        rep = fairness_report(rng.integers(0, 2, 40), rng.integers(0, 2, 40), rng.integers(0, 2, 40), 2, 2)
        (root / name / "audit").mkdir()
        (root / name / "audit" / "audit.json").write_text(json.dumps(rep))
    return model, rep


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_pipeline, tmp_path_factory):
    """Two apps on one Serve instance: the full app with a token (a classifier, both generators)
    and an open one with two models for the audit page."""
    from ray import serve

    from aimfair_ray.serving.app import build_app

    root = tmp_path_factory.mktemp("serve")
    model, rep = _model(root, "baseline", 0)
    _, rep2 = _model(root, "selective", 1)
    port, = _free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": {"baseline": str(root / "baseline" / "model")}, "image_pipeline": tiny_pipeline,
                         "text_model": "smollm2", "max_images_per_request": 4, "max_request_bytes": 64 * 1024,
                         "max_prompts_per_request": 2, "max_steps": 3, "max_new_tokens": 16, "token": TOKEN}),
              name="aimfair-test", route_prefix="/")
    serve.run(build_app({"models": {"baseline": str(root / "baseline" / "model"),
                                    "selective": str(root / "selective" / "model")},
                         "image_pipeline": None, "text_model": None}), name="aimfair-open", route_prefix="/open")
    yield {"url": f"http://127.0.0.1:{port}", "model": model, "audits": {"baseline": rep, "selective": rep2}}
    serve.shutdown()


def _png(img: np.ndarray) -> str:
    from aimfair_ray.data.codecs import encode_png

    return base64.b64encode(encode_png(img)).decode()


def _expected(model, imgs):
    import torch

    from aimfair_ray.train.loop import to_input

    with torch.no_grad():
        return model(to_input(torch.from_numpy(imgs).permute(0, 3, 1, 2), [0.5] * 3, [0.5] * 3, "cpu")).softmax(1).numpy()


IMGS = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


def test_token_covers_every_route_but_health(served):
    url = served["url"]
    h = requests.get(f"{url}/healthz", timeout=30)
    assert h.status_code == 200 and h.json()["models"] == ["baseline"] and h.json()["generators"]["image"]
    for path in ("/", "/docs", "/v1/models", "/v1/models/baseline/card"):
        assert requests.get(f"{url}{path}", timeout=30).status_code == 401
        assert requests.get(f"{url}{path}", headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
        assert requests.get(f"{url}{path}", headers=AUTH, timeout=30).status_code == 200
    r = requests.post(f"{url}/v1/classify", json={"images": [_png(IMGS[0])]}, timeout=30)
    assert r.status_code == 401 and "bearer token" in r.json()["error"]


def test_models_card_and_batched_classify_json_and_multipart(served):
    url = served["url"]
    models = requests.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()["models"]
    assert models[0]["id"] == "baseline" and models[0]["audit"]["wst"] == pytest.approx(served["audits"]["baseline"]["wst"])
    card = requests.get(f"{url}/v1/models/baseline/card", headers=AUTH, timeout=30).json()
    assert card["audit"]["group_acc"] == served["audits"]["baseline"]["group_acc"] and card["group_names"] == ["red", "green"]
    assert card["provenance"] == {"real_share": 1.0, "synthetic_share": 0.0, "generator": None, "method": "baseline"}
    probs = _expected(served["model"], IMGS)
    r = requests.post(f"{url}/v1/classify", json={"model": "baseline", "images": [_png(i) for i in IMGS]},
                      headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["target"] for p in preds] == probs.argmax(1).tolist()
    assert [p["probability"] for p in preds] == pytest.approx(probs.max(1).tolist(), abs=1e-5)
    files = [("images", (f"{i}.png", base64.b64decode(_png(im)), "image/png")) for i, im in enumerate(IMGS)]
    m = requests.post(f"{url}/v1/classify", files=files, data={"model": "baseline"}, headers=AUTH, timeout=60)
    assert m.status_code == 200, m.text
    assert [p["target"] for p in m.json()["predictions"]] == probs.argmax(1).tolist()


def test_live_audit_matches_the_metrics_on_the_models_own_predictions(served):
    from aimfair_ray.metrics import fairness_report

    targets, groups = [0, 1, 1], [1, 0, 1]
    r = requests.post(f"{served['url']}/v1/audit", json={"images": [_png(i) for i in IMGS], "targets": targets,
                                                        "groups": groups}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    want = fairness_report(targets, _expected(served["model"], IMGS).argmax(1), groups, 2, 2)
    got = r.json()["audit"]
    for k in ("acc", "wst", "std", "eo"):
        assert got[k] == pytest.approx(want[k])
    assert got["group_acc"] == pytest.approx(want["group_acc"])


def test_generators_give_deterministic_pngs_and_text(served):
    from aimfair_ray.data.codecs import decode_png

    url = served["url"]
    body = {"prompts": ["a red digit seven", "a green digit two"], "seed": 3, "steps": 2}
    a = requests.post(f"{url}/v1/generate/image", json=body, headers=AUTH, timeout=120)
    assert a.status_code == 200, a.text
    imgs = [decode_png(base64.b64decode(s)) for s in a.json()["images"]]
    assert len(imgs) == 2 and imgs[0].shape[2] == 3 and imgs[0].dtype == np.uint8
    b = requests.post(f"{url}/v1/generate/image", json=body, headers=AUTH, timeout=120)
    assert b.json()["images"] == a.json()["images"]  # same prompts and seed, same images
    t = requests.post(f"{url}/v1/generate/text", json={"prompt": "Describe a handwritten digit in one sentence.",
                                                      "max_new_tokens": 12, "seed": 1}, headers=AUTH, timeout=300)
    assert t.status_code == 200, t.text
    assert isinstance(t.json()["text"], str) and len(t.json()["text"].split()) >= 2


BAD = [
    ("/v1/classify", {"json": {"images": ["not base64!"]}}, 422, "base64"),
    ("/v1/classify", {"json": {"images": [base64.b64encode(b"plain text").decode()]}}, 422, "PNG or JPEG"),
    ("/v1/classify", {"json": {"model": "nope", "images": ["AAAA"]}}, 404, "unknown model"),
    ("/v1/classify", {"json": {"images": ["AAAA"] * 5}}, 413, "limit is 4"),
    ("/v1/classify", {"json": {"images": []}}, 422, "images"),
    ("/v1/classify", {"data": "hello", "headers": {"Content-Type": "text/plain"}}, 415, "application/json"),
    ("/v1/classify", {"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ("/v1/classify", {"json": {"images": ["A" * 80_000]}}, 413, "max_request_bytes"),
    ("/v1/classify", {"files": [("other", ("x.png", b"\x89PNG", "image/png"))]}, 422, "'images'"),
    ("/v1/audit", {"json": {"images": ["AAAA"], "targets": [0, 1], "groups": [0]}}, 422, "same length"),
    ("/v1/audit", {"json": {"images": ["AAAA"], "targets": [5], "groups": [0]}}, 422, "targets must be in 0..1"),
    ("/v1/generate/image", {"json": {"prompts": ["a", "b", "c"]}}, 413, "limit is 2"),
    ("/v1/generate/image", {"json": {"prompts": ["a"], "steps": 50}}, 422, "limit is 3"),
    ("/v1/generate/text", {"json": {"prompt": "hi", "max_new_tokens": 500}}, 422, "limit is 16"),
    ("/v1/generate/text", {"json": {"prompt": ""}}, 422, "prompt"),
]


@pytest.mark.parametrize("path,kw,status,words", BAD, ids=[f"{p}-{s}-{w}" for p, _, s, w in BAD])
def test_bad_input_gets_a_4xx_that_says_what_is_wrong(served, path, kw, status, words):
    kw = dict(kw, headers=dict(AUTH, **kw.get("headers", {})))
    r = requests.post(f"{served['url']}{path}", timeout=30, **kw)
    assert r.status_code == status and words in r.json()["error"], (r.status_code, r.text)
    assert requests.get(f"{served['url']}/v1/models/nope/card", headers=AUTH, timeout=30).status_code == 404
    off = requests.post(f"{served['url']}/open/v1/generate/image", json={"prompts": ["a"]}, timeout=30)
    assert off.status_code == 404 and "no image generator" in off.json()["error"]


def test_audit_page_in_headless_chromium_shows_every_models_wst(served, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is missing: `make setup` installs Debian's chromium (apt-get install chromium)"
    # no background networking: this machine reaches no outside host, and Chromium's attempts took 18 s
    profile = tmp_path / "chromium-profile"
    out = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom",
                          f"{served['url']}/open/"], capture_output=True, text=True, timeout=120)
    dom = out.stdout
    assert "Served models and their fairness audit" in dom, out.stderr[-2000:]
    for mid, rep in served["audits"].items():
        assert f"id=\"model-{mid}\"" in dom and f"WST {rep['wst']:.4f}" in dom
    assert dom.count("data:image/png;base64,") == 2  # each model's per-group accuracy chart
