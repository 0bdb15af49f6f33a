from pathlib import Path

import numpy as np
import pytest

from aimfair_ray import AimfairError
from aimfair_ray.config import load_config
from aimfair_ray.data.io import read_split
from aimfair_ray.generate.prompts import check_prompt, generate_prompts

PROMPT_COLUMNS = ["id", "cell", "target", "group", "prompt", "backend", "seed"]


def test_prompt_check():
    task = load_config().generate.task
    assert check_prompt("a red seven on black", task, 1, 0) is None
    assert check_prompt("the number 3 in green ink", task, 0, 1) is None
    assert check_prompt("a red seven", task, 0, 0) == "class missing"
    assert check_prompt("a seven in blue", task, 1, 0) == "group missing"
    assert check_prompt("a red seven next to a two", task, 1, 0) == "other class"
    assert check_prompt("a red and green seven", task, 1, 0) == "other group"
    assert check_prompt("someone drew a red 5-dollar note", task, 0, 0) == "class missing"  # word boundaries


def test_template_prompts(ray_cluster):
    cfg = load_config("cmnist", overrides=["generate.backend=template", "generate.prompts_per_cell=6"])
    table, report = generate_prompts(cfg.generate, log=lambda *_: None)
    assert list(table.columns) == PROMPT_COLUMNS
    assert table.groupby("cell").size().to_dict() == {c: 6 for c in ("y0_s0", "y0_s1", "y1_s0", "y1_s1")}
    assert table["prompt"].str.lower().is_unique and set(table["backend"]) == {"template"}
    assert all(check_prompt(r.prompt, cfg.generate.task, r.target, r.group) is None for r in table.itertuples())
    again, _ = generate_prompts(cfg.generate, log=lambda *_: None)
    assert again["prompt"].tolist() == table["prompt"].tolist()  # deterministic by seed


def test_transformers_prompts_with_bundled_smollm2(ray_cluster):
    cfg = load_config("cmnist", overrides=["generate.backend=transformers", "generate.prompts_per_cell=2",
                                           "generate.llm_batch_size=8", "generate.max_new_tokens=28"])
    table, report = generate_prompts(cfg.generate, log=lambda *_: None)
    assert list(table.columns) == PROMPT_COLUMNS and set(table["backend"]) == {"transformers"}
    assert report["per_cell"] == {"y0_s0": 2, "y0_s1": 2, "y1_s0": 2, "y1_s1": 2}, report
    assert all(check_prompt(r.prompt, cfg.generate.task, r.target, r.group) is None for r in table.itertuples())
    assert table["prompt"].str.lower().is_unique


def test_vllm_without_vllm_names_the_extra(ray_cluster):
    cfg = load_config("cmnist", overrides=["generate.backend=vllm", "generate.prompts_per_cell=1"])
    with pytest.raises(AimfairError, match=r"aimfair-ray\[gpu\]"):
        generate_prompts(cfg.generate, log=lambda *_: None)


# The kill-and-resume of `aimfair generate` (and the sets' schema, counts and determinism across
# processes) is tested once, on the faces path: tests/test_faces.py.


def test_shard_commit_is_whole_and_idempotent(tmp_path):
    """Plain pyarrow, no Ray: a batch is committed by rename; writing it again (a retried task)
    replaces its own shard, so its ids never appear twice."""
    import pandas as pd

    from aimfair_ray.data.codecs import encode_png
    from aimfair_ray.generate.images import write_shard, written_ids

    png = encode_png(np.zeros((8, 8, 3), np.uint8))
    batch = pd.DataFrame({"id": ["b-0", "b-1"], "image": [png, png], "target": [0, 1], "group": [1, 0],
                          "split": "balanced", "source": "synthetic", "prompt": ["p", "q"], "generator": "{}"})
    first = write_shard(batch, str(tmp_path))
    assert write_shard(batch, str(tmp_path)) == first
    assert write_shard(batch.assign(id=["b-2", "b-3"]), str(tmp_path)) != first
    assert len(list(tmp_path.glob("shard-*.parquet"))) == 2 and not list(tmp_path.glob("*.tmp"))
    assert sorted(written_ids(str(tmp_path)).to_pylist()) == ["b-0", "b-1", "b-2", "b-3"]


def test_filter_keeps_faithful_images_and_reports_per_cell(cmnist_run):
    """Real Colored MNIST digits relabelled as synthetic: correct labels are kept, flipped ones dropped."""
    from aimfair_ray.data.io import make_table
    from aimfair_ray.generate.stage import run_filter

    cfg = cmnist_run  # its checker is trained already (the quality bar shares it)
    test = read_split(f"{cfg.data_dir}/test").to_pandas().sample(80, random_state=0).reset_index(drop=True)
    flip = np.arange(len(test)) % 4 == 0  # a quarter get the wrong group label
    out = Path(cfg.paths.synthetic_set("balanced"))
    out.mkdir(parents=True)
    groups = np.where(flip, 1 - test["group"], test["group"])
    t = make_table({"id": test["id"].tolist(), "image": test["image"].tolist(), "target": test["target"].tolist(),
                    "group": groups.tolist(), "split": ["balanced"] * len(test), "source": ["synthetic"] * len(test),
                    "prompt": ["p"] * len(test)})
    import pyarrow.parquet as pq_

    pq_.write_table(t, out / "shard-test.parquet")
    (out / "_COMPLETE").touch()  # a finished set, as generation leaves it
    rep = run_filter(cfg, sets=("balanced",), log=lambda *_: None)["balanced"]
    assert rep["total"] == 80 and 0.6 * 60 <= rep["kept"] <= 60  # flipped ones never pass the colour check
    assert set(rep["per_cell"]) == {"y0_s0", "y0_s1", "y1_s0", "y1_s1"}
    assert all(0 <= v["kept_fraction"] <= 1 for v in rep["per_cell"].values())
    kept = read_split(cfg.paths.synthetic_set("balanced", filtered=True)).to_pandas()
    assert len(kept) == rep["kept"] and not set(kept["id"]) & set(test["id"][flip])
    assert (Path(cfg.run_dir) / "checker" / "checker.safetensors").is_file()
