"""Your own data: a CelebA-format folder the project has never seen (sorted by class, the other
majority pairing), a UTKFace folder and a manifest of your own synthetic images; global shuffles,
the majority from the data, imports, one selection rule, cell sizes in the audit, reproducibility."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from aimfair_ray import AimfairError
from aimfair_ray.cli import app
from aimfair_ray.config import load_config
from aimfair_ray.data.io import read_table

ATTRS = ["Male", "Smiling", "Young"]
QUIET = dict(log=lambda *_: None)


def _face(rng, target: int, group: int, tint: int = 0) -> Image.Image:
    """A learnable stand-in for a face: the target is the red level, the group the blue level."""
    a = rng.integers(0, 60, size=(20, 20, 3))
    a[..., 0] += 40 + 150 * target
    a[..., 2] += 40 + 120 * group
    a[..., 1] += tint
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_sorted_celeba(root, per_class: int = 300, majority_share: float = 0.8) -> dict:
    """CelebA files whose attribute list is sorted by class (Smiling), and whose majority group in each
    class is the reverse of the embedded benchmark's: class 0 mostly group 0 (not Male), class 1 mostly Male."""
    rng = np.random.default_rng(0)
    (root / "img_align_celeba").mkdir(parents=True)
    lines, parts, labels = [], [], []
    for y in (0, 1):
        for i in range(per_class):
            g = y if i < majority_share * per_class else 1 - y
            name = f"{len(labels) + 1:06d}.jpg"
            _face(rng, y, g).save(root / "img_align_celeba" / name, quality=95)
            vals = {"Male": g, "Smiling": y, "Young": int(rng.integers(0, 2))}
            lines.append(name + "  " + " ".join(f"{1 if vals[a] else -1:2d}" for a in ATTRS))
            k = len(labels) % 10
            parts.append(f"{name} {0 if k < 8 else 1 if k == 8 else 2}")
            labels.append((y, g))
    (root / "list_attr_celeba.txt").write_text(f"{len(labels)}\n{' '.join(ATTRS)}\n" + "\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return {"labels": labels}


def make_manifest(root, counts: dict, name: str = "manifest.csv", seed: int = 1) -> str:
    """Your own synthetic images (a slight green tint: another domain) and their manifest, labelled by
    the real data's names; ``counts``: {(target, group): n}."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for (y, g), n in counts.items():
        for i in range(n):
            rel = f"images/{name.split('.')[0]}-{y}{g}-{i}.png"
            _face(rng, y, g, tint=30).save(root / rel)
            rows.append({"path": rel, "target": ["not Smiling", "Smiling"][y], "group": ["not Male", "Male"][g],
                         "prompt": f"a photo, smiling={y}, male={g}"})
    pd.DataFrame(rows).sample(frac=1, random_state=seed).to_csv(root / name, index=False)
    return str(root / name)


# ---- plain (no Ray) ------------------------------------------------------------------------------
def test_epoch_rows_shuffle_the_whole_split_every_epoch_without_drops():
    from aimfair_ray.data.feed import epoch_rows

    n, world = 11, 2
    for epoch in (0, 1):
        parts = [epoch_rows(n, world, r, seed=3, epoch=epoch) for r in range(world)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(n))  # every row once, none dropped
        padded = [epoch_rows(n, world, r, seed=3, epoch=epoch, pad=True) for r in range(world)]
        assert len(padded[0]) == len(padded[1]) == 6 and set(np.concatenate(padded)) == set(range(n))
    # rows sorted by class (first half 0, second half 1): each worker gets both classes
    assert all(0 < (epoch_rows(100, 2, r, seed=0) < 50).sum() < 50 for r in range(2))
    assert not np.array_equal(epoch_rows(n, 1, 0, 3, 0), epoch_rows(n, 1, 0, 3, 1))  # a new order each epoch
    assert np.array_equal(epoch_rows(n, 1, 0, 3, 1), epoch_rows(n, 1, 0, 3, 1))     # the same on a rerun
    assert epoch_rows(n, 2, 1, None).tolist() == list(range(1, n, 2))                 # no seed: file order


def test_majority_from_the_data_reversed_pairing():
    from aimfair_ray.data.bias import draw_biased_subset, majority_groups, resolve_majority

    t = np.array([0] * 80 + [1] * 80)
    g = np.array([0] * 64 + [1] * 16 + [1] * 64 + [0] * 16)  # class 0 mostly group 0: the reverse of (y+1) % 2
    assert majority_groups(t, g, 2, 2) == [0, 1]
    with pytest.raises(AimfairError, match="at most"):  # the convention's pairing does not fit this pool
        draw_biased_subset(t, g, 100, 1 / 9, 0, 2, 2)
    idx, counts = draw_biased_subset(t, g, 100, 1 / 9, 0, 2, 2, resolve_majority("auto", t, g, 2, 2))
    assert counts.tolist() == [[45, 5], [5, 45]] and len(set(idx)) == 100
    assert resolve_majority([1, 0], t, g, 2, 2) == [1, 0]
    with pytest.raises(AimfairError, match="one group index"):
        resolve_majority([0, 5], t, g, 2, 2)
    assert majority_groups([], [], 2, 2) == [1, 0]  # nothing to read (Colored MNIST): the convention


def test_utkface_preset_white_vs_rest_and_laptop_layer(tmp_path):
    from aimfair_ray.data.readers import read_utkface

    for n in ["25_0_0_20170116174525125.jpg", "61_1_2_20170109150557335.jpg", "8_1_4_20170103200943718.jpg"]:
        Image.new("RGB", (8, 8)).save(tmp_path / n)
    cfg = load_config("utkface", ["laptop"], [f"data.root={tmp_path}"])
    got = (cfg.data.target, cfg.data.sensitive, cfg.train.use_gpu, cfg.data.image_size)
    assert got == ("gender", "race_white", False, 64)
    lab = read_utkface(str(tmp_path), cfg.data.target, cfg.data.sensitive, cfg.data.age_bins)
    assert lab.group_names == ["non-White", "White"] and lab.frame.sort_values("id")["group"].tolist() == [1, 0, 0]
    five = read_utkface(str(tmp_path), "gender", "race", [20])
    assert len(five.group_names) == 5
    celeba = load_config("celeba", ["laptop"], ["data.root=/data/celeba"])
    assert celeba.train.num_workers == 2 and not celeba.train.use_gpu and celeba.data.majority == "auto"


def test_refusals_are_one_line(tmp_path):
    from aimfair_ray.generate.stage import check_task

    with pytest.raises(AimfairError, match="share > 0 for each of train, val and test"):
        load_config("cmnist", overrides=["data.split_fractions=[1, 0, 0]"])
    cfg = load_config("celeba", ["cpu"], ["data.dataset=manifest", f"data.root={tmp_path}/m.csv", f"output_dir={tmp_path}"])
    with pytest.raises(AimfairError, match="no classes or groups for the manifest data.*import-synthetic"):
        check_task(cfg)  # a manifest's classes are the user's to phrase
    with pytest.raises(AimfairError, match="no face phrasing for celeba attribute 'Attractive'.*set generate.task"):
        check_task(load_config("celeba", overrides=["data.target=Attractive"]))  # loads: only generation needs it
    from aimfair_ray.data.datasets import read_dataset

    with pytest.raises(AimfairError, match=r"needs data.root.*--set data.root=/data/celeba"):
        read_dataset(load_config("celeba").data)
    with pytest.raises(AimfairError, match="neither one of auto, balanced"):
        load_config("cmnist", overrides=["finetune.synthetic=balanced_filterd"])


def test_synthetic_manifest_names_must_match_the_real_data(tmp_path):
    from aimfair_ray.data.synthetic import read_synthetic_manifest

    m = make_manifest(tmp_path, {(0, 0): 2, (1, 1): 2})
    df = read_synthetic_manifest(m, ["not Smiling", "Smiling"], ["not Male", "Male"])
    assert sorted(zip(df["target"], df["group"])) == [(0, 0), (0, 0), (1, 1), (1, 1)]
    assert all(i.startswith("syn-") for i in df["id"]) and df["prompt"].notna().all()
    with pytest.raises(AimfairError, match=r"names \['Male', 'not Male'\] are not the real data's groups"):
        read_synthetic_manifest(m, ["not Smiling", "Smiling"], ["female", "male"])


def test_audit_shows_cell_sizes_warns_on_small_cells_and_keeps_zero_bars_visible():
    from rich.console import Console

    from aimfair_ray.evaluate import WORST, group_acc_chart, small_cells, table
    from aimfair_ray.metrics import fairness_report

    y = np.array([0] * 50 + [0] * 40 + [1] * 40 + [1] * 8)
    s = np.array([0] * 50 + [1] * 40 + [0] * 40 + [1] * 8)
    p = y.copy()
    p[-8:] = 0  # the 8-image cell (y1, s1) is all wrong: WST 0 from 8 images
    rep = fairness_report(y, p, s, 2, 2)
    assert rep["cell_counts"] == {"y0_s0": 50, "y0_s1": 40, "y1_s0": 40, "y1_s1": 8} and rep["wst"] == 0.0
    warn = small_cells(rep, 30)
    assert warn == ["cell y1_s1 has 8 test images (< audit.min_cell 30): its accuracy, which decides WST, is noise"]
    rep.update(min_cell=30, warnings=warn, target_names=["no", "yes"], group_names=["a", "b"])
    out = Console(width=250, record=True)
    out.print(table({"m": rep}))
    text = out.export_text()
    assert "0.0000 (8!)" in text and "1.0000 (50)" in text and "decides WST" in text
    png = np.asarray(Image.open(io.BytesIO(group_acc_chart(rep, "t", 30))).convert("RGB")).astype(int)
    red = np.array([int(WORST[i:i + 2], 16) for i in (1, 3, 5)])
    assert (np.abs(png - red).sum(-1) < 30).sum() > 40  # the zero bar's red sliver and its worst-cell marker


def test_selection_rule_is_labelled():
    from aimfair_ray.benchmark import selection_rule, to_markdown

    assert selection_rule("val_acc") == "the best val_acc on val (no group labels)"
    assert "uses group labels" in to_markdown({}, [0], "t", "val_wst")


# ---- on the session's Ray cluster ------------------------------------------------------------------
TINY_FACES = ["data.image_size=16", "model.backbone=small_cnn", "model.width=8", "train.epochs=3",
              "train.batch_size=16", "train.num_workers=2", "finetune.epochs=1", "finetune.batch_size=16",
              "audit.batch_size=64"]


def test_file_sorted_by_class_two_workers_learn_both_classes(ray_cluster, tmp_path):
    from aimfair_ray.data.prepare import prepare_data
    from aimfair_ray.train.baseline import train_baseline

    make_sorted_celeba(tmp_path / "celeba", per_class=150)
    cfg = load_config("celeba", ["cpu"], TINY_FACES + [f"data.root={tmp_path / 'celeba'}", f"output_dir={tmp_path}",
                                                       "data.bias=null", "name=sorted"])
    prepare_data(cfg, **QUIET)
    train = pd.read_parquet(cfg.paths.split("train"), columns=["target"])["target"].tolist()
    assert train == sorted(train)  # the split keeps the file's order: only the training shuffle mixes it
    res = train_baseline(cfg, **QUIET)
    assert res["select_metric"] == "val_acc"
    # The old per-worker halves gave each worker one class: val accuracy stayed at the majority share (0.5 here).
    assert res["best"]["val_acc"] >= 0.85, res["history"]


def _cli(args: list[str]):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def own_data(ray_cluster, s3, tmp_path_factory):
    """A user's CelebA-format folder and two manifests of their own synthetic images, on this disk and on S3."""
    from aimfair_ray.storage import upload_dir

    root = tmp_path_factory.mktemp("own")
    make_sorted_celeba(root / "celeba")
    syn = root / "mysyn"
    balanced = make_manifest(syn, {(y, g): 10 for y in (0, 1) for g in (0, 1)}, "balanced.csv", seed=1)
    imbalanced = make_manifest(syn, {(0, 0): 9, (0, 1): 1, (1, 0): 2, (1, 1): 9}, "imbalanced.csv", seed=2)  # 21: odd
    store = f"{s3}/{root.name}"
    upload_dir(str(root), store)
    return root, balanced, imbalanced, store


def test_your_own_celeba_and_synthetic_images_end_to_end(own_data):
    """The user's commands in order, their data and images on S3 (`data.root=s3://...`: the driver reads the label
    files, Ray Data's tasks the images); then the manifests on this disk given directly to another run: the same
    rows as the imported sets."""
    root, balanced, imbalanced, store = own_data
    base = TINY_FACES + [f"data.root={store}/celeba", "data.n_train=300", "data.n_val=40", f"output_dir={root / 'runs'}"]
    sets = base + ["name=first"]
    run1 = ["--preset", "celeba", "--config", "cpu"] + [a for s in sets for a in ("--set", s)]
    out = _cli(["data", "prepare", *run1])
    meta = json.loads((root / "runs/first/data/dataset.json").read_text())
    assert meta["majority"] == [0, 1] and meta["splits"]["train"]["cell_counts"] == \
        {"y0_s0": 135, "y0_s1": 15, "y1_s0": 15, "y1_s1": 135}, out
    _cli(["train", "baseline", *run1])
    _cli(["data", "import-synthetic", f"{store}/mysyn/balanced.csv", "--as", "balanced", "--generator", "my-sdxl", *run1])
    _cli(["data", "import-synthetic", f"{store}/mysyn/imbalanced.csv", "--as", "imbalanced", "--generator", "my-sdxl",
          *run1])
    out = _cli(["finetune", "--method", "selective", *run1])
    assert "(n)" in out and "!)" in out and "audit.min_cell 30" in out  # cell sizes and the small-cell warning
    _cli(["audit", *run1])

    first = root / "runs/first"
    assert json.loads((first / "synthetic/balanced/import.json").read_text())["key"]["manifest"] == \
        f"{store}/mysyn/balanced.csv"
    syn_rows = read_table(str(first / "synthetic/balanced")).to_pandas()
    assert len(syn_rows) == 40 and set(syn_rows["source"]) == {"synthetic"} and syn_rows["prompt"].notna().all()
    model = json.loads((first / "finetune/selective/model/model.json").read_text())
    assert model["provenance"]["generator"] == "my-sdxl" and model["provenance"]["synthetic_share"] == 1.0
    result = json.loads((first / "finetune/selective/result.json").read_text())
    assert result["select_metric"] == "val_acc"
    scores = json.loads((first / "finetune/scores/scores.json").read_text())
    assert scores["counts"] == {"rb": 300, "sb": 21, "su": 40}  # every row scored, also an odd count on 2 workers
    # the benchmark's step: the imported sets exist, so nothing is generated (the digit task would refuse celeba)
    from aimfair_ray.pipeline import ensure_synthetic

    msgs = []
    ensure_synthetic(load_config("celeba", ["cpu"], sets), log=msgs.append)
    assert msgs and "using the synthetic sets that exist" in msgs[0], msgs
    # a manifest whose group names are not the data's: one line, exit 2
    bad = pd.read_csv(balanced).assign(group="female")
    bad.to_csv(root / "mysyn" / "bad.csv", index=False)
    res = CliRunner().invoke(app, ["data", "import-synthetic", str(root / "mysyn" / "bad.csv"), "--as", "balanced",
                                   *run1])
    assert res.exit_code == 2 and "not the real data's groups ['not Male', 'Male']" in res.output, res.output

    # The manifests given directly (finetune.synthetic=FILE): fine-tuning reads them imported into the run, the
    # same rows that `data import-synthetic` made in run 1, so the same config and seed give the same figures (a
    # run's figures repeat from the same rows: the worker-group and reuse tests).
    from aimfair_ray.train.finetune import synthetic_dir

    second = root / "runs/second"
    shutil.copytree(first / "data", second / "data")
    run2 = base + ["name=second", f"finetune.synthetic={balanced}", f"finetune.synthetic_imbalanced={imbalanced}"]
    cfg2 = load_config("celeba", ["cpu"], run2)
    cols = ["id", "image", "target", "group", "prompt"]
    for balance in ("balanced", "imbalanced"):
        given = read_table(synthetic_dir(cfg2, balance, log=lambda *_: None), cols).to_pandas().sort_values("id")
        imported = read_table(str(first / "synthetic" / balance), cols).to_pandas().sort_values("id")
        assert given.reset_index(drop=True).equals(imported.reset_index(drop=True)), balance
    gen = json.loads(read_table(str(next((second / "synthetic").glob("import-balanced-*"))))["generator"][0].as_py())
    assert gen["pipeline"] == "manifest:balanced.csv"
