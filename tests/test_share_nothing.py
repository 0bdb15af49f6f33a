"""A cluster shares no disk (issue 36): three Ray nodes on this machine that share nothing but a moto S3 server.

The head has no CPUs (the drivers run there, on this machine's disk); each worker node runs in its own mount
namespace (``unshare -m``) with a private tmpfs over ``<tmp>/node``, where its Ray temp dir, its temporary
files and its store cache live (the bundled LLM bound read-only into that cache, as a node's image holds it).
The run itself is on ``s3://``: what one node writes to its own disk no other node can read, so a stage that
relied on that fails here. The tests share the one cluster and run
in file order (the node-loss test last: it kills nodes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, _cmdlines, _free_ports, bench_script, cli, kill_after, wait_for

ROOT = Path(__file__).resolve().parents[1]
BIN = os.path.dirname(sys.executable)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="a node's private filesystem view needs `unshare -m` as root")


@pytest.fixture(scope="module")
def cluster(s3, ray_head):
    """The share-nothing cluster of ``benchmarks/store_cost.py`` (``share_nothing``): ``address``, ``dashboard``,
    ``private``, ``env`` (RAY_ADDRESS set), ``procs``, ``add(name)`` and ``alive(n)``. Started after the session's
    head and S3 server, so that its nodes get the same token and endpoint."""
    with bench_script("store_cost").share_nothing() as c:
        yield c


@pytest.fixture(scope="module")
def store(s3, tiny_pipeline):
    """The runs' place on S3, and the tiny generation pipeline uploaded there (a worker node reads it from the
    store, as it would a model on a real cluster)."""
    from aimfair_ray.storage import upload_dir

    root = f"{s3}/share-nothing-{os.getpid()}"
    upload_dir(tiny_pipeline, f"{root}/models/t2i")
    return root


def _aimfair(args, env, timeout=600):
    return subprocess.run([os.path.join(BIN, "aimfair"), *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _sets(items):
    return [x for s in items for x in ("--set", s)]


def _pipeline_sets(store):
    """The tiny demo chain's run on the store (the pipeline test makes it; the Serve and sweep tests use it)."""
    return TINY + [f"output_dir={store}/runs", f"generate.pipeline={store}/models/t2i", "train.num_workers=2",
                   "train.epochs=1", "finetune.epochs=1", "generate.actors=2"]


