import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aimfair_ray import AimfairError
from aimfair_ray.config import load_config
from aimfair_ray.data import cmnist
from aimfair_ray.data.bias import cell_counts, draw_biased_subset
from aimfair_ray.data.codecs import decode_png
from aimfair_ray.data.io import SCHEMA, make_table, read_split, write_split
from aimfair_ray.data.prepare import prepare_data
from aimfair_ray.data.readers import read_celeba, read_manifest, read_utkface

ATTRS = ["5_o_Clock_Shadow", "Male", "Smiling", "Young"]


# ---- the bias protocol ------------------------------------------------------------------------
def test_bias_one_ninth_is_5_45_45_5():
    c = cell_counts(1000, 2, 2, 1 / 9)
    assert c.tolist() == [[50, 450], [450, 50]]
    assert cell_counts(1001, 2, 3, 0.2).sum() == 1001


def test_biased_draw_is_deterministic_and_reports_counts():
    rng = np.random.default_rng(0)
    t, g = rng.integers(0, 2, 5000), rng.integers(0, 2, 5000)
    a, ca = draw_biased_subset(t, g, 1000, 1 / 9, seed=3)
    b, _ = draw_biased_subset(t, g, 1000, 1 / 9, seed=3)
    c, _ = draw_biased_subset(t, g, 1000, 1 / 9, seed=4)
    assert (a == b).all() and not (a == c).all() and len(set(a)) == 1000
    assert ca.tolist() == [[50, 450], [450, 50]]
    assert np.sum((t[a] == 0) & (g[a] == 0)) == 50
    with pytest.raises(AimfairError, match=r"cell \(y=0, s=1\) needs .* lower data.n_train"):
        draw_biased_subset(t, g, 4000, 1 / 9, seed=0)
    idx, cmax = draw_biased_subset(t, g, None, 1 / 9, seed=0)  # null: the largest draw that fits
    assert len(idx) == cmax.sum() > 2000


# ---- Colored MNIST ----------------------------------------------------------------------------
def test_colored_mnist_splits(tiny_cfg):
    out = cmnist.build(tiny_cfg.data)
    t = out["tables"]
    assert {k: v.num_rows for k, v in t.items()} == {"train": 400, "val": 100, "test": 200, "generator": 40}
    assert out["cell_counts"]["train"] == {"y0_s0": 20, "y0_s1": 180, "y1_s0": 180, "y1_s1": 20}
    assert set(out["cell_counts"]["test"].values()) == {50}
    ids = [set(t[s]["id"].to_pylist()) for s in t]
    assert sum(len(i) for i in ids) == len(set().union(*ids))  # disjoint splits of distinct digits
    assert t["train"].schema.equals(SCHEMA)
    img = decode_png(t["test"]["image"][0].as_py())
    assert img.shape == (32, 32, 3)
    # the stroke colour follows the group: red is R-dominant, green G-dominant
    for row in t["test"].slice(0, 20).to_pylist():
        im = decode_png(row["image"]).reshape(-1, 3).astype(int)
        stroke = im[im.sum(1) > 200].mean(0)
        assert (stroke[0] > stroke[1]) == (row["group"] == 0)
    # deterministic by seed
    again = cmnist.build(tiny_cfg.data)
    assert again["tables"]["train"]["id"].to_pylist() == t["train"]["id"].to_pylist()


def test_a_paired_test_split_holds_each_digit_in_every_colour(tiny_cfg):
    """data.paired_test: a class's cells hold the same digits, coloured each way, so a gap between them is the
    colour's alone; the other splits' digits stay disjoint from them."""
    cfg = tiny_cfg.data.model_copy(update={"paired_test": True, "n_test_per_cell": 60})
    t = cmnist.build(cfg)["tables"]
    test = t["test"].to_pandas()
    assert len(test) == 240 and test.groupby(["target", "group"]).size().eq(60).all()
    test["digit"] = test["id"].str.rsplit("-", n=1).str[0]
    for y in (0, 1):
        cells = [set(test[(test.target == y) & (test.group == s)]["digit"]) for s in (0, 1)]
        assert cells[0] == cells[1] and len(cells[0]) == 60
    # the same strokes: one digit's two images differ in colour alone
    a, b = (decode_png(test[(test.digit == test.digit[0]) & (test.group == s)]["image"].iloc[0]).astype(float)
            for s in (0, 1))
    assert ((a.max(2) > 0) == (b.max(2) > 0)).all() and (a.argmax(2)[a.max(2) > 60] == 0).all()
    others = set().union(*(set(t[s]["id"].to_pylist()) for s in ("train", "val", "generator")))
    assert not others & set(test["digit"])  # no test digit in another split
    assert test["id"].is_unique


