"""Nothing lost, nothing mixed (issue 21): manifests, versioned publishing, synthetic-set fingerprints,
checkpoint hashes, and the faults that would break them (marked `faults`; they run in `make test`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY, tiny_gen

from aimfair_ray import AimfairError


def _flip(path, at: int = -100) -> None:
    """One byte changed, the size kept (a bit flip)."""
    b = bytearray(open(path, "rb").read())
    b[at] ^= 0xFF
    open(path, "wb").write(bytes(b))


def _truncate(path, keep: float = 0.5) -> None:
    b = open(path, "rb").read()
    open(path, "wb").write(b[: int(len(b) * keep)])


# ---- plain: no Ray ---------------------------------------------------------------------------
@pytest.mark.faults
def test_publish_versions_each_entry_and_fetch_gets_one_version_whole(tmp_path):
    from aimfair_ray.storage import POINTERS, VERSIONS, fetch, publish

    run, store = tmp_path / "run", str(tmp_path / "store")
    (run / "data" / "train").mkdir(parents=True)
    (run / "data" / "train" / "a.parquet").write_bytes(b"a" * 10)
    (run / "data" / "train" / "b.parquet").write_bytes(b"b" * 10)
    (run / "data" / ".x.tmp-1234").mkdir()
    (run / "data" / ".x.tmp-1234" / "half").write_text("not published")
    (run / "report.html").write_text("<p>1</p>")
    assert publish(str(run), store) == 3
    assert publish(str(run), store) == 0  # nothing changed: no new version
    first = json.loads((tmp_path / "store" / POINTERS / "data.json").read_text())["version"]
    # the stage rebuilt with other shards: a new version; the old one, with its shard b, is gone
    (run / "data" / "train" / "b.parquet").unlink()
    (run / "data" / "train" / "c.parquet").write_bytes(b"c" * 10)
    assert publish(str(run), store) == 1  # a.parquet is copied inside the store, not uploaded
    versions = os.listdir(tmp_path / "store" / VERSIONS / "data")
    assert len(versions) == 1 and versions[0] != first
    fresh = tmp_path / "fresh"
    assert fetch(store, str(fresh)) == 3
    assert sorted(p.name for p in (fresh / "data" / "train").iterdir()) == ["a.parquet", "c.parquet"]
    assert (fresh / "report.html").read_text() == "<p>1</p>" and not list(fresh.glob(".*"))
    # fetched files keep their published times: publishing the fetched run uploads nothing
    assert publish(str(fresh), store) == 0
    # a local entry is never overwritten by a fetch
    (fresh / "report.html").write_text("mine")
    assert fetch(store, str(fresh)) == 0 and (fresh / "report.html").read_text() == "mine"


def _shard_dir(tmp_path, n=3):
    d = tmp_path / "split"
    d.mkdir()
    for i in range(n):
        pq.write_table(pa.table({"id": [f"r{i}"], "target": [i % 2], "group": [0]}), d / f"part-{i}.parquet")
    return d


@pytest.mark.faults
def test_manifest_names_a_missing_damaged_or_unlisted_file(tmp_path):
    from aimfair_ray import manifest

    d = _shard_dir(tmp_path)
    m = manifest.write(str(d), "fp", {"y0_s0": 2, "y1_s0": 1})
    assert set(m["files"]) == {f"part-{i}.parquet" for i in range(3)} and m["fingerprint"] == "fp"
    assert manifest.verify(str(d), "FIX")["rows"] == {"y0_s0": 2, "y1_s0": 1}
    (d / "samples.png").write_bytes(b"png")  # a picture added later is no data
    manifest.verify(str(d), "FIX")
    cases = [(lambda: _flip(d / "part-1.parquet"), "part-1.parquet is damaged (its sha256"),
             (lambda: _truncate(d / "part-2.parquet"), "part-2.parquet is damaged ("),
             (lambda: (d / "part-0.parquet").unlink(), "part-0.parquet is missing"),
             (lambda: (d / "part-9.parquet").write_bytes(b"x"), "part-9.parquet is not in")]
    for damage, said in cases:
        d2 = tmp_path / f"copy{len(said)}"
        shutil.copytree(d, d2)
        d, keep = d2, d
        damage()
        with pytest.raises(AimfairError, match="FIX") as e:
            manifest.verify(str(d), "FIX")
        assert said in str(e.value) and "\n" not in str(e.value)
        d = keep


@pytest.mark.faults
def test_checkpoint_weights_are_checked_against_their_recorded_sha256(tmp_path):
    import torch

    from aimfair_ray.models import build_model, load_classifier, save_classifier

    torch.manual_seed(0)
    meta = {"backbone": "small_cnn", "num_classes": 2, "image_size": 28, "width": 8}
    d = save_classifier(build_model("small_cnn", 2, 28, width=8), meta, str(tmp_path / "model"))
    assert len(json.loads((tmp_path / "model" / "model.json").read_text())["weights_sha256"]) == 64
    load_classifier(d)
    for damage, said in ((_flip, "is damaged (its sha256"), (_truncate, "is damaged (its sha256")):
        bad = tmp_path / f"bad-{damage.__name__}"
        shutil.copytree(d, bad)
        damage(bad / "model.safetensors")
        with pytest.raises(AimfairError, match=r"model\.safetensors " + said.replace("(", r"\(")):
            load_classifier(bad)
    # the faithfulness filter's checker: written whole with its manifest, checked on load
    from aimfair_ray.generate.checker import Checker

    Checker([(230, 40, 40), (40, 200, 40)]).save(str(tmp_path / "checker"))
    assert Checker.load(str(tmp_path / "checker")).colors == [[230, 40, 40], [40, 200, 40]]
    _flip(tmp_path / "checker" / "checker.safetensors")
    with pytest.raises(AimfairError, match=r"checker\.safetensors is damaged .*the filter trains it again"):
        Checker.load(str(tmp_path / "checker"))


def _plan(counts, prompts=("a red zero", "a red 0")):
    from aimfair_ray.generate.images import Plan

    p = pd.DataFrame({"id": [f"p{i}" for i in range(len(prompts))], "cell": "y0_s0", "prompt": list(prompts),
                      "target": 0, "group": 0})
    return Plan(p, "balanced", {"y0_s0": counts}, seed=0)


def _fake_generate(out, plan, meta, batch=3):
    """Shards for the plan's rows as the diffusion actor commits them (random bytes for images)."""
    from aimfair_ray.generate.images import write_shard

    rows = plan.rows()
    for i in range(0, len(rows), batch):
        b = rows.iloc[i:i + batch]
        write_shard(pd.DataFrame({"id": b["id"], "image": [b"img"] * len(b), "target": b["target"], "group": b["group"],
                                  "split": b["split"], "source": "synthetic", "prompt": b["prompt"],
                                  "generator": json.dumps(meta)}), str(out))


