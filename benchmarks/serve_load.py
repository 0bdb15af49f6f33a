"""Loopback load test of POST /v1/classify: the batched Ray Serve app against a plain
single-process FastAPI + uvicorn server around the same model, in the same run.

    python benchmarks/serve_load.py [--model runs/cmnist/baseline/model] [--requests 400] [--seconds 30]
    python benchmarks/serve_load.py --backbone resnet18 --image-size 128   # a heavier (random-init) model
    python benchmarks/serve_load.py --in-ingress no    # the model one hop away, in its batched Classifier deployment

For 1, 8 and 32 concurrent clients it prints requests/s and p50/p99 latency for each server,
and the Serve/plain ratios of throughput at 32 clients and of p50 latency at 1 client. Each level stops
after --requests requests or --seconds seconds, whichever comes first. Then Serve's /healthz latency idle
and while two clients post decompression bombs (the absolute figures; the tests compare them only as
ratios). Writes benchmarks/results/serve_load.json.
"""

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PLAIN = '''
import base64, io, sys
import numpy as np, torch, uvicorn
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel
from aimfair_ray.train.loop import to_input
from aimfair_ray.models import load_classifier

torch.set_num_threads(1)
model, meta = load_classifier(sys.argv[1])
app = FastAPI()

class Req(BaseModel):
    images: list[str]

@app.post("/v1/classify")
def classify(req: Req):
    imgs = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(t))).convert("RGB")) for t in req.images])
    with torch.no_grad():
        p = model(to_input(torch.from_numpy(imgs).permute(0, 3, 1, 2), meta["mean"], meta["std"], "cpu")).softmax(1)
    return {"predictions": [{"target": int(r.argmax()), "probability": float(r.max())} for r in p]}

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
'''


