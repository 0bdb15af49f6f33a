"""`aimfair submit`: stages as Ray jobs on the session's head (`ray start --head`, see
conftest.ray_head), with the checkout uploaded as the job's working dir. The embedded
pipeline job here is also the demo's end-to-end test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import TINY, tiny_gen

ROOT = Path(__file__).resolve().parents[1]
AIMFAIR = os.path.join(os.path.dirname(sys.executable), "aimfair")


def _aimfair(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.run([AIMFAIR, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _sets(items):
    return [x for s in items for x in ("--set", s)]


def test_pipeline_job_end_to_end_publishes_to_s3_and_resumes_on_a_fresh_node(ray_head, tiny_pipeline, s3, tmp_path):
    """The pipeline job with its outputs published to S3 (storage_uri) and its Ray Train runs stored there
    (train.storage_path), on a real S3 endpoint (moto's server on loopback)."""
    from aimfair_ray.storage import fetch

    store = f"{s3}/{tmp_path.name}"
    # the smallest run that still goes through every stage: one Train worker, one epoch each
    sets = TINY + tiny_gen(tiny_pipeline) + [f"output_dir={tmp_path / 'runs'}", f"storage_uri={store}",
                                             f"train.storage_path={store}/ray", "train.num_workers=1", "train.epochs=1",
                                             "finetune.epochs=1"]
    args = ["submit", "pipeline", "--address", ray_head["dashboard"], "--working-dir", str(ROOT), "--", *_sets(sets)]
    res = _aimfair(*args)
    out = res.stdout
    assert res.returncode == 0, out[-4000:] + res.stderr[-2000:]
    assert "SUCCEEDED" in out and "demo: done" in out  # the job's logs streamed here
    # the audit headline lines, as the demo prints them
    line = [ln for ln in out.splitlines() if ln.startswith("biased baseline on the test set")]
    run = tmp_path / "published"  # what the job published to storage_uri, as a reader of the store gets it
    assert fetch(f"{store}/cmnist", str(run)) > 0
    rep = json.loads((run / "baseline" / "audit" / "audit.json").read_text())
    assert {"acc", "wst", "std", "eo", "eod_worst", "dp", "group_acc", "n"} <= set(rep)
    assert line and f"ACC {rep['acc']:.4f}" in line[0] and all(k in line[0] for k in ("WST", "STD", "EO"))
    ft = json.loads((run / "finetune" / "selective" / "audit" / "audit.json").read_text())
    tuned = [ln for ln in out.splitlines() if ln.startswith("fine-tuned (selective) on the test set")]
    assert tuned and f"WST {ft['wst']:.4f}" in tuned[0]
    assert json.loads((run / "finetune" / "selective" / "selection.json").read_text())["n_trainable_tensors"] >= 1
    assert json.loads((run / "baseline" / "result.json").read_text())["run_path"].startswith(f"{store}/ray/")
    # the quiet console (issue 23): a line per stage with its time, no Ray internals (they are in the run's logs/)
    for stage in ("data", "generate", "train baseline", "finetune", "audit"):
        assert f"{stage}: done in" in out, stage
    for noise in ("TrainingReport", "Checkpoint successfully created", "core_worker.cc", "Execution plan of Dataset",
                  "Deprecat", "worker processes have been started", "Started training worker group"):
        assert noise not in out, noise
    assert len(out.splitlines()) < 100, len(out.splitlines())
    # Ray Train's own lines are in the run's logs: with Train storage on a URI every run has its own worker group
    assert (run / "logs" / "workers.log").read_text().count("Started training worker group") == 3
    stages = [json.loads(x)["stage"] for x in (run / "logs" / "stages.jsonl").read_text().splitlines()]
    assert stages == ["data", "generate", "train baseline", "finetune", "audit", "audit"], stages
    for d in ("data", "synthetic", "baseline", "baseline/audit", "finetune/selective", "finetune/selective/audit"):
        assert (run / d / "config.yaml").is_file(), d
    for d in ("data/train", "data/test", "synthetic/balanced", "synthetic/imbalanced", "baseline/model"):
        assert (run / d / "_COMPLETE").is_file(), d
    local = {p.relative_to(tmp_path / "runs" / "cmnist") for p in (tmp_path / "runs" / "cmnist").rglob("*")
             if p.is_file() and not any(".tmp-" in q or ".old-" in q for q in p.parts)}
    published = {p.relative_to(run) for p in run.rglob("*") if p.is_file()}
    assert local == published
    # a fresh node: the local outputs are gone; the rerun fetches them from storage and trains nothing again
    shutil.rmtree(tmp_path / "runs")
    again = _aimfair(*args)
    assert again.returncode == 0, again.stdout[-4000:]
    assert "storage: fetched" in again.stdout and "data: reusing" in again.stdout
    assert again.stdout.count("train: reusing") == 2 and "0 to generate" in again.stdout
    listed = _aimfair("jobs", "list", "--address", ray_head["dashboard"])
    assert listed.returncode == 0 and listed.stdout.count("SUCCEEDED") >= 2 and "pipeline" in listed.stdout


def test_failing_job_reports_failed_with_the_error_in_its_logs(ray_head):
    res = _aimfair("submit", "baseline", "--address", ray_head["dashboard"], "--working-dir", str(ROOT),
                   "--", "--set", "train.epochs=0", timeout=300)
    assert res.returncode == 1, res.stdout[-3000:]
    assert "FAILED" in res.stdout and "train.epochs" in res.stdout  # the job's own error, streamed from its logs
    jid = [w for w in res.stdout.split() if w.startswith("raysubmit_")][0]
    logs = _aimfair("jobs", "logs", jid, "--address", ray_head["dashboard"])
    assert logs.returncode == 0 and "train.epochs" in logs.stdout


def test_submit_bad_input_exits_2_before_submitting(ray_head, tmp_path):
    res = _aimfair("submit", "nope", "--address", ray_head["dashboard"])
    assert res.returncode == 2 and "unknown stage 'nope'" in res.stdout and "pipeline" in res.stdout
    res = _aimfair("submit", "pipeline", "--address", ray_head["dashboard"], "--working-dir", str(tmp_path))
    assert res.returncode == 2 and "jobs/pipeline.py is not in the working dir" in res.stdout
    res = _aimfair("submit", "pipeline", "--address", "http://127.0.0.1:9", "--working-dir", str(ROOT), timeout=120)
    assert res.returncode == 2 and "cannot reach the Ray job server" in res.stdout
    res = _aimfair("jobs", "logs", "raysubmit_nope", "--address", ray_head["dashboard"])
    assert res.returncode == 2 and "no job 'raysubmit_nope'" in res.stdout