@pytest.mark.faults
def test_a_set_made_with_other_settings_is_drawn_again_or_refused_and_a_lower_count_keeps_the_first(tmp_path):
    from aimfair_ray.generate.images import _check, _settle, written_ids

    out, said = tmp_path / "balanced", []
    out.mkdir()
    meta = {"steps": 4, "guidance_scale": 1.0}
    plan = _plan(8)
    _settle(out, plan, meta, force=False, keep=False, log=said.append)
    _fake_generate(out, plan, meta)
    _check(str(out), plan)
    _settle(out, plan, meta, force=False, keep=False, log=said.append)  # the same settings: kept
    assert len(written_ids(str(out))) == 8 and not said
    # other steps: refused with --keep (one line saying what changed), drawn again without
    with pytest.raises(AimfairError, match=r"steps 4 -> 6.*--keep") as e:
        _settle(out, plan, dict(meta, steps=6), force=False, keep=True)
    assert "\n" not in str(e.value) and len(written_ids(str(out))) == 8
    _settle(out, plan, dict(meta, steps=6), force=False, keep=False, log=said.append)
    assert len(written_ids(str(out))) == 0 and "drawing the set again (steps 4 -> 6)" in said[-1]
    _fake_generate(out, plan, dict(meta, steps=6))
    # other prompts: drawn again too
    _settle(out, _plan(8, ("a red zero", "a crimson 0")), dict(meta, steps=6), force=False, keep=False, log=said.append)
    assert len(written_ids(str(out))) == 0 and "(the prompts)" in said[-1]
    _settle(out, plan, meta, force=False, keep=False)
    _fake_generate(out, plan, meta)
    # a lower count keeps the first ids of the cell (shards rewritten or removed), and the set checks
    small = _plan(4)
    _settle(out, small, meta, force=False, keep=False, log=said.append)
    assert sorted(written_ids(str(out)).to_pylist()) == [f"balanced-y0_s0-{k:06d}" for k in range(4)]
    _check(str(out), small)
    assert "kept its first 4 images" in said[-1]
    _settle(out, small, meta, force=True, keep=False, log=said.append)  # --force: always again
    assert len(written_ids(str(out))) == 0 and "(--force)" in said[-1]