# ---- real-format readers ----------------------------------------------------------------------
def _img(path, color=(120, 60, 30), size=(20, 24)):
    Image.new("RGB", size, color).save(path)


def make_celeba(root, n=12):
    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    vals = rng.choice([-1, 1], size=(n, len(ATTRS)))
    lines = [str(n), " ".join(ATTRS)]
    parts = []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        _img(root / "img_align_celeba" / name, color=(10 * i, 100, 200))
        lines.append(name + "  " + " ".join(f"{v:2d}" for v in vals[i]))
        parts.append(f"{name} {i % 3}")
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return vals


def test_celeba_reader_labels(tmp_path):
    vals = make_celeba(tmp_path)
    lab = read_celeba(str(tmp_path), "Smiling", "Male")
    df = lab.frame
    assert df["target"].tolist() == (vals[:, 2] > 0).astype(int).tolist()
    assert df["group"].tolist() == (vals[:, 1] > 0).astype(int).tolist()
    assert df["split"].tolist() == [["train", "val", "test"][i % 3] for i in range(12)]
    assert lab.target_names == ["not Smiling", "Smiling"]


def test_celeba_wrong_attribute_lists_available(tmp_path):
    make_celeba(tmp_path)
    with pytest.raises(AimfairError) as e:
        read_celeba(str(tmp_path), "Smilling", "Male")
    assert "Smilling" in str(e.value) and "available attributes: 5_o_Clock_Shadow, Male, Smiling, Young" in str(e.value)


def test_utkface_reader_labels(tmp_path):
    names = ["25_0_2_20170116174525125.jpg", "61_1_0_20170109150557335.jpg.chip.jpg",
             "8_1_4_20170103200943718.jpg", "33_0_1_20170117134712321.jpg", "badname.jpg"]
    for n in names:
        _img(tmp_path / n)
    lab = read_utkface(str(tmp_path), "gender", "age_bin", [20, 40, 60])
    df = lab.frame.set_index("id")
    assert df.loc[names[0], "target"] == 0 and df.loc[names[0], "group"] == 1
    assert df.loc[names[1], "target"] == 1 and df.loc[names[1], "group"] == 3
    assert df.loc[names[2], "group"] == 0
    assert lab.group_names == ["0-19", "20-39", "40-59", "60+"]
    assert lab.skipped == [str(tmp_path / "badname.jpg")]
    race = read_utkface(str(tmp_path), "race", "gender", [20, 40, 60]).frame.set_index("id")
    assert race.loc[names[2], "target"] == 4 and race.loc[names[3], "target"] == 1
    with pytest.raises(AimfairError, match="available attributes: gender, race, race_white, age_bin"):
        read_utkface(str(tmp_path), "age", "gender", [20])