def test_a_local_output_dir_on_a_cluster_of_nodes_is_refused_in_one_line(cluster):
    """Each node writes a token into output_dir; the driver sees only its own, so the run stops before any work."""
    local = os.path.join(cluster["private"], "runs")
    res = _aimfair(["data", "prepare", *_sets(TINY + [f"output_dir={local}"])], cluster["env"], timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    said = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(said) == 1 and "is not shared by the cluster's 3 nodes" in said[0] and "output_dir=s3://" in said[0]
    assert "Traceback" not in out and not os.path.exists(os.path.join(local, "cmnist", "data"))


def test_an_unreachable_store_is_one_line_before_any_work(cluster):
    res = _aimfair(["data", "prepare", *_sets(TINY + ["output_dir=s3://no-such-bucket-here/runs"])], cluster["env"],
                   timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out[-3000:]
    said = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(said) == 1 and "output_dir s3://no-such-bucket-here/runs can't be written" in said[0], out[-2000:]
    assert "data:" not in out.replace("data.", "")  # no stage started


def test_the_pipeline_job_runs_on_nodes_that_share_only_s3(cluster, store):
    """`aimfair submit pipeline` (the demo chain) with output_dir on S3: data splits by Ray Data's write tasks,
    shards by the diffusion actors, checkpoints and models by Ray Train workers, all on worker nodes that can't
    see each other's disk; then `aimfair report` reads the run from the store. (A stage reused, rebuilt or
    refused by its key on the store: tests/test_integrity.py.)"""
    from aimfair_ray.storage import exists, read_json, read_text

    out_dir = f"{store}/runs"
    sets = _pipeline_sets(store)
    args = ["submit", "pipeline", "--address", cluster["dashboard"], "--working-dir", str(ROOT), "--", *_sets(sets)]
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_ADDRESS"}
    res = _aimfair(args, env, timeout=900)
    out = res.stdout
    assert res.returncode == 0, out[-4000:] + res.stderr[-2000:]
    assert "SUCCEEDED" in out and "demo: done" in out
    run = f"{out_dir}/cmnist"
    base = read_json(f"{run}/baseline/audit/audit.json")
    line = [ln for ln in out.splitlines() if ln.startswith("biased baseline on the test set")]
    assert line and f"ACC {base['acc']:.4f}" in line[0]
    tuned = read_json(f"{run}/finetune/selective/audit/audit.json")
    assert {"acc", "wst", "eo", "group_acc"} <= set(tuned)
    from huggingface_hub import ModelCard

    card = ModelCard(read_text(f"{run}/finetune/selective/model/README.md"))  # the fine-tuned model's card, on S3
    assert card.data.fairness_audit["wst"] == {"value": round(tuned["wst"], 4),
                                               "ci": [round(v, 4) for v in tuned["intervals"]["wst"]]}
    assert card.data.provenance["method"] == "selective" and card.data.provenance["synthetic_share"] > 0
    for d in ("data/train", "data/test", "synthetic/balanced", "synthetic/imbalanced", "baseline/model",
              "finetune/selective/model"):
        assert exists(f"{run}/{d}/_COMPLETE"), d
    assert read_json(f"{run}/baseline/result.json")["run_path"].startswith(f"{run}/ray/")
    # the quiet console: a line per stage; Ray's own lines in the run's logs, on the store
    for stage in ("data", "generate", "train baseline", "finetune", "audit"):
        assert f"{stage}: done in" in out, stage
    assert len(out.splitlines()) < 100, len(out.splitlines())
    assert "Started training worker group" in read_text(f"{run}/logs/workers.log")
    stages = [json.loads(x)["stage"] for x in read_text(f"{run}/logs/stages.jsonl").splitlines()]
    assert stages == ["data", "generate", "train baseline", "finetune", "audit", "audit"], stages
    # the shards were drawn on both worker nodes (2 actors of 1 CPU... any node), and every reader found them
    assert read_json(f"{run}/synthetic/balanced/_manifest.json")["rows"] == {f"y{c}_s{g}": 4 for c in (0, 1) for g in (0, 1)}

    rep = _aimfair(["report", *_sets([f"output_dir={out_dir}"])], cluster["env"], timeout=300)
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-2000:]
    html = read_text(f"{run}/report.html")
    for alt in ("real examples per cell", "balanced samples per cell", "imbalanced samples per cell",
                "accuracy per cell"):  # the sample grids read from the shards on S3, the audits' chart
        assert f'<img alt="{alt}" src="data:image/png;base64,' in html, alt

    listed = _aimfair(["jobs", "list", "--address", cluster["dashboard"]], env, timeout=120)
    assert listed.returncode == 0 and "SUCCEEDED" in listed.stdout and "pipeline" in listed.stdout


def test_aimfair_serve_answers_from_a_model_on_the_store_until_sigterm(cluster, store, tmp_path):
    """`aimfair serve --model base=s3://...` (the pipeline run's baseline) with the shipped config's layout and no
    generators: the Api replica, on a worker node (the head has no CPUs), copies the model from the store into its
    node's cache and answers `/v1/classify`; a SIGTERM stops it. Its token (from --token-file) is in no written file
    the test can see, console line or process argument list. Serve's proxy runs on the head only: the nodes share
    this machine's loopback, where a port holds one proxy (a real cluster keeps `proxy_location: EveryNode`)."""
    import base64
    import time

    import numpy as np
    import requests
    import yaml

    from aimfair_ray.data.codecs import encode_png
    from aimfair_ray.storage import read_json

    model = f"{store}/runs/cmnist/baseline/model"
    meta = read_json(f"{model}/model.json")
    cfg = yaml.safe_load(open(ROOT / "serve" / "config.yaml"))
    cfg["applications"][0]["args"].update(image_pipeline=None, text_model=None)
    cfg["proxy_location"] = "HeadOnly"
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    port = _free_ports(1)[0]
    token = os.urandom(16).hex()
    (tmp_path / "token").write_text(token)
    args = [os.path.join(BIN, "aimfair"), "serve", "--config", str(tmp_path / "serve.yaml"), "--model", f"base={model}",
            "--port", str(port), "--token-file", str(tmp_path / "token"), "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(args, env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    auth = {"Authorization": f"Bearer {token}"}
    try:
        deadline = time.time() + 180
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the app still deploying
                pass
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"aimfair serve did not come up: {proc.stdout.read()[-4000:]}")
            time.sleep(1)
        ok = requests.get(f"http://127.0.0.1:{port}/v1/models", headers=auth, timeout=10)
        assert ok.status_code == 200 and [m["id"] for m in ok.json()["models"]] == ["base"]
        size = meta["image_size"]
        image = base64.b64encode(encode_png(np.full((size, size, 3), 128, np.uint8))).decode()
        got = requests.post(f"http://127.0.0.1:{port}/v1/classify", json={"model": "base", "images": [image]},
                            headers=auth, timeout=60)
        assert got.status_code == 200 and got.json()["predictions"][0]["label"] in meta["target_names"], got.text
        assert requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 401
        written = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
        app0 = written["applications"][0]
        assert written["http_options"] == {"host": "127.0.0.1", "port": port} and app0["args"]["models"] == {"base": model}
        assert {d["name"] for d in app0["deployments"]} == {"Api"}  # no options for what the app does not build
        assert app0["args"]["token_file"] == str(tmp_path / "token")
        # whole argument lists from /proc (ps cuts them at the terminal width): the server's own is exactly
        # the arguments given, and no process's holds the token
        cmdlines = _cmdlines()
        argv = cmdlines[proc.pid]  # the interpreter, then the entry script (its shebang) and our arguments
        assert args[0] in argv and argv[argv.index(args[0]):] == args, argv
        assert not [pid for pid, other in cmdlines.items() if any(token in a for a in other)]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:  # killed on a timeout: its app (route /) would stay on the cluster
            subprocess.run([os.path.join(BIN, "serve"), "shutdown", "-y", "-a", cluster["dashboard"]], env=cluster["env"],
                           capture_output=True, timeout=120)
    assert proc.returncode == 0 and token not in out and "token_file" in (tmp_path / "out" / "config.yaml").read_text()
    for f in list((tmp_path / "out").rglob("*")) + list(Path(cluster["private"], "ray").rglob("*")):
        if f.is_file() and not f.is_symlink() and f.stat().st_size < 50 * 2**20:
            assert token.encode() not in f.read_bytes(), f  # the head's Serve controller and proxy logs included


SELECTIVE_SPACE = """\
kind: selective
space:
  finetune.epochs: {grid: [1, 8]}                             # the 1-epoch trial ends first: the driver is killed then
  finetune.synthetic: {grid: [balanced, balanced_filtered]}   # no filtered sets here: those 2 trials fail
objective: {val_acc: 1.0, val_eo: -0.5}
pareto: [val_acc, val_eo]
max_concurrent_trials: 2
asha: {enabled: false}
overrides: [train.num_workers=1]
"""


def _kill_when_a_trial_ends(args: list[str], env: dict, out: str, wait: float = 420) -> dict:
    """Start a sweep; once a trial has ended (its result.json and its line in attempts.log on the store), SIGKILL
    the driver's process group while the other trial still runs; return the finished trials' result.json bytes."""
    import tempfile
    import time

    from aimfair_ray.storage import exists, read_bytes, subdirs

    log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would stall the driver, and Tune with it
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def ended() -> dict:
        return {t.rsplit("/", 1)[1]: read_bytes(f"{t}/result.json") for t in subdirs(f"{out}/trials")
                if exists(f"{t}/attempts.log") and exists(f"{t}/result.json")}

    deadline = time.time() + wait
    while time.time() < deadline and not (finished := ended()):
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"the sweep ended before a trial did: {log.read()[-3000:]}")
        time.sleep(0.5)
    assert finished, "no trial finished in time"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, hard, while the other trial is still to finish
    proc.wait()
    time.sleep(2)  # let Ray notice the dead driver and free its trials' workers
    return finished