def flat_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of one colour: a few KB that decode to width x height pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z, row = zlib.compressobj(9), b"\x00" * (1 + (width + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


BOMB = flat_png(13000, 13000)  # about 20 KB; 169 megapixels


def decode_seconds(png: bytes, n: int) -> float:
    """What decoding ``n`` copies of ``png`` costs in this process (the best of two tries): the time a server
    that decoded on its event loop would hold every other request for."""
    import io

    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            for _ in range(n):
                Image.open(io.BytesIO(png)).load()
            best = min(best, time.perf_counter() - t)
        return best
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def healthz_under_bombs(base: str, headers: dict | None = None, samples: int = 20, bombs_per_request: int = 3) -> dict:
    """GET /healthz ``samples`` times idle, then again while two clients post decompression bombs to
    /v1/classify without pause; returns both sets of seconds (sorted), the bomb answers' statuses, and what
    decoding one bomb request's images costs here."""
    import threading

    import httpx

    def probe() -> list[float]:
        times = []
        for _ in range(samples):
            t = time.perf_counter()
            assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
            times.append(time.perf_counter() - t)
            time.sleep(0.05)
        return sorted(times)

    idle = probe()
    decode = decode_seconds(BOMB, bombs_per_request)
    stop, statuses = threading.Event(), []
    body = {"images": [base64.b64encode(BOMB).decode()] * bombs_per_request}

    def bomber():
        while not stop.is_set():
            statuses.append(httpx.post(f"{base}/v1/classify", json=body, headers=headers or {}, timeout=60).status_code)

    threads = [threading.Thread(target=bomber) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        busy = probe()
    finally:
        stop.set()
        for t in threads:
            t.join()
    return {"idle_s": idle, "bombs_s": busy, "statuses": statuses, "decode_request_s": decode}


def quantile(xs: list[float], q: float) -> float:
    """The q-quantile of sorted values (the value at index q x n, the last at most)."""
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def ms_quantile(xs: list[float], q: float) -> float:
    """The q-quantile of sorted seconds, in ms."""
    return round(1000 * quantile(xs, q), 1)


def random_model(backbone: str, size: int) -> str:
    """A randomly initialised 2-class classifier saved as a checkpoint folder; returns its path."""
    import torch

    from aimfair_ray.models import build_model, save_classifier

    torch.manual_seed(0)
    meta = {"backbone": backbone, "width": 32, "num_classes": 2, "image_size": size, "mean": [0.5] * 3,
            "std": [0.5] * 3, "target_names": ["a", "b"], "group_names": ["g0", "g1"]}
    path = Path(tempfile.mkdtemp(prefix="serve-load-")) / "model"
    save_classifier(build_model(backbone, 2, size, pretrained=False, width=32).eval(), meta, str(path))
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, body: dict, timeout: float = 300) -> None:
    import httpx

    end = time.time() + timeout
    while time.time() < end:
        try:
            if httpx.post(url, json=body, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up")


async def load(url: str, body: dict, clients: int, n_max: int, seconds: float) -> dict:
    import httpx

    lat: list[float] = []
    sent = 0
    end = time.perf_counter() + seconds

    async def client(c: httpx.AsyncClient):
        nonlocal sent
        while sent < n_max and time.perf_counter() < end:
            sent += 1
            t = time.perf_counter()
            r = await c.post(url, json=body, timeout=60)
            r.raise_for_status()
            lat.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(clients)])
        wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1000
    return {"clients": clients, "requests": len(lat), "seconds": round(wall, 2), "rps": round(len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/cmnist/baseline/model")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--backbone", help="serve a random-init classifier of this backbone instead of --model "
                                       "(small_cnn, resnet18, efficientnet_lite0): the cost of the model decides what "
                                       "batching buys")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--replicas", type=int, default=None, help="Classifier replicas on the Serve side (default 1)")
    ap.add_argument("--in-ingress", choices=["auto", "yes", "no"], default="auto",
                    help="args.classify_in_ingress: the model in the ingress replica (yes), in its batched Classifier "
                         "deployment (no), or by size (auto: small models in the ingress)")
    a = ap.parse_args()
    if a.backbone:
        a.model = random_model(a.backbone, a.image_size)
    if not Path(a.model, "model.safetensors").is_file():
        sys.exit(f"no model at {a.model}: run `aimfair demo` first or pass --model")
    import ray
    from ray import serve

    from aimfair_ray.data.codecs import encode_png
    from aimfair_ray.serving.app import build_app

    meta = Path(a.model, "model.json")
    size = json.loads(meta.read_text()).get("image_size", 32) if meta.is_file() else 32
    img = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    body = {"images": [base64.b64encode(encode_png(img)).decode()]}
    levels = [int(c) for c in a.clients.split(",")]
    results = {}

    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="afb-", dir="/tmp"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"models": {"m": a.model}, "image_pipeline": None, "text_model": None,
                         "classifier_replicas": a.replicas,
                         "classify_in_ingress": {"auto": None, "yes": True, "no": False}[a.in_ingress]}), name="bench",
              route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/classify"
    wait_up(url, body)
    results["serve"] = [asyncio.run(load(url, body, c, a.requests, a.seconds)) for c in levels]
    h = healthz_under_bombs(f"http://127.0.0.1:{port}")
    healthz = {"idle_p50_ms": ms_quantile(h["idle_s"], 0.5), "idle_p90_ms": ms_quantile(h["idle_s"], 0.9),
               "bombs_p50_ms": ms_quantile(h["bombs_s"], 0.5), "bombs_p90_ms": ms_quantile(h["bombs_s"], 0.9),
               "bombs_refused": len(h["statuses"]), "bomb_statuses": sorted(set(h["statuses"])),
               "decode_one_bomb_request_ms": round(1000 * h["decode_request_s"], 1)}
    serve.shutdown()
    ray.shutdown()

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", PLAIN, a.model, str(port)], env=dict(os.environ))
    try:
        url = f"http://127.0.0.1:{port}/v1/classify"
        wait_up(url, body)
        results["plain"] = [asyncio.run(load(url, body, c, a.requests, a.seconds)) for c in levels]
    finally:
        proc.terminate()
        proc.wait()

    print(f"{'server':8} {'clients':>7} {'req':>5} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for name, rows in results.items():
        for r in rows:
            print(f"{name:8} {r['clients']:>7} {r['requests']:>5} {r['rps']:>7} {r['p50_ms']:>8} {r['p99_ms']:>8}")
    top = levels[-1]
    ratio = results["serve"][-1]["rps"] / results["plain"][-1]["rps"]
    print(f"throughput ratio at {top} clients, Serve / plain FastAPI+uvicorn: {ratio:.2f} (target >= 2)")
    lat = results["serve"][0]["p50_ms"] / results["plain"][0]["p50_ms"]
    print(f"p50 latency ratio at {levels[0]} client(s), Serve / plain: {lat:.2f}")
    print(f"Serve /healthz idle: p50 {healthz['idle_p50_ms']} ms, p90 {healthz['idle_p90_ms']} ms; while 2 clients post "
          f"decompression bombs: p50 {healthz['bombs_p50_ms']} ms, p90 {healthz['bombs_p90_ms']} ms "
          f"({healthz['bombs_refused']} bomb requests answered {healthz['bomb_statuses']}); decoding one bomb request "
          f"here: {healthz['decode_one_bomb_request_ms']} ms")
    out = Path(f"benchmarks/results/serve_load{f'-{a.backbone}-{size}' if a.backbone else ''}"
               f"{f'-r{a.replicas}' if a.replicas else ''}{'' if a.in_ingress == 'auto' else f'-ingress-{a.in_ingress}'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from aimfair_ray.tables import stamp

    out.write_text(json.dumps({**stamp(" ".join(["python", *sys.argv])),
                               "model": a.model, "backbone": a.backbone, "image_size": size, "replicas": a.replicas,
                               "in_ingress": a.in_ingress,
                               "results": results,
                               "ratio_at_max_clients": ratio, "p50_ratio_at_min_clients": lat, "healthz": healthz,
                               "cpus": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
