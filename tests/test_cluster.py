"""The cluster files: launcher YAMLs against Ray's own schema, KubeRay manifests, runtime envs,
resource layers; and where a run lives (output_dir, also on object storage)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from aimfair_ray.config import list_resource_layers, load_config
from aimfair_ray.submit import STAGES

ROOT = Path(__file__).resolve().parents[1]
KUBE = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_yaml_validates_against_rays_schema(name):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster" / name).read_text())
    validate_config(prepare_config(cfg))  # raises on any schema error
    gpu = [t for t, n in cfg["available_node_types"].items() if t != cfg["head_node_type"]]
    assert gpu and all(cfg["available_node_types"][t]["max_workers"] >= 1 for t in gpu)
    assert any("[gpu" in c for c in cfg["setup_commands"]) and any("assets.txt" in c for c in cfg["setup_commands"])
    # no shared disk: every node reaches the bucket through its own role (no keys), and the run lives there
    assert all({"IamInstanceProfile", "serviceAccounts"} & set(t["node_config"]) for t in cfg["available_node_types"].values())
    assert "--set output_dir=s3://" in (ROOT / "cluster" / name).read_text().replace("gs://", "s3://")
    bad = dict(cfg, max_workers="many")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def _entry_scripts(command: str) -> list[str]:
    return [t for t in shlex.split(command) if t.endswith(".py")]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_kuberay_manifests_parse_name_an_image_and_point_at_existing_entrypoints():
    kinds = {}
    for f in KUBE:
        for doc in yaml.safe_load_all(f.read_text()):
            assert doc["apiVersion"] in ("ray.io/v1", "v1"), f
            kinds[doc["kind"]] = doc
    assert set(kinds) == {"RayCluster", "RayJob", "RayService", "Secret"}
    # the RayService's token: the Secret the manifest defines, as AIMFAIR_SERVE_TOKEN in every pod, never in the config
    secret = kinds["Secret"]["metadata"]["name"]
    rs = kinds["RayService"]["spec"]["rayClusterConfig"]
    for pod in [rs["headGroupSpec"]["template"]] + [g["template"] for g in rs["workerGroupSpecs"]]:
        env = {e["name"]: e for c in _containers(pod) for e in c.get("env", [])}
        assert env["AIMFAIR_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == secret
    assert "token" not in kinds["RayService"]["spec"]["serveConfigV2"].replace("token_file", "")
    specs = [kinds["RayCluster"]["spec"], kinds["RayJob"]["spec"]["rayClusterSpec"],
             kinds["RayService"]["spec"]["rayClusterConfig"]]
    for spec in specs:
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for c in (c for p in pods for c in _containers(p)):
            assert c["image"] and ":" in c["image"], c
        assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in spec["workerGroupSpecs"]
                   for c in _containers(g["template"]))
    # the pods share no disk: no shared volume anywhere; the run and the served models on object storage, with
    # store credentials from a Secret (or the pods' role), never in the config or the command line
    assert all("persistentVolumeClaim" not in f.read_text() and "storage_uri" not in f.read_text() for f in KUBE)
    assert "output_dir=s3://" in kinds["RayJob"]["spec"]["entrypoint"]
    assert all(m.startswith("s3://") for m in yaml.safe_load(kinds["RayService"]["spec"]["serveConfigV2"])
               ["applications"][0]["args"]["models"].values())
    for spec in specs:
        for pod in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
            assert all({"secretRef": {"name": "aimfair-store", "optional": True}} in c.get("envFrom", [])
                       for c in _containers(pod)), pod
    # the RayJob's entrypoint is a script of this checkout (inside the image at /home/ray/aimfair-ray)
    scripts = _entry_scripts(kinds["RayJob"]["spec"]["entrypoint"])
    assert scripts and all((ROOT / s.split("/home/ray/aimfair-ray/")[-1]).is_file() for s in scripts)
    # the RayService wraps the app of serve/config.yaml (model paths on the shared volume);
    # its import paths resolve in this package and the deployments it configures exist
    import importlib

    local = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    service = yaml.safe_load(kinds["RayService"]["spec"]["serveConfigV2"])
    for cfg in (local, service):
        for app in cfg["applications"]:
            module, _, attr = app["import_path"].partition(":")
            assert callable(getattr(importlib.import_module(module), attr))
            in_api = app["args"].get("classify_in_ingress")  # true: the models run in the Api replica
            names = {"Api", "ImageGenerator", "TextGenerator"} | ({f"Classifier-{m}" for m in app["args"]["models"]}
                                                                  if not in_api else set())
            assert {d["name"] for d in app["deployments"]} == names
    assert [a["import_path"] for a in service["applications"]] == [a["import_path"] for a in local["applications"]]
    # the Dockerfile that builds the image installs the GPU extras and the assets
    docker = (ROOT / "cluster" / "Dockerfile").read_text()
    assert "[gpu" in docker and "assets.txt" in docker


def test_every_stage_has_its_job_entrypoint_and_the_runtime_envs_parse():
    for stage, script in STAGES.items():
        text = (ROOT / "jobs" / script).read_text()
        assert "from aimfair_ray.cli import app" in text, stage
    for f in ("runtime_env.yaml", "runtime_env.gpu.yaml"):
        env = yaml.safe_load((ROOT / "cluster" / f).read_text())
        assert set(env) <= {"env_vars", "excludes", "pip", "conda", "py_modules", "working_dir", "config"}
        assert ".venv" in env["excludes"] and "runs" in env["excludes"]


def test_cpu_and_gpu_resource_layers_set_every_resource():
    assert {"cpu", "gpu"} <= set(list_resource_layers())
    gpu = load_config("cmnist", ["gpu"], ["generate.backend=template"])
    cpu = load_config("cmnist", ["cpu"])
    assert gpu.train.use_gpu and gpu.train.gpus_per_worker == 1 and gpu.generate.gpus_per_actor > 0
    assert gpu.generate.llm_gpus > 0 and gpu.audit.gpus_per_actor > 0
    assert not cpu.train.use_gpu and cpu.generate.gpus_per_actor == 0 == cpu.audit.gpus_per_actor == cpu.generate.llm_gpus
    # layers compose with a user file and --set, later wins
    assert load_config("cmnist", ["gpu"], ["train.num_workers=8"]).train.num_workers == 8


def test_a_run_lives_in_one_place_and_storage_uri_is_its_retired_alias():
    cfg = load_config("cmnist", overrides=["output_dir=s3://bucket/runs"])
    assert cfg.run_dir == "s3://bucket/runs/cmnist" and cfg.ray_storage == "s3://bucket/runs/cmnist/ray"
    assert cfg.paths.synthetic_set("balanced") == "s3://bucket/runs/cmnist/synthetic/balanced"
    old = load_config("cmnist", overrides=["storage_uri=gs://bucket/aimfair"])
    assert old.output_dir == "gs://bucket/aimfair" and old.storage_uri is None and old.run_dir == "gs://bucket/aimfair/cmnist"


def test_a_request_no_live_node_holds_is_refused_at_once_naming_a_layer_that_fits(ray_cluster, tmp_path):
    """`--config gpu` on the session's CPU-only cluster: the EGT stage's first Ray request (the pretrained model's
    quality task) is refused in one line naming `--config cpu`, instead of waiting for a GPU node forever."""
    import os
    import subprocess
    import sys

    from aimfair_ray import AimfairError
    from aimfair_ray.runtime import require

    with pytest.raises(AimfairError, match=r"holds 4 at once .*lower train.num_workers"):
        require("a Ray Train run", 5, 1, 0, "train.num_workers")  # the session's head: 4 CPUs
    require("a Ray Train run", 4, 1, 0, "train.num_workers")  # fits: nothing said
    res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "aimfair"), "egt", "image", "--config", "gpu",
                          "--set", f"output_dir={tmp_path}"], env=dict(os.environ, RAY_ADDRESS=ray_cluster),
                         capture_output=True, text=True, timeout=300)
    said = [ln for ln in res.stdout.splitlines() if ln.startswith("error:")]
    assert res.returncode == 2 and len(said) == 1, res.stdout[-3000:] + res.stderr[-2000:]
    assert "GPUs" in said[0] and "this cluster has no GPUs: add --config cpu" in said[0] and "Traceback" not in res.stdout
