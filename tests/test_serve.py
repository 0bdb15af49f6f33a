"""The Serve app behind serve/config.yaml and the RayService, over real HTTP on loopback."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import requests

from conftest import _free_ports


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    import torch
    from ray import serve

    from aimfair_ray.metrics import fairness_report
    from aimfair_ray.serving.app import build_app
    from aimfair_ray.train.models import build_model, save_classifier

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("serve")
    model = build_model("small_cnn", 2, 32, width=8).eval()
    meta = {"backbone": "small_cnn", "width": 8, "num_classes": 2, "image_size": 32, "mean": [0.5] * 3,
            "std": [0.5] * 3, "target_names": ["digit<5", "digit>=5"], "group_names": ["red", "green"],
            "dataset": "colored_mnist"}
    save_classifier(model, meta, str(root / "baseline" / "model"))
    rep = fairness_report(np.array([0, 1, 0, 1]), np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1]), 2, 2)
    (root / "baseline" / "audit").mkdir()
    (root / "baseline" / "audit" / "audit.json").write_text(json.dumps(rep))
    port, = _free_ports(1)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": {"baseline": str(root / "baseline" / "model")}, "max_images_per_request": 4}),
              name="aimfair-test", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "model": model, "meta": meta, "audit": rep}
    serve.shutdown()


def _png(img: np.ndarray) -> str:
    from aimfair_ray.data.io import encode_png

    return base64.b64encode(encode_png(img)).decode()


def test_health_models_card_and_batched_classify_over_http(served):
    import torch

    from aimfair_ray.train.loop import to_input

    url = served["url"]
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok", "models": ["baseline"]}
    models = requests.get(f"{url}/v1/models", timeout=30).json()["models"]
    assert models[0]["id"] == "baseline" and models[0]["audit"]["wst"] == pytest.approx(served["audit"]["wst"])
    card = requests.get(f"{url}/v1/models/baseline/card", timeout=30).json()
    assert card["audit"]["group_acc"] == served["audit"]["group_acc"] and card["group_names"] == ["red", "green"]
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    r = requests.post(f"{url}/v1/classify", json={"model": "baseline", "images": [_png(i) for i in imgs]}, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    with torch.no_grad():
        x = to_input(torch.from_numpy(imgs).permute(0, 3, 1, 2), [0.5] * 3, [0.5] * 3, "cpu")
        probs = served["model"](x).softmax(1).numpy()
    assert [p["target"] for p in preds] == probs.argmax(1).tolist()
    assert [p["probability"] for p in preds] == pytest.approx(probs.max(1).tolist(), abs=1e-5)


@pytest.mark.parametrize("body,status,words", [
    ({"images": ["not base64!"]}, 422, "base64"),
    ({"images": [base64.b64encode(b"plain text").decode()]}, 422, "PNG or JPEG"),
    ({"model": "nope", "images": ["AAAA"]}, 404, "unknown model"),
    ({"images": ["AAAA"] * 5}, 413, "limit is 4"),
    ({"images": []}, 422, "images"),
])
def test_bad_input_gets_a_4xx_that_says_what_is_wrong(served, body, status, words):
    r = requests.post(f"{served['url']}/v1/classify", json=body, timeout=30)
    assert r.status_code == status and words in r.text
    assert requests.get(f"{served['url']}/v1/models/nope/card", timeout=30).status_code == 404
