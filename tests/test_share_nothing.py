"""A cluster shares no disk (issue 36): three Ray nodes on this machine that share nothing but a moto S3 server.

The head has no CPUs (the drivers run there, on this machine's disk); each worker node runs in its own mount
namespace (``unshare -m``) with a private tmpfs over ``<tmp>/node``, where its Ray temp dir, its temporary
files and its store cache live. The run itself is on ``s3://``: what one node writes to its own disk no
other node can read, so a stage that relied on that fails here. The tests share the one cluster and run
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
from conftest import TINY, bench_script, cli, wait_for

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


def test_the_pipeline_job_runs_on_nodes_that_share_only_s3_and_a_rerun_reuses_it(cluster, store):
    """`aimfair submit pipeline` (the demo chain) with output_dir on S3: data splits by Ray Data's write tasks,
    shards by the diffusion actors, checkpoints and models by Ray Train workers, all on worker nodes that can't
    see each other's disk; then `aimfair report` reads the run from the store, and the same job again reuses
    every stage from there."""
    from aimfair_ray.storage import exists, read_json, read_text

    out_dir = f"{store}/runs"
    sets = TINY + [f"output_dir={out_dir}", f"generate.pipeline={store}/models/t2i", "train.num_workers=2",
                   "train.epochs=1", "finetune.epochs=1", "generate.actors=2"]
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

    again = _aimfair(args, env, timeout=900)
    assert again.returncode == 0, again.stdout[-4000:]
    assert "data: reusing" in again.stdout and "0 to generate" in again.stdout
    assert again.stdout.count("train: reusing") == 2
    listed = _aimfair(["jobs", "list", "--address", cluster["dashboard"]], env, timeout=120)
    assert listed.returncode == 0 and listed.stdout.count("SUCCEEDED") >= 2 and "pipeline" in listed.stdout


EGT_SPACE = """\
kind: egt-image
space:
  egt.update: {grid: [soft, worst]}
objective: {val_quality: 1.0, val_quality_gap: 2.0}
mode: min
pareto: [val_quality, val_quality_gap]
max_concurrent_trials: 2
asha: {enabled: false}
overrides: [egt.objective=minmax, train.num_workers=1]
"""


def test_an_egt_image_sweep_of_two_trials_runs_on_the_store(cluster, store, tmp_path):
    """`aimfair sweep egt-image` with output_dir on S3: 2 tiny trials at once (soft and worst updates), Tune's
    experiment and every trial's Train run on the store; both train once, are ranked by val_quality + 2 x gap,
    and the best trial's FID, precision and recall are measured from its checkpoint on the store."""
    from conftest import egt_image_sets

    from aimfair_ray.storage import read_bytes, read_json, read_text

    space = tmp_path / "egt.yaml"
    space.write_text(EGT_SPACE)
    out_dir = f"{store}/egt"
    sets = egt_image_sets(f"{store}/models/t2i", out_dir)
    res = _aimfair(["sweep", "egt-image", "--space", str(space), "--name", "e", *_sets(sets)], cluster["env"])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    out = f"{out_dir}/cmnist/sweep/e"
    data = read_json(f"{out}/trials.json")
    rows = data["trials"]
    assert [r["status"] for r in rows] == ["DONE", "DONE"] and all(r["trainings"] == 1 for r in rows)
    assert {r["params"]["egt.update"] for r in rows} == {"soft", "worst"}
    for r in rows:
        m = r["metrics"]
        assert m["step"] == 4 and m["objective"] == pytest.approx(m["val_quality"] + 2 * m["val_quality_gap"])
        assert r["model_dir"].startswith(f"{out}/trials/") and r["checkpoint"].startswith(f"{out_dir}/cmnist/ray/")
    assert data["best"]["metrics"]["objective"] == min(r["metrics"]["objective"] for r in rows)
    best_q = data["best_test_audit"]
    assert set(best_q["fid"]) == {"red", "green"} and best_q["setting"] == "unconditional"
    assert any(r["pareto"] for r in rows)
    assert read_bytes(f"{out}/pareto.png")[:4] == b"\x89PNG"
    assert "Best trial's quality" in read_text(f"{out}/summary.md")