@pytest.mark.faults
def test_a_disk_full_while_writing_is_one_line_and_the_previous_output_stays(ray_cluster, tmp_path):
    """A 256 KiB filesystem the test mounts: a split of Parquet shards (Ray Data's writer), a checkpoint
    folder and a JSON file that do not fit are each one line, and what was there before stays."""
    from aimfair_ray.data.io import SCHEMA, make_table, read_table, write_split
    from aimfair_ray.models import build_model, load_classifier, save_classifier
    from aimfair_ray.storage import atomic_write_bytes

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        def table(n, size):
            return make_table({"id": [f"r{i:04d}" for i in range(n)], "image": [os.urandom(size) for _ in range(n)],
                               "target": [i % 2 for i in range(n)], "group": [0] * n, "split": ["train"] * n,
                               "source": ["real"] * n}).cast(SCHEMA)

        write_split(table(8, 1000), str(mnt / "train"), "a test")
        with pytest.raises(AimfairError, match=r"no space left on the device writing .*/train: free some space") as e:
            write_split(table(400, 2000), str(mnt / "train"), "a test")  # 800 KB of images
        assert "\n" not in str(e.value)
        assert read_table(str(mnt / "train"), ["id"]).num_rows == 8 and [p.name for p in mnt.iterdir()] == ["train"]
        d, meta = mnt / "model", {"backbone": "small_cnn", "num_classes": 2, "image_size": 28}
        save_classifier(build_model("small_cnn", 2, 28, width=8), dict(meta, width=8), str(d))  # ~30 KB
        with pytest.raises(AimfairError, match=r"no space left on the device writing .*/model: free some space") as e:
            save_classifier(build_model("small_cnn", 2, 28, width=96), dict(meta, width=96), str(d))
        assert "\n" not in str(e.value)
        assert load_classifier(d)[1]["width"] == 8  # the previous checkpoint, whole
        assert sorted(p.name for p in mnt.iterdir()) == ["model", "train"]  # no half-written copy left
        atomic_write_bytes(str(mnt / "a.json"), b"{}")
        with pytest.raises(AimfairError, match="no space left"):
            atomic_write_bytes(str(mnt / "a.json"), os.urandom(1 << 20))
        assert (mnt / "a.json").read_bytes() == b"{}"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---- on the session's Ray cluster ------------------------------------------------------------
def _rows(directory) -> int:
    from aimfair_ray.data.io import read_table

    return read_table(str(directory), ["id"]).num_rows


@pytest.mark.faults
def test_s3_store_never_mixes_a_rebuilt_stage_and_force_starts_fresh_on_s3(ray_cluster, s3, tmp_path):
    """Probes 1 and 6 on a real S3 endpoint: a stage rebuilt at another size, published, then fetched by a
    fresh node, has exactly its own rows; `--force` with Train storage on s3:// trains from scratch."""
    import pyarrow.fs as pafs

    from aimfair_ray.config import load_config
    from aimfair_ray.data.prepare import prepare_data
    from aimfair_ray.storage import VERSIONS, filesystem, pull_run, push_run
    from aimfair_ray.train.baseline import train_baseline

    store, runs = f"{s3}/{tmp_path.name}", tmp_path / "runs"
    sets = TINY + [f"output_dir={runs}", f"storage_uri={store}", f"train.storage_path={store}/ray", "train.num_workers=1",
                   "train.epochs=1"]
    quiet = dict(log=lambda *_: None)
    for n in (400, 600):
        cfg = load_config("cmnist", overrides=sets + [f"data.n_train={n}"])
        prepare_data(cfg, **quiet)
        push_run(cfg)
    shutil.rmtree(runs)  # a fresh node
    assert pull_run(cfg) > 0
    said = []
    meta = prepare_data(cfg, log=said.append)
    assert "data: reusing" in said[0]
    assert _rows(f"{cfg.data_dir}/train") == 600 == meta["splits"]["train"]["n"]
    assert _rows(f"{cfg.data_dir}/val") == meta["splits"]["val"]["n"]
    fs, p = filesystem(f"{store}/cmnist/{VERSIONS}/data")
    assert len(fs.get_file_info(pafs.FileSelector(p))) == 1  # the old version went after the switch
    first = train_baseline(cfg, **quiet)
    assert first["run_path"].startswith("s3://")
    said = []
    again = train_baseline(cfg, force=True, log=said.append)
    assert any(f"starting fresh (removing {first['run_path']})" in m for m in said), said
    assert not any("resuming" in m for m in said) and [h["epoch"] for h in again["history"]] == [1]