def test_manifest_reader(tmp_path):
    for i in range(4):
        _img(tmp_path / f"{i}.png")
    pd.DataFrame({"path": [f"{i}.png" for i in range(4)], "target": ["cat", "dog", "cat", "dog"],
                  "group": [0, 1, 1, 0]}).to_csv(tmp_path / "m.csv", index=False)
    lab = read_manifest(str(tmp_path / "m.csv"))
    assert lab.target_names == ["cat", "dog"] and lab.frame["target"].tolist() == [0, 1, 0, 1]
    assert lab.frame["path"][0] == str(tmp_path / "0.png")
    pd.DataFrame({"file": ["0.png"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(AimfairError, match="missing columns"):
        read_manifest(str(tmp_path / "bad.csv"))


# ---- Parquet through Ray Data -------------------------------------------------------------------
def test_parquet_roundtrip_atomic(ray_cluster, tmp_path):
    t = make_table({"id": ["a", "b"], "image": [b"x", b"y"], "target": [0, 1], "group": [1, 0],
                    "split": ["train"] * 2, "source": ["synthetic"] * 2, "prompt": ["p", None]})
    d = str(tmp_path / "split")
    write_split(t, d, "a test")
    back = read_split(d).to_pandas().sort_values("id")
    assert back["prompt"].iloc[0] == "p" and pd.isna(back["prompt"].iloc[1]) and back["source"].tolist() == ["synthetic"] * 2
    assert [p.name for p in tmp_path.iterdir()] == ["split"]  # no temporary leftovers
    (tmp_path / "split" / "_COMPLETE").unlink()
    with pytest.raises(AimfairError, match="incomplete"):
        read_split(d)
    with pytest.raises(AimfairError, match="run `aimfair data prepare`"):
        read_split(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="source"):
        make_table({"id": ["a"], "image": [b""], "target": [0], "group": [0], "split": ["x"], "source": ["fake"]})


def _manifest(tmp_path, n=16):
    rows = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        _img(p, color=(i * 10, 0, 0))
        rows.append({"path": p.name, "target": i % 2, "group": (i // 2) % 2, "split": ["train", "val", "test", "train"][i % 4]})
    m = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(m, index=False)
    return m, rows


def test_prepare_manifest_end_to_end(ray_cluster, tmp_path):
    m, _ = _manifest(tmp_path)
    cfg = load_config("cmnist", overrides=[f"output_dir={tmp_path / 'runs'}", "data.dataset=manifest",
                                           f"data.root={m}", "data.bias=null", "data.image_size=16", "name=man"])
    meta = prepare_data(cfg, log=lambda *_: None)
    assert meta["splits"]["train"]["n"] == 8 and meta["splits"]["test"]["n"] == 4
    df = read_split(f"{cfg.data_dir}/train").to_pandas()
    assert decode_png(df["image"][0]).shape == (16, 16, 3) and set(df["source"]) == {"real"}
    assert (tmp_path / "runs" / "man" / "data" / "config.yaml").is_file()


def test_missing_and_corrupt_images_reported_by_path(ray_cluster, tmp_path):
    m, rows = _manifest(tmp_path)
    base = [f"output_dir={tmp_path / 'runs'}", "data.dataset=manifest", f"data.root={m}", "data.bias=null"]
    (tmp_path / "img3.png").unlink()
    with pytest.raises(AimfairError) as e:
        prepare_data(load_config("cmnist", overrides=base), log=lambda *_: None)
    assert "1 image files are missing" in str(e.value) and str(tmp_path / "img3.png") in str(e.value)
    _img(tmp_path / "img3.png")
    (tmp_path / "img4.png").write_bytes(b"not a png at all")  # a train row
    with pytest.raises(AimfairError) as e:
        prepare_data(load_config("cmnist", overrides=base), log=lambda *_: None)
    assert "corrupt or unreadable image" in str(e.value) and str(tmp_path / "img4.png") in str(e.value)
    cfg = load_config("cmnist", overrides=base + ["data.skip_bad_images=true"])
    meta = prepare_data(cfg, log=lambda *_: None)
    assert read_split(f"{cfg.data_dir}/train").count() == meta["splits"]["train"]["n"] == 7  # 8 train rows, 1 bad


# ---- the dataset registry ---------------------------------------------------------------------
def test_a_registered_dataset_is_all_that_config_generate_and_the_filter_ask():
    """One registry entry per dataset: config validation and its one-line list of datasets, the prompt task that
    fills generate.task, the filter's default checker (refused in one line where none fits), the reader."""
    from aimfair_ray.config import TaskConfig
    from aimfair_ray.data.datasets import DATASETS, Dataset, default_checker, read_dataset, register
    from aimfair_ray.data.readers import Labeled
    from aimfair_ray.generate.stage import checker_name

    with pytest.raises(AimfairError, match="unknown dataset 'imagenet'; choose one of 'colored_mnist', 'celeba'"):
        load_config("cmnist", overrides=["data.dataset=imagenet"])
    assert checker_name(load_config("cmnist")) == "digits"
    assert default_checker(load_config("celeba").data) == "gender"  # Smiling / Male
    for preset, sets in (("celeba", ["data.sensitive=Young"]), ("celeba", ["data.dataset=manifest"])):
        d = load_config(preset, overrides=sets).data
        with pytest.raises(AimfairError, match="generate.filter has no checker for .*generate.checker=clip"):
            default_checker(d)
    with pytest.raises(AimfairError, match="colored_mnist needs at least 2 colors"):
        load_config("cmnist", overrides=["data.colors=[[1,2,3]]"])

    task = TaskConfig(subject="a leaf", classes=[{"name": "healthy", "phrases": ["healthy"]},
                                                 {"name": "sick", "phrases": ["sick"]}],
                      groups=[{"name": "sun", "phrases": ["sunlit"]}, {"name": "shade", "phrases": ["shaded"]}])
    frame = pd.DataFrame({"id": ["a"], "path": ["/x.png"], "target": [0], "group": [1]})
    register(Dataset("leaves", "a test's leaves", task=lambda d: task, checker=lambda d: None,
                     read=lambda d: Labeled(frame, ["healthy", "sick"], ["sun", "shade"])))
    try:
        cfg = load_config("celeba", overrides=["data.dataset=leaves", "data.target=sick", "data.sensitive=shade",
                                               "data.root=/nowhere"])
        assert cfg.generate.task.subject == "a leaf" and [c.name for c in cfg.generate.task.classes] == ["healthy", "sick"]
        assert read_dataset(cfg.data).frame.equals(frame)
        with pytest.raises(AimfairError, match="no checker for leaves"):
            checker_name(cfg)
        assert checker_name(load_config("celeba", overrides=["data.dataset=leaves", "generate.checker=clip"])) == "clip"
    finally:
        DATASETS.pop("leaves")