@pytest.mark.faults
def test_a_selective_sweep_killed_midway_on_the_store_resumes_only_the_rest(cluster, store, tmp_path):
    """`aimfair sweep selective` on the pipeline run's baseline and synthetic sets on S3 (2 trials at once, Tune's
    experiment and each trial's fine-tuning on the store), its driver killed once the first trial has ended; the
    same command resumes the experiment from the store and runs only the rest. Failed trials (a set that does not
    exist) are named; trials are ranked by val_acc - 0.5 val_eo; the best trial's model audited from the store."""
    import re

    from aimfair_ray.storage import read_bytes, read_json, read_text

    space = tmp_path / "selective.yaml"
    space.write_text(SELECTIVE_SPACE)
    args = [os.path.join(BIN, "aimfair"), "sweep", "selective", "--space", str(space), "--name", "s",
            *_sets(_pipeline_sets(store))]
    run = f"{store}/runs/cmnist"
    out = f"{run}/sweep/s"
    finished = _kill_when_a_trial_ends(args, cluster["env"], out)
    res = subprocess.run(args, env=cluster["env"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if "sweep: resuming" in ln]
    assert line, res.stdout[-3000:]
    counts = [int(w) for w in re.findall(r"(\d+) (?:finished|failed|to run)", line[0])]
    assert counts[0] == 1 and sum(counts) == 4, line[0]  # finished + failed + to run: every trial
    for tid, result in finished.items():  # the finished trial was not trained again
        assert read_bytes(f"{out}/trials/{tid}/result.json") == result
    data = read_json(f"{out}/trials.json")
    rows = data["trials"]
    assert len(rows) == 4
    errors = [r for r in rows if r["status"] == "ERROR"]
    assert len(errors) == 2 and all(r["params"]["finetune.synthetic"] == "balanced_filtered" for r in errors)
    assert all("no synthetic" in r["error"] and "aimfair generate all" in r["error"] for r in errors)
    good = [r for r in rows if r["status"] != "ERROR"]
    assert [r["status"] for r in good] == ["DONE", "DONE"] and all(r["trainings"] == 1 for r in good)
    assert {r["params"]["finetune.epochs"] for r in good} == {1, 8}
    for r in good:
        m = r["metrics"]
        assert m["objective"] == pytest.approx(m["val_acc"] - 0.5 * m["val_eo"])
        assert r["model_dir"].startswith(f"{out}/trials/") and r["checkpoint"].startswith(f"{run}/ray/")
    assert data["best"]["metrics"]["objective"] == max(r["metrics"]["objective"] for r in good)
    assert {"acc", "wst", "eo"} <= set(data["best_test_audit"])
    assert any(r["pareto"] for r in good) and not any(r["pareto"] for r in errors)
    import csv
    import io

    table = list(csv.DictReader(io.StringIO(read_text(f"{out}/trials.csv"))))
    assert len(table) == 4 and {"finetune.epochs", "val_acc", "val_eo", "objective", "checkpoint"} <= set(table[0])
    assert read_bytes(f"{out}/pareto.png")[:4] == b"\x89PNG"
    summary = read_text(f"{out}/summary.md")
    assert "Best trial" in summary and "2 failed" in summary


# The EGT fine-tuning alone (quality=False, what a sweep trial runs): the driver-kill part compares the training's
# history and group weights, not the measurement.
EGT_DRIVER = ("import sys; from aimfair_ray.config import load_config; from aimfair_ray.egt.run import train_generator; "
              "train_generator(load_config('cmnist', overrides=sys.argv[1:]), 'image', quality=False)")


@pytest.mark.faults
def test_egt_image_on_the_store_and_its_killed_driver_resumes_to_the_same_figures(cluster, store):
    """`aimfair egt image` with output_dir on S3 (tiny min–max EGT of the tiny pipeline on the store, 2 Train workers
    on the worker nodes): the held-out loss per group at each checkpoint, FID, precision, recall, density and
    coverage per group from samples sorted by the checker, group weights per noise bucket, and the fine-tuned
    pipeline with its model card, all on S3. Then a driver running the same
    fine-tuning into another run, SIGKILLed after its first checkpoint registered on S3, run again: it resumes from
    that checkpoint (not from step 0) and ends with the history and group weights of the run never stopped."""

    from conftest import egt_image_sets
    from huggingface_hub import ModelCard

    from aimfair_ray.generate.t2i import load_pipeline
    from aimfair_ray.storage import exists, read_json, read_text

    pipeline = f"{store}/models/t2i"
    res = _aimfair(["egt", "image", *_sets(egt_image_sets(pipeline, f"{store}/egt"))], cluster["env"])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    stage = f"{store}/egt/cmnist/egt/image/minmax-seed0"
    whole = read_json(f"{stage}/result.json")
    assert whole["steps"] == 4 and [h["step"] for h in whole["history"]] == [2, 4]
    assert whole["history"][0]["world_size"] == 2 and whole["model_dir"] == f"{stage}/model"
    for h in whole["history"]:  # the held-out denoising loss per group at every checkpoint
        per = json.loads(h["val_groups"])
        assert set(per) == {"red", "green"} and h["val_quality"] == pytest.approx(sum(per.values()) / 2)
        assert h["val_quality_gap"] == pytest.approx(abs(per["red"] - per["green"]))
    q = whole["quality"]
    for m in ("fid", "precision", "recall", "density", "coverage", "denoise"):
        assert set(q[m]) == {"red", "green"}
        assert q["gap"][m] == pytest.approx(max(q[m].values()) - min(q[m].values()))
    assert all(0 <= q[m][g] <= 1 for m in ("precision", "recall", "coverage") for g in q[m])
    # the unconditional setting: drawn without the colour, sorted by the checker up to 4 per group
    assert q["setting"] == "unconditional" and q["generated"] == [4, 4] and q["n_per_group"] == 4
    assert q["drawn"] >= 8 and sum(q["share"].values()) == pytest.approx(1.0)
    levels = whole["group_weights"]["weights"]["levels"]  # one set of group weights per noise bucket
    assert len(levels) == 3 and all(abs(sum(w["q"]) - 1) < 1e-9 for w in levels)
    assert sum(w["q"] != [0.5, 0.5] for w in levels) >= 2
    assert read_json(f"{stage}/quality.json") == q and exists(f"{stage}/config.yaml")
    assert "pretrained" in res.stdout and "minmax" in res.stdout  # the table beside the pretrained model's
    pipe = load_pipeline(whole["model_dir"])  # the fine-tuned generator: a diffusers pipeline folder on S3
    assert pipe.unet.config.sample_size == 32
    card = ModelCard(read_text(f"{whole['model_dir']}/README.md"))  # the per-group quality and the gap EGT equalises
    assert card.data.egt["objective"] == "minmax" and card.data.egt_quality["fid"]["gap"] == round(q["gap"]["fid"], 4)
    assert any(r.metric_type == "fid_gap" for r in card.data.eval_results) and not card.data.adapters

    args = [sys.executable, "-c", EGT_DRIVER, *egt_image_sets(pipeline, f"{store}/egt-killed")]
    snapshot = f"{store}/egt-killed/cmnist/ray/cmnist-egt-image-minmax-seed0/checkpoint_manager_snapshot.json"

    def driver():
        return subprocess.Popen(args, env=cluster["env"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)

    kill_after(driver(), lambda: exists(snapshot) and read_json(snapshot)["checkpoint_results"], "EGT checkpoint")
    proc = driver()
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming the interrupted run" in out and "egt resuming from checkpoint after step" in out, out[-2000:]
    assert int(out.split("egt resuming from checkpoint after step ")[1].split()[0]) in (2, 4)
    again = read_json(f"{store}/egt-killed/cmnist/egt/image/minmax-seed0/result.json")
    assert again["steps"] == 4 and [h["step"] for h in again["history"]] == [2, 4]
    keys = ("step", "loss")
    assert [{k: h[k] for k in keys} for h in again["history"]] == [{k: h[k] for k in keys} for h in whole["history"]]
    assert again["group_weights"] == whole["group_weights"]


def test_egt_text_runs_on_a_users_corpus_on_the_store(cluster, store):
    """A user's own group-labelled texts (a JSONL file on S3, its own column names and group values) and the bundled
    SmolLM2: LoRA adapters on its top block trained on a worker node with the group tags the file's values give;
    the adapters and the per-group perplexity written to S3, read back from there."""
    import pandas as pd
    from safetensors.torch import load_file

    from aimfair_ray.egt.text import bold_gender
    from aimfair_ray.storage import atomic_write_bytes, local_copy, read_json

    rows = [{"sentence": s, "team": team, "person": p} for team, key in (("crew", "male"), ("cast", "female"))
            for p, s in bold_gender()[key][:60]]
    corpus = f"{store}/corpora/teams.jsonl"
    atomic_write_bytes(corpus, pd.DataFrame(rows).to_json(orient="records", lines=True).encode())
    out_dir = f"{store}/text"
    sets = [f"output_dir={out_dir}", "egt.objective=conditional", "egt.steps=2", "egt.checkpoint_every=2",
            "train.num_workers=1", "egt.text.n_train=16", "egt.text.n_eval_per_group=4", "egt.text.max_len=16",
            "egt.text.train_layers=1", "egt.text.lora_rank=2", "egt.batch_size=4", f"egt.text.data={corpus}",
            "egt.text.text_column=sentence", "egt.text.group_column=team", "egt.text.unit_column=person",
            "egt.text.groups=[crew,cast]"]
    res = _aimfair(["egt", "text", *_sets(sets)], cluster["env"])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    stage = f"{out_dir}/cmnist/egt/text/conditional-seed0"
    q = read_json(f"{stage}/quality.json")
    assert set(q["ppl"]) == {"crew", "cast"} and all(1 < v < 1e5 for v in q["ppl"].values())
    assert q["gap"]["ppl"] == pytest.approx(abs(q["ppl"]["crew"] - q["ppl"]["cast"]))
    model = local_copy(f"{stage}/model")
    trained = load_file(f"{model}/trained.safetensors")
    assert trained and all(".layers.29." in k and "lora_" in k for k in trained)
    assert read_json(f"{stage}/model/egt.json")["lora_rank"] == 2


EPOCHS = 4


@pytest.mark.faults
def test_a_worker_node_lost_mid_training_resumes_from_the_store_on_another_node(cluster, store):
    """A new node joins; then a worker node is killed while `train baseline` runs (a Train worker on it): the run
    finishes on the nodes left and resumes on another node from the checkpoint on S3 (no node could have read it
    from the lost one's disk); each epoch after that checkpoint runs once. (A driver killed mid-generation, whose
    rerun draws only the missing shards: tests/test_faces.py.)"""
    from aimfair_ray.storage import exists, read_json, read_text

    out_dir = f"{store}/loss"
    sets = TINY + [f"output_dir={out_dir}", f"train.epochs={EPOCHS}",
                   # epochs of seconds (TINY's took 0.1 s, and the run once ended before the node was lost)
                   "data.n_train=2400", "model.width=32",
                   "train.num_workers=2", "train.max_failures=1", "train.cpus_per_worker=2"]  # a Train worker a node
    env = cluster["env"]
    prep = _aimfair(["data", "prepare", *_sets(sets)], env, timeout=300)
    assert prep.returncode == 0, prep.stdout[-3000:]
    cluster["add"]("node_c")  # a new node joins (3 live nodes + 1); then a node with a Train worker is lost
    cluster["alive"](4)
    proc = cli(["train", "baseline", *_sets(sets)], env)
    snapshot = f"{out_dir}/cmnist/ray/cmnist-baseline/checkpoint_manager_snapshot.json"
    wait_for("registered checkpoint", lambda: exists(snapshot) and read_json(snapshot)["checkpoint_results"], proc)
    hosting = _node_running(cluster, "RayTrainWorker")  # 2 of the 3 worker nodes hold one of the 2 workers each
    assert hosting and not exists(f"{out_dir}/cmnist/baseline/result.json"), "the run ended before a node was lost"
    _lose(cluster, hosting)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    log = read_text(f"{out_dir}/cmnist/logs/workers.log")
    assert "resuming from checkpoint after epoch" in out and "resuming from checkpoint after epoch" in log, \
        f"lost {hosting}: {out[-3000:]}"
    resumed_at = int(log.split("resuming from checkpoint after epoch ")[1].split()[0])
    after = log.split("resuming from checkpoint after epoch")[1]  # each epoch after the checkpoint runs once
    assert [after.count(f"epoch {e}/{EPOCHS} ") for e in range(1, EPOCHS + 1)] == \
        [0] * resumed_at + [1] * (EPOCHS - resumed_at), log[-3000:]
    assert [h["epoch"] for h in read_json(f"{out_dir}/cmnist/baseline/result.json")["history"]] == list(range(1, EPOCHS + 1))


def _node_running(cluster, title: str) -> str:
    """A worker node with a process whose title has ``title`` (Ray names a worker process ``ray::<class>``): a
    descendant of that node's `ray start`."""
    def parent(pid: int) -> int:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])

    roots = {p.pid: name for name, p in cluster["procs"].items() if name != "head" and p.poll() is None}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            if title not in open(f"/proc/{pid}/cmdline").read():
                continue
            while pid > 1:
                if pid in roots:
                    return roots[pid]
                pid = parent(pid)
        except (OSError, ValueError, IndexError):
            continue
    return ""


def _lose(cluster, name) -> None:
    os.killpg(cluster["procs"][name].pid, signal.SIGKILL)
    cluster["procs"][name].wait()