@pytest.mark.faults
def test_damaged_shards_and_weights_are_named_in_one_line_before_anything_is_removed(trained, tmp_path):
    """Probes 4 and 5: a truncated train shard stops `data prepare` (reuse) and `train baseline --force`
    (before the old Ray Train run is removed); truncated or bit-flipped weights stop an audit."""
    from aimfair_ray.config import load_config
    from aimfair_ray.data.prepare import prepare_data
    from aimfair_ray.evaluate import audit
    from aimfair_ray.train.baseline import train_baseline

    cfg0, _, result = trained
    shutil.copytree(cfg0.run_dir, tmp_path / "cmnist")
    cfg = load_config("cmnist", overrides=TINY + [f"output_dir={tmp_path}", "train.num_workers=2"])
    shard = sorted((tmp_path / "cmnist" / "data" / "train").glob("*.parquet"))[0]
    _truncate(shard)
    with pytest.raises(AimfairError, match=rf"{shard} is damaged .*rerun `aimfair data prepare --force`") as e:
        prepare_data(cfg, log=lambda *_: None)
    assert "\n" not in str(e.value)
    run_path = tmp_path / "cmnist" / "ray" / "cmnist-baseline"
    kept = sorted(p.name for p in run_path.iterdir())
    with pytest.raises(AimfairError, match=rf"{shard} is damaged"):
        train_baseline(cfg, force=True, log=lambda *_: None)
    assert sorted(p.name for p in run_path.iterdir()) == kept  # the old run is still there
    model = tmp_path / "cmnist" / "baseline" / "model"
    for damage in (_flip, _truncate):
        shutil.copy(f"{result['model_dir']}/model.safetensors", model / "model.safetensors")
        damage(model / "model.safetensors")
        with pytest.raises(AimfairError, match=rf"{model}/model.safetensors is damaged"):
            audit(str(model), f"{cfg0.data_dir}/test", str(tmp_path / "audit"))
    assert not (tmp_path / "audit" / "audit.json").exists()


@pytest.mark.faults
def test_a_lower_count_and_other_settings_on_generated_sets(synth, tmp_path):
    """Probes 2 and 3 through the generation stage: other steps draw the set again (refused with keep);
    a lower count keeps the first images of each cell, and the set's manifest lists only them."""
    from aimfair_ray import manifest
    from aimfair_ray.config import load_config
    from aimfair_ray.generate.stage import run_images, run_prompts

    cfg0, _ = synth
    shutil.copytree(cfg0.run_dir, tmp_path / "cmnist", ignore=shutil.ignore_patterns("ray"))
    sets = TINY + tiny_gen(cfg0.generate.pipeline) + [f"output_dir={tmp_path}"]
    said = []
    cfg = load_config("cmnist", overrides=sets + ["generate.n_balanced_per_cell=2"])
    prompts = run_prompts(cfg, log=said.append)
    run_images(cfg, prompts, sets=("balanced",), log=said.append)
    bal = tmp_path / "cmnist" / "synthetic" / "balanced"
    assert "kept its first 8 images" in " ".join(said) and _rows(bal) == 8
    m = manifest.verify(str(bal))
    assert m["rows"] == {f"y{c}_s{s}": 2 for c in (0, 1) for s in (0, 1)} and sum(m["rows"].values()) == 8
    cfg = load_config("cmnist", overrides=sets + ["generate.n_balanced_per_cell=2", "generate.steps=3"])
    with pytest.raises(AimfairError, match="steps 2 -> 3"):
        run_images(cfg, prompts, sets=("balanced",), log=said.append, keep=True)
    run_images(cfg, prompts, sets=("balanced",), log=said.append)
    assert any("drawing the set again (steps 2 -> 3)" in m for m in said) and _rows(bal) == 8
    from aimfair_ray.data.io import first_row

    assert json.loads(first_row(str(bal), ["generator"])["generator"])["steps"] == 3  # the rows say what made them


