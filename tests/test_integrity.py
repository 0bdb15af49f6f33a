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


def test_a_disk_full_while_writing_is_one_line_and_the_previous_output_stays(tmp_path):
    from aimfair_ray.storage import atomic_dir, atomic_write_bytes

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        d = mnt / "model"
        with atomic_dir(str(d)) as tmp:
            os.makedirs(tmp)
            (open(f"{tmp}/model.safetensors", "wb")).write(b"old" * 1000)
        with pytest.raises(AimfairError, match=r"no space left on the device writing .*/model: free some space") as e:
            with atomic_dir(str(d)) as tmp:
                os.makedirs(tmp)
                with open(f"{tmp}/model.safetensors", "wb") as f:
                    f.write(os.urandom(1 << 20))
        assert "\n" not in str(e.value)
        assert (d / "model.safetensors").read_bytes() == b"old" * 1000 and (d / "_COMPLETE").is_file()
        assert [p.name for p in mnt.iterdir()] == ["model"]  # no half-written copy left
        atomic_write_bytes(str(mnt / "a.json"), b"{}")
        with pytest.raises(AimfairError, match="no space left"):
            atomic_write_bytes(str(mnt / "a.json"), os.urandom(1 << 20))
        assert (mnt / "a.json").read_bytes() == b"{}"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