def test_egt_text_runs_on_the_store(cluster, store):
    """The bundled SmolLM2, LoRA adapters on its top block trained on tagged BOLD sentences on a worker node;
    the adapters and the per-group perplexity written to S3, read back from there."""
    from safetensors.torch import load_file

    from aimfair_ray.storage import local_copy, read_json

    out_dir = f"{store}/text"
    sets = [f"output_dir={out_dir}", "egt.objective=conditional", "egt.steps=2", "egt.checkpoint_every=2",
            "train.num_workers=1", "egt.text.n_train=16", "egt.text.n_eval_per_group=4", "egt.text.max_len=16",
            "egt.text.train_layers=1", "egt.text.lora_rank=2", "egt.batch_size=4"]
    res = _aimfair(["minmax", "text", *_sets(sets)], cluster["env"])
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    stage = f"{out_dir}/cmnist/egt/text/conditional-seed0"
    q = read_json(f"{stage}/quality.json")
    assert set(q["ppl"]) == {"male", "female"} and all(1 < v < 1e5 for v in q["ppl"].values())
    assert q["gap"]["ppl"] == pytest.approx(abs(q["ppl"]["male"] - q["ppl"]["female"]))
    model = local_copy(f"{stage}/model")
    trained = load_file(f"{model}/trained.safetensors")
    assert trained and all(".layers.29." in k and "lora_" in k for k in trained)
    assert read_json(f"{stage}/model/egt.json")["lora_rank"] == 2


@pytest.mark.faults
def test_a_worker_node_lost_mid_generation_and_mid_training_resumes_from_the_store(cluster, store):
    """A worker node killed while `generate images` runs (an actor on it), then one killed while `train baseline`
    runs (a Train worker on it): both finish on the nodes left, with exactly the planned ids, and the Train run
    resumes on another node from the checkpoint on S3 (no node could have read it from the lost one's disk)."""
    from aimfair_ray.generate.images import written_ids
    from aimfair_ray.storage import exists, read_json, read_text

    out_dir = f"{store}/loss"
    sets = TINY + [f"output_dir={out_dir}", f"generate.pipeline={store}/models/t2i", "generate.n_balanced_per_cell=30",
                   "generate.n_imbalanced=8", "generate.steps=4", "generate.actors=2", "train.epochs=3",
                   "train.num_workers=2", "train.max_failures=1", "train.cpus_per_worker=2"]  # a Train worker a node
    env = cluster["env"]
    prep = _aimfair(["data", "prepare", *_sets(sets)], env, timeout=300)
    assert prep.returncode == 0, prep.stdout[-3000:]
    proc = cli(["generate", "images", *_sets(sets)], env)
    bal = f"{out_dir}/cmnist/synthetic/balanced"
    wait_for("first shard", lambda: len(written_ids(bal)) and _node_running(cluster, "DiffusionActor"), proc)
    _lose(cluster, _node_running(cluster, "DiffusionActor"))
    assert len(written_ids(bal)) < 120 and proc.poll() is None  # mid-generation
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert "120/120 written" in out
    for kind, n in (("balanced", 120), ("imbalanced", 8)):
        ids = written_ids(f"{out_dir}/cmnist/synthetic/{kind}").to_pylist()
        assert len(ids) == len(set(ids)) == n, kind  # every planned id once
    cluster["add"]("node_c")  # a new node joins (2 live nodes + 1); then a node with a Train worker is lost
    cluster["alive"](3)
    proc = cli(["train", "baseline", *_sets(sets)], env)
    snapshot = f"{out_dir}/cmnist/ray/cmnist-baseline/checkpoint_manager_snapshot.json"
    wait_for("registered checkpoint", lambda: exists(snapshot) and read_json(snapshot)["checkpoint_results"], proc)
    hosting = _node_running(cluster, "RayTrainWorker")  # each worker node holds one of the 2 workers
    assert hosting
    _lose(cluster, hosting)
    cluster["add"]("node_d")  # the replacement worker's node: it resumes there from the checkpoint on S3
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    log = read_text(f"{out_dir}/cmnist/logs/workers.log")
    assert "resuming from checkpoint after epoch" in out and "resuming from checkpoint after epoch" in log, \
        f"lost {hosting}: {out[-3000:]}"
    assert [h["epoch"] for h in read_json(f"{out_dir}/cmnist/baseline/result.json")["history"]] == [1, 2, 3]


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
