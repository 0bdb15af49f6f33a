"""``aimfair serve``: the shipped Serve config (``serve run`` format) with the command line's
models, image pipeline, token, host and port applied, checked, then run with ``serve run``."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

from aimfair_ray import AimfairError
from aimfair_ray.storage import is_uri


def resolve(config: str, models: Optional[list[str]] = None, image_pipeline: Optional[str] = None,
            host: str = "127.0.0.1", port: int = 8000, token_file: Optional[str] = None,
            adapters: Optional[list[str]] = None) -> dict:
    """The Serve config of ``config`` with the overrides applied; the app's args and every model
    folder are checked (by building the app) before Ray starts."""
    from aimfair_ray.config import read_yaml
    from aimfair_ray.serving.app import build_app, in_ingress
    from aimfair_ray.serving.bodies import ServeArgs

    if not Path(config).is_file():
        raise AimfairError(f"Serve config {config} does not exist; pass --config (the shipped one is serve/config.yaml)")
    cfg = read_yaml(Path(config))
    apps = cfg.get("applications") or []
    if len(apps) != 1:
        raise AimfairError(f"{config}: expected one application, found {len(apps)}")
    args = dict(apps[0].get("args") or {})
    if models:
        bad = [m for m in models if "=" not in m]
        if bad:
            raise AimfairError(f"--model {bad[0]!r}: expected ID=MODEL_DIR, e.g. --model baseline=runs/cmnist/baseline/model")
        args["models"] = dict(m.split("=", 1) for m in models)
    if image_pipeline:
        if not any(Path(image_pipeline, f).is_file() for f in ("model_index.json", "adapter.json")):
            raise AimfairError(f"--image-pipeline {image_pipeline}: no diffusers pipeline there (model_index.json, or "
                               "adapter.json of LoRA adapters, is missing); pass a pipeline folder, e.g. the model/ of "
                               "an `aimfair egt image` run")
        args["image_pipeline"] = str(Path(image_pipeline).resolve())
    if adapters:
        bad = [m for m in adapters if "=" not in m]
        if bad:
            raise AimfairError(f"--adapter {bad[0]!r}: expected ID=ADAPTER_DIR, e.g. --adapter fair=runs/cmnist/egt/image/"
                               "minmax-seed0/model")
        args["image_adapters"] = {i: p if is_uri(p) else str(Path(p).resolve()) for i, p in (m.split("=", 1) for m in adapters)}
    args["models"] = {i: p if is_uri(p) else str(Path(p).resolve()) for i, p in (args.get("models") or {}).items()}
    if token_file:
        args["token_file"] = str(Path(token_file).resolve())
    build_app(args)  # checks the args and every model folder
    # Serve refuses options for deployments the app does not build: keep those it does (a model the
    # ingress runs itself has no Classifier deployment)
    local = in_ingress(ServeArgs.model_validate(args))
    keep = ({f"Classifier-{i}" for i in args["models"] if i not in local} | {"Api"}
            | ({"ImageGenerator"} if args.get("image_pipeline", "embedded") is not None else set())
            | ({"TextGenerator"} if args.get("text_model", "smollm2") is not None else set()))
    apps[0]["deployments"] = [d for d in apps[0].get("deployments", []) if d.get("name") in keep]
    apps[0]["args"] = args
    cfg["http_options"] = dict(cfg.get("http_options") or {}, host=host, port=port)
    return cfg


def serve_env(environ: Optional[dict] = None) -> dict:
    """The environment of ``serve run``: this one ($AIMFAIR_SERVE_TOKEN reaches the replicas through the local
    cluster it starts), with an empty RAY_ADDRESS removed: empty means unset, as for every other command."""
    import os

    env = dict(os.environ if environ is None else environ)
    if not env.get("RAY_ADDRESS", "").strip():
        env.pop("RAY_ADDRESS", None)
    return env


def run(path: str) -> int:
    """``serve run path`` until it ends, Ctrl-C or SIGTERM (then it is stopped, which deletes the app);
    returns its exit status (0 when stopped)."""
    proc = subprocess.Popen([str(Path(sys.executable).with_name("serve")), "run", path], env=serve_env())

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()
        return 0
