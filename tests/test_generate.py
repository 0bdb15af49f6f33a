import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import TINY, tiny_gen

from aimfair_ray import AimfairError
from aimfair_ray.config import load_config
from aimfair_ray.data.codecs import decode_png
from aimfair_ray.data.io import SCHEMA, read_split
from aimfair_ray.generate.prompts import check_prompt, generate_prompts
from aimfair_ray.generate.stage import run_prompts, set_counts

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


@pytest.fixture(scope="module")
def resumed(ray_cluster, tiny_pipeline, tmp_path_factory):
    """`aimfair generate images` (tiny random pipeline) killed hard after 3 shards, then run again:
    the facts both tests below check (the sets' contents, and the resume itself)."""
    tmp_path = tmp_path_factory.mktemp("resumed")
    sets = TINY + tiny_gen(tiny_pipeline) + [f"output_dir={tmp_path}", "generate.n_balanced_per_cell=24",
                                              "generate.batch_size=2", "generate.steps=4"]
    cfg = load_config("cmnist", overrides=sets)
    prompts = run_prompts(cfg, log=lambda *_: None)
    out = Path(cfg.paths.synthetic_set("balanced"))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    args = [sys.executable, "-m", "aimfair_ray.cli", "generate", "images"] + [x for s in sets for x in ("--set", s)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while len(list(out.glob("shard-*.parquet"))) < 3:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no shards within 240 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {"shards": len(list(out.glob("shard-*.parquet"))), "complete": (out / "_COMPLETE").exists()}
    time.sleep(2)
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    return {"cfg": cfg, "prompts": prompts, "before": before, "rerun": res}


def test_generated_sets_schema_counts_and_determinism(resumed, tiny_pipeline):
    from aimfair_ray.generate.images import generate_batch
    from aimfair_ray.generate.t2i import load_pipeline

    cfg = resumed["cfg"]
    assert resumed["rerun"].returncode == 0, resumed["rerun"].stdout[-3000:]
    counts = set_counts(cfg)
    assert counts["imbalanced"] == {"y0_s0": 1, "y0_s1": 4, "y1_s0": 4, "y1_s1": 1}
    assert counts["balanced"] == {c: 24 for c in ("y0_s0", "y0_s1", "y1_s0", "y1_s1")}
    for kind in ("balanced", "imbalanced"):
        df = read_split(cfg.paths.synthetic_set(kind)).to_pandas()
        cells = (df["target"].astype(str).radd("y") + "_s" + df["group"].astype(str)).value_counts().to_dict()
        assert cells == {c: n for c, n in counts[kind].items() if n}
        assert set(df["source"]) == {"synthetic"} and df["prompt"].notna().all()
        assert json.loads(df["generator"].iloc[0])["steps"] == 4
    shard = next(Path(cfg.paths.synthetic_set("balanced")).glob("shard-*.parquet"))
    assert pq.read_schema(shard).remove_metadata().equals(SCHEMA)
    import torch

    from aimfair_ray.generate.images import sample_seed

    torch.set_num_threads(1)  # as in the 1-CPU actor: float reductions depend on the thread count
    pipe = load_pipeline(tiny_pipeline)
    batch = pq.read_table(shard).to_pandas()  # one shard is one generation batch
    g = cfg.generate
    again = generate_batch(pipe, batch["prompt"].tolist(), [sample_seed(0, i) for i in batch["id"]], g.steps, g.guidance_scale)
    d = np.stack([np.abs(a.astype(int) - decode_png(b).astype(int)) for a, b in zip(again, batch["image"])])
    # same ids, same images, up to float rounding between processes (measured: 1 level in 0.002% of values)
    assert (d == 0).mean() > 0.999 and d.max() <= 1
    alone = generate_batch(pipe, batch["prompt"].tolist()[:1], [sample_seed(0, batch["id"].iloc[0])], g.steps,
                           g.guidance_scale)[0]
    diff = np.abs(alone.astype(int) - decode_png(batch["image"].iloc[0]).astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 4  # other batch shapes: float-level differences only


def test_killed_generation_resumes_with_exactly_the_planned_ids(resumed):
    cfg, res, before = resumed["cfg"], resumed["rerun"], resumed["before"]
    out = Path(cfg.paths.synthetic_set("balanced"))
    assert before["shards"] < 48 and not before["complete"]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "already written" in res.stdout
    from aimfair_ray.generate.images import plan, written_ids

    planned = plan(resumed["prompts"], "balanced", set_counts(cfg)["balanced"], 0)["id"].tolist()
    ids = written_ids(str(out))
    assert len(ids) == len(set(ids)) == 96 and sorted(ids) == sorted(planned)  # none missing, none twice
    assert (out / "_COMPLETE").exists() and not list(out.glob("*.tmp"))


def test_shard_commit_is_whole_and_idempotent(tmp_path):
    """Plain pyarrow, no Ray: a batch is committed by rename; writing it again (a retried task)
    replaces its own shard, so its ids never appear twice."""
    import pandas as pd

    from aimfair_ray.data.codecs import encode_png
    from aimfair_ray.generate.images import write_shard, written_ids

    png = encode_png(np.zeros((8, 8, 3), np.uint8))
    batch = pd.DataFrame({"id": ["b-0", "b-1"], "image": [png, png], "target": [0, 1], "group": [1, 0],
                          "split": "balanced", "source": "synthetic", "prompt": ["p", "q"], "generator": "{}"})
    assert write_shard(batch, str(tmp_path))["id"].tolist() == ["b-0", "b-1"]
    write_shard(batch, str(tmp_path))
    other = write_shard(batch.assign(id=["b-2", "b-3"]), str(tmp_path))
    assert other["id"].tolist() == ["b-2", "b-3"]
    assert len(list(tmp_path.glob("shard-*.parquet"))) == 2 and not list(tmp_path.glob("*.tmp"))
    assert sorted(written_ids(str(tmp_path))) == ["b-0", "b-1", "b-2", "b-3"]


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
    rep = run_filter(cfg, sets=("balanced",), log=lambda *_: None)["balanced"]
    assert rep["total"] == 80 and 0.6 * 60 <= rep["kept"] <= 60  # flipped ones never pass the colour check
    assert set(rep["per_cell"]) == {"y0_s0", "y0_s1", "y1_s0", "y1_s1"}
    assert all(0 <= v["kept_fraction"] <= 1 for v in rep["per_cell"].values())
    kept = read_split(cfg.paths.synthetic_set("balanced", filtered=True)).to_pandas()
    assert len(kept) == rep["kept"] and not set(kept["id"]) & set(test["id"][flip])
    assert (Path(cfg.run_dir) / "checker" / "checker.safetensors").is_file()