def _cli(args, env):
    return subprocess.Popen([sys.executable, "-m", "aimfair_ray.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(what, cond, proc, timeout=240):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


def _registered(run_path):
    """The checkpoints Ray Train's controller has registered (what a restarted or resumed run restores)."""
    snap = run_path / "checkpoint_manager_snapshot.json"
    return snap.is_file() and json.loads(snap.read_text())["checkpoint_results"]


@pytest.mark.faults
def test_a_train_worker_killed_mid_epoch_is_replaced_and_the_run_resumes_from_its_checkpoint(ray_cluster, ray_head,
                                                                                             tmp_path):
    """A Ray Train worker process killed (SIGKILL) after the first epoch's checkpoint: Ray Train starts a new
    worker group (train.max_failures=1), which resumes from that checkpoint; each epoch after it runs once."""
    from ray.util.state import list_actors

    from aimfair_ray.config import load_config
    from aimfair_ray.data.prepare import prepare_data

    sets = TINY + [f"output_dir={tmp_path}", "train.epochs=3", "train.num_workers=1", "train.max_failures=1",
                   "train.keep_checkpoints=3"]
    prepare_data(load_config("cmnist", overrides=sets), log=lambda *_: None)
    workers = dict(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True,
                   address=ray_head["dashboard"])  # this session's cluster, whatever else runs on the machine
    before = {a.actor_id for a in list_actors(**workers)}
    proc = _cli(["train", "baseline", *[x for s in sets for x in ("--set", s)]], dict(os.environ, RAY_ADDRESS=ray_cluster))
    run_path = tmp_path / "cmnist" / "ray" / "cmnist-baseline"
    # a checkpoint Ray Train has registered (one written but not yet registered when its worker dies is
    # not restored: that epoch runs again)
    _wait_for("registered checkpoint", lambda: _registered(run_path), proc)
    victims = [a for a in list_actors(**workers) if a.actor_id not in before]
    assert len(victims) == 1
    os.kill(victims[0].pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    log = (tmp_path / "cmnist" / "logs" / "workers.log").read_text()
    assert "resuming from checkpoint after epoch" in log, log[-3000:]
    resumed_at = int(log.split("resuming from checkpoint after epoch ")[1].split()[0])
    assert 1 <= resumed_at < 3
    after = log.split("resuming from checkpoint after epoch")[1]
    assert [after.count(f"epoch {e}/3 ") for e in (1, 2, 3)] == [0] * resumed_at + [1] * (3 - resumed_at)
    result = json.loads((tmp_path / "cmnist" / "baseline" / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]


# ---- a cluster of three nodes on this machine ----------------------------------------------------
def _node_cmd(tmp, extra):
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    return [ray, "start", "--block", "--node-ip-address=127.0.0.1", "--object-store-memory=150000000",
            "--disable-usage-stats", *extra]


@pytest.fixture
def nodes(ray_cluster, tmp_path):
    """A head (1 CPU) and two worker nodes (2 CPUs each) started with `ray start` on loopback, each its own
    process group (killing one's group is losing that node). Nodes are declared dead after ~3 s of silence."""
    from conftest import _free_ports

    tmp = tempfile.mkdtemp(prefix="afn-", dir="/tmp")
    gcs, dash_agent, agent_grpc, env_agent, metrics = _free_ports(5)
    env = dict(os.environ, RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="6",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0", PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    procs = {}

    def start(name, extra):
        log = open(f"{tmp}/{name}.log", "w")
        procs[name] = subprocess.Popen(_node_cmd(tmp, extra), env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)

    start("head", ["--head", f"--port={gcs}", "--num-cpus=1", f"--temp-dir={tmp}", "--include-dashboard=false",
                   f"--dashboard-agent-listen-port={dash_agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                   f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}"])
    address = f"127.0.0.1:{gcs}"
    time.sleep(4)

    def add(name):  # every port its own: two nodes on one machine must not share one
        ports = _free_ports(6)
        start(name, [f"--address={address}", "--num-cpus=2", f"--dashboard-agent-listen-port={ports[0]}",
                     f"--dashboard-agent-grpc-port={ports[1]}", f"--runtime-env-agent-port={ports[2]}",
                     f"--metrics-export-port={ports[3]}", f"--node-manager-port={ports[4]}",
                     f"--object-manager-port={ports[5]}"])

    def alive(n):
        probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.time() + 120
        while True:
            out = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True)
            if out.stdout.strip() == str(n):
                return
            assert time.time() < deadline, f"the cluster has not {n} live nodes: {out.stdout} {out.stderr[-2000:]}"
            time.sleep(1)

    try:  # the nodes go whether the test or the set-up itself fails (a leaked head is a second Ray instance
        add("node_a")  # on the machine, which makes every later address-less Ray call refuse to choose)
        alive(2)
        add("node_b")
        alive(3)
        yield {"address": address, "procs": procs, "env": env, "add": add, "alive": alive}
    finally:
        for p in procs.values():  # each node's whole process group: `ray start` and what it started
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=20)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        shutil.rmtree(tmp, ignore_errors=True)


def _node_running(nodes, title: str) -> str:
    """A worker node (not the head) with a process whose title has ``title`` (Ray names a worker process
    ``ray::<class>``): a descendant of that node's `ray start`."""
    def parent(pid: int) -> int:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])

    roots = {p.pid: name for name, p in nodes["procs"].items() if name != "head" and p.poll() is None}
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


def _lose(nodes, name) -> None:
    os.killpg(nodes["procs"][name].pid, signal.SIGKILL)
    nodes["procs"][name].wait()


@pytest.mark.faults
def test_a_node_lost_mid_generation_and_mid_training(nodes, tmp_path):
    """A worker node killed while `generate images` runs (an actor on it) and while `train baseline` runs
    (a Train worker on it): both finish on the surviving nodes, with exactly the planned ids and a model
    trained on from the last registered checkpoint."""
    from aimfair_ray.config import load_config
    from aimfair_ray.data.prepare import prepare_data
    from aimfair_ray.generate.images import written_ids

    sets = TINY + [f"output_dir={tmp_path}", "generate.n_balanced_per_cell=30", "generate.n_imbalanced=8",
                   "generate.steps=4", "generate.actors=2", "train.epochs=3", "train.num_workers=2", "train.max_failures=1"]
    cfg = load_config("cmnist", overrides=sets)
    prepare_data(cfg, log=lambda *_: None)  # on the session's cluster: the files are this machine's
    env = dict(nodes["env"], RAY_ADDRESS=nodes["address"])
    args = [x for s in sets for x in ("--set", s)]
    proc = _cli(["generate", "images", *args], env)
    bal = tmp_path / "cmnist" / "synthetic" / "balanced"
    _wait_for("first shard", lambda: list(bal.glob("shard-*.parquet")) and _node_running(nodes, "DiffusionActor"), proc)
    lost = _node_running(nodes, "DiffusionActor")
    _lose(nodes, lost)
    at_loss = len(written_ids(str(bal)))
    assert at_loss < 120 and proc.poll() is None  # mid-generation
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert "120/120 written" in out
    for kind, n in (("balanced", 120), ("imbalanced", 8)):
        ids = written_ids(str(tmp_path / "cmnist" / "synthetic" / kind)).to_pylist()
        assert len(ids) == len(set(ids)) == n, kind  # every planned id once
    # a new node joins (2 live nodes + 1); then the node with a Train worker is lost mid-run
    nodes["add"]("node_c")
    nodes["alive"](3)
    proc = _cli(["train", "baseline", *args], env)
    run_path = tmp_path / "cmnist" / "ray" / "cmnist-baseline"
    _wait_for("registered checkpoint", lambda: _registered(run_path), proc)
    hosting = _node_running(nodes, "RayTrainWorker")  # the head has 1 CPU: one of the 2 workers is on a worker node
    assert hosting
    _lose(nodes, hosting)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    log = (tmp_path / "cmnist" / "logs" / "workers.log").read_text()
    assert "resuming from checkpoint after epoch" in log, log[-3000:]
    result = json.loads((tmp_path / "cmnist" / "baseline" / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]


# ---- the driver killed, then the same command again ---------------------------------------------
def _kill_after(proc, ready, what) -> None:
    _wait_for(what, ready, proc, timeout=300)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, hard, mid-run
    proc.wait()
    time.sleep(2)  # let Ray reap the dead driver's actors


@pytest.mark.faults
def test_the_driver_killed_during_finetune_resumes_to_the_figures_of_an_uninterrupted_run(synth, ray_cluster, tmp_path):
    """`aimfair finetune` killed after a checkpoint of its fine-tuning job; the same command resumes from
    it (no epoch before it again) and ends with the weights and history of a run that was never stopped."""
    from safetensors.torch import load_file

    from aimfair_ray.config import load_config
    from aimfair_ray.train.finetune import finetune

    cfg0, _ = synth
    runs = {}
    for name in ("killed", "whole"):
        shutil.copytree(cfg0.run_dir, tmp_path / name / "cmnist", ignore=shutil.ignore_patterns("ray", "finetune", "wg", "logs"))
        runs[name] = TINY + tiny_gen(cfg0.generate.pipeline) + [f"output_dir={tmp_path / name}", "train.num_workers=2",
                                                               "finetune.epochs=6", "finetune.batch_size=8"]
    whole = finetune(load_config("cmnist", overrides=runs["whole"]), log=lambda *_: None)
    args = ["finetune", *[x for s in runs["killed"] for x in ("--set", s)]]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    jobs = tmp_path / "killed" / "cmnist" / "ray" / "cmnist-finetune-selective" / "job"
    _kill_after(_cli(args, env), lambda: jobs.is_dir() and list(jobs.glob("checkpoint_*")), "fine-tuning checkpoint")
    assert not (tmp_path / "killed" / "cmnist" / "finetune" / "selective" / "result.json").exists()
    proc = _cli(args, env)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    log = (tmp_path / "killed" / "cmnist" / "logs" / "workers.log").read_text()
    assert "resuming the interrupted run" in out and "resuming from checkpoint after epoch" in log, out[-2000:]
    resumed_at = int(log.split("resuming from checkpoint after epoch ")[-1].split()[0])
    assert 1 <= resumed_at < 6
    again = json.loads((tmp_path / "killed" / "cmnist" / "finetune" / "selective" / "result.json").read_text())
    keys = ("epoch", "train_loss", "val_acc", "val_wst")
    assert [{k: h[k] for k in keys} for h in again["history"]] == [{k: h[k] for k in keys} for h in whole["history"]]
    a, b = (load_file(f"{r}/model.safetensors") for r in (again["model_dir"], whole["model_dir"]))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


# The fine-tuning alone (quality=False): this test compares the training's history and weights, not the measurement
EGT_DRIVER = ("import sys; from aimfair_ray.config import load_config; from aimfair_ray.egt.run import train_generator; "
              "train_generator(load_config('cmnist', overrides=sys.argv[1:]), 'image', quality=False)")


@pytest.mark.faults
def test_the_driver_killed_during_an_egt_run_resumes_to_the_figures_of_an_uninterrupted_run(egt_image, ray_cluster,
                                                                                           tmp_path):
    """A driver running EGT fine-tuning (what `aimfair minmax image` runs after measuring the pretrained model)
    killed after its first registered checkpoint; the same driver again resumes from it (not from step 0)
    and ends with the history and group weights of the same run never stopped."""
    from conftest import egt_image_sets

    cfg0, whole = egt_image
    args = [sys.executable, "-c", EGT_DRIVER, *egt_image_sets(cfg0.egt.image.pipeline, tmp_path)]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)

    def driver():
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    run_path = tmp_path / "cmnist" / "ray" / "cmnist-egt-image-minmax-seed0"
    _kill_after(driver(), lambda: _registered(run_path), "EGT checkpoint")
    proc = driver()
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming the interrupted run" in out and "egt resuming from checkpoint after step" in out, out[-2000:]
    assert int(out.split("egt resuming from checkpoint after step ")[1].split()[0]) in (2, 4)
    again = json.loads((tmp_path / "cmnist" / "egt" / "image" / "minmax-seed0" / "result.json").read_text())
    assert again["steps"] == 4 and [h["step"] for h in again["history"]] == [2, 4]
    keys = ("step", "loss")
    assert [{k: h[k] for k in keys} for h in again["history"]] == [{k: h[k] for k in keys} for h in whole["history"]]
    assert again["group_weights"] == whole["group_weights"]
