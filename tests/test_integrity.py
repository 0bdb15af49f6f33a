"""Nothing lost, nothing mixed (issue 21): manifests, versioned publishing, synthetic-set fingerprints,
checkpoint hashes, and the faults that would break them (marked `faults`; they run in `make test`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

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
def test_an_output_on_s3_appears_whole_or_not_at_all_and_readers_cache_it_by_content(s3, tmp_path, monkeypatch):
    """The one store layer on a real S3 endpoint: a folder written through ``atomic_dir`` is staged on this node
    and uploaded only when its block succeeds, ``_COMPLETE`` last; a failed block leaves the previous output as it
    was; ``local_copy`` fetches a folder once per content into this node's cache."""
    from aimfair_ray import manifest
    from aimfair_ray.storage import COMPLETE, atomic_dir, exists, is_complete, listdir, local_copy, read_text

    monkeypatch.setenv("AIMFAIR_CACHE", str(tmp_path / "cache"))
    out = f"{s3}/{tmp_path.name}/stage"
    with atomic_dir(out) as tmp:
        assert not tmp.startswith("s3://")  # local file APIs work in the block
        os.makedirs(f"{tmp}/sub")
        open(f"{tmp}/a.txt", "w").write("one")
        open(f"{tmp}/sub/b.txt", "w").write("two")
        assert not exists(out)  # nothing visible before the block ends
    assert is_complete(out) and [p.rsplit("/", 1)[1] for p in listdir(out)] == [COMPLETE, "a.txt"]
    first = local_copy(out)
    assert open(f"{first}/sub/b.txt").read() == "two" and local_copy(out) == first  # fetched once
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out) as tmp:
            open(f"{tmp}/a.txt", "w").write("half")
            raise RuntimeError("boom")
    assert read_text(f"{out}/a.txt") == "one" and is_complete(out)  # the failed write left no trace
    with atomic_dir(out) as tmp:
        open(f"{tmp}/c.txt", "w").write("three")
    assert [p.rsplit("/", 1)[1] for p in listdir(out)] == [COMPLETE, "c.txt"]  # the old files went with the old output
    assert local_copy(out) != first and sorted(os.listdir(local_copy(out))) == [COMPLETE, "c.txt"]
    copies = []
    for _ in range(2):  # an output with a manifest is cached by it: the same files written again are the same copy
        with atomic_dir(out) as tmp:
            open(f"{tmp}/c.txt", "w").write("three")
            manifest.write(tmp)
        copies.append(local_copy(out))
    assert copies[0] == copies[1] == local_copy(f"{out}/")


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
def test_a_stage_rebuilt_on_s3_never_mixes_and_force_starts_fresh_on_s3(ray_cluster, s3, tmp_path):
    """A run on S3 (output_dir=s3://): a data stage rebuilt at another size has exactly its own rows (Ray Data's
    write tasks wrote the shards there); a trained model there is reused by the same config, and `--force` with
    Train storage on S3 trains from scratch."""
    from aimfair_ray.config import load_config
    from aimfair_ray.data.prepare import prepare_data
    from aimfair_ray.train.baseline import train_baseline

    sets = TINY + [f"output_dir={s3}/{tmp_path.name}", "train.num_workers=1", "train.epochs=1"]
    quiet = dict(log=lambda *_: None)
    for n in (400, 600):
        cfg = load_config("cmnist", overrides=sets + [f"data.n_train={n}"])
        prepare_data(cfg, **quiet)
    said = []
    meta = prepare_data(cfg, log=said.append)
    assert "data: reusing" in said[0] and cfg.data_dir.startswith("s3://")
    assert _rows(f"{cfg.data_dir}/train") == 600 == meta["splits"]["train"]["n"]
    assert _rows(f"{cfg.data_dir}/val") == meta["splits"]["val"]["n"]
    first = train_baseline(cfg, **quiet)
    assert first["run_path"].startswith("s3://")
    said = []  # the same config again: its key on the store matches, so the model there is reused
    assert train_baseline(cfg, log=said.append)["history"] == first["history"]
    assert any("train: reusing" in m for m in said), said
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


# A Train worker lost mid-epoch (its node killed) and resumed from its checkpoint: tests/test_share_nothing.py.
# The driver killed mid-run, resumed to the figures of the run never stopped: tests/test_share_nothing.py, on EGT's
# loop, which restores through the same distributed.restore_checkpoint/report_checkpoint as the classifier's (whose
# resume after a lost node, each epoch once, is tested there too).
