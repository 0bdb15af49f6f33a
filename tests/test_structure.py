"""The shared pieces, without Ray: the fine-tuning methods' registry, the EGT tasks' registry,
the Train runner's reuse decision, the run paths, the reports helpers and the LLM cache."""

from __future__ import annotations

import json

import pytest
import torch

from aimfair_ray import AimfairError
from aimfair_ray.config import load_config
from aimfair_ray.models import build_model
from aimfair_ray.train import methods
from aimfair_ray.train import selective as sel


def _candidates(ft=None, log=print):
    torch.manual_seed(0)
    model = build_model("small_cnn", 2, 32, width=4)
    names = [n for n, _ in model.named_parameters()]
    domain = {n: float(i) for i, n in enumerate(names)}           # early tensors: least domain-sensitive
    bias = {n: float(i % 3) for i, n in enumerate(names)}          # every third: most bias-sensitive
    asked = []

    def scores():
        asked.append("scores")
        return {"domain": domain, "bias": bias}

    c = methods.Candidates(model, names, ft or load_config("cmnist").finetune, scores, lambda: None, log)
    return c, asked


def test_built_in_methods_choose_as_documented_and_ask_for_scores_only_when_needed():
    c, asked = _candidates()
    assert methods.METHODS["full"].choose(c).trainable == c.names and not asked
    assert methods.METHODS["linear"].choose(c).trainable == sel.head_tensors(c.model) and not asked
    s = methods.METHODS["selective"].choose(c)
    k = sel.resolve_k(c.ft.k, len(c.names))
    assert asked and s.trainable == sel.select(s.info["domain"], s.info["bias"], k) and s.info["k"] == k
    r = methods.METHODS["random"].choose(c)
    assert len(r.trainable) == len(s.trainable) and set(r.trainable) <= set(c.names)
    assert r.trainable == sel.random_tensors(c.names, len(s.trainable), c.ft.seed)


def test_a_registered_method_reaches_config_help_and_the_benchmark_rows():
    from aimfair_ray.benchmark import rows

    with pytest.raises(AimfairError, match="unknown fine-tuning method 'top_bias'; choose one of full, linear"):
        load_config("cmnist", overrides=["finetune.method=top_bias"])

    @methods.register("top_bias", "the k highest-bias tensors")
    def top_bias(c):
        k = sel.resolve_k(c.ft.k, len(c.names))
        return methods.Choice(sorted(c.names, key=lambda n: -c.scores()["bias"][n])[:k])

    try:
        cfg = load_config("cmnist", overrides=["finetune.method=top_bias"])
        assert cfg.finetune.method == "top_bias"
        assert "top_bias" in methods.describe() and rows()[rows().index("top_bias") + 1] == "selective_project"
        c, _ = _candidates(cfg.finetune)
        assert len(methods.METHODS["top_bias"].choose(c).trainable) == sel.resolve_k(cfg.finetune.k, len(c.names))
    finally:
        del methods.METHODS["top_bias"]
    assert "top_bias" not in rows()


def test_egt_tasks_are_registered_with_their_metrics_and_objectives():
    from aimfair_ray.egt.tasks import check_task, get, tasks

    assert list(tasks()) == ["image", "text"]
    assert get("image").metrics[:3] == ("fid", "precision", "recall") and get("image").noise_levels
    assert get("text").objectives[-1] == "conditional" and not get("text").noise_levels
    cfg = load_config("cmnist")
    assert get("image").group_names(cfg) == ["red", "green"] and get("text").group_names(cfg) == ["male", "female"]
    with pytest.raises(AimfairError, match="choose image or text"):
        check_task("video")


def test_reuse_or_resume_reuses_a_finished_run_and_starts_a_changed_one_fresh(tmp_path):
    from aimfair_ray.distributed import reuse_or_resume
    from aimfair_ray.storage import write_json

    stage, run_path = str(tmp_path / "stage"), tmp_path / "ray" / "run"
    run_path.mkdir(parents=True)
    msgs = []
    assert reuse_or_resume(stage, {"a": 1}, str(run_path), log=msgs.append) is None  # no key: a stale run
    assert "starting fresh" in msgs[-1] and not run_path.exists()
    run_path.mkdir()  # the run was interrupted
    assert reuse_or_resume(stage, {"a": 1}, str(run_path), log=msgs.append) is None  # same key: it resumes
    assert "resuming" in msgs[-1] and run_path.exists()
    write_json(f"{stage}/result.json", {"x": 2})
    assert reuse_or_resume(stage, {"a": 1}, str(run_path), log=msgs.append) == {"x": 2, "reused": True}
    assert reuse_or_resume(stage, {"a": 1}, str(run_path), force=True, log=msgs.append) is None
    assert "starting fresh" in msgs[-1] and not run_path.exists()
    run_path.mkdir()
    assert reuse_or_resume(stage, {"a": 2}, str(run_path), log=msgs.append) is None  # changed key: fresh
    assert not run_path.exists() and json.loads((tmp_path / "stage" / "run.json").read_text()) == {"a": 2}
    assert reuse_or_resume(stage, {"a": 2}, str(run_path), outputs=("model/model.json",), log=msgs.append) is None
    # a changed run that is interrupted must not find the old result beside its new key
    write_json(f"{stage}/result.json", {"x": 3})
    (tmp_path / "stage" / "model").mkdir()
    (tmp_path / "stage" / "model" / "model.json").write_text("{}")
    assert reuse_or_resume(stage, {"a": 3}, str(run_path), outputs=("model/model.json",), log=msgs.append) is None
    assert not (tmp_path / "stage" / "result.json").exists()  # killed here: the next call trains, never reuses
    assert reuse_or_resume(stage, {"a": 3}, str(run_path), outputs=("model/model.json",), log=msgs.append) is None


def test_a_classifier_runs_key_holds_what_it_reads():
    """A classifier run's key is its config less resources and the sections it never reads: an EGT setting (or a
    field EGT gains) does not redo a trained baseline, nor does a generation or fine-tuning setting; a training
    setting does. A fine-tuning (it starts from the baseline's weights) keeps the generation and fine-tuning."""
    import numpy as np

    from aimfair_ray.train.raytrain import RunSpec, _fingerprint

    base = load_config("cmnist")
    spec = RunSpec(stage="baseline", train=base.train)
    key = _fingerprint(base, spec)
    assert not {"egt", "generate", "finetune"} & set(key["config"])
    for unread in ("egt.steps=7", "generate.steps=9", "finetune.lr=0.5"):
        assert key == _fingerprint(load_config("cmnist", overrides=[unread]), spec), unread
    assert key != _fingerprint(load_config("cmnist", overrides=["train.lr=0.5"]), spec)
    tuned = RunSpec(stage="finetune/selective", train=base.train, init={"w": np.zeros(2)})
    assert _fingerprint(base, tuned) != _fingerprint(load_config("cmnist", overrides=["finetune.lr=0.5"]), tuned)
    assert "egt" not in _fingerprint(base, tuned)["config"]
    on_synthetic = RunSpec(stage="oracle", train=base.train, provenance={"synthetic_share": 1.0})  # from scratch
    assert "generate" in _fingerprint(base, on_synthetic)["config"]


def test_run_paths_name_every_artefact_a_stage_hands_on(tmp_path):
    cfg = load_config("cmnist", overrides=[f"output_dir={tmp_path}"])
    p = cfg.paths
    assert p.root == cfg.run_dir and p.data == cfg.data_dir and p.split("val") == f"{cfg.data_dir}/val"
    assert p.baseline_model == f"{cfg.run_dir}/baseline/model" == p.model("baseline")
    assert p.synthetic_set("balanced", filtered=True) == f"{cfg.run_dir}/synthetic/balanced_filtered"
    assert p.checker == f"{cfg.run_dir}/checker" and p.scores() == f"{cfg.run_dir}/finetune/scores"


def test_reports_helpers():
    from aimfair_ray.tables import csv_text, figure_png, markdown_table, mean_std, pyplot

    assert mean_std([1, 3]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "values": [1.0, 3.0]}
    assert mean_std([5])["std"] == 0.0
    assert markdown_table(["a", "b"], [[1, ""]]) == ["| a | b |", "|---|---|", "| 1 |  |"]
    assert csv_text(["a", "b"], [["x, y", None], [0.5, 2]]) == 'a,b\n"x, y",\n0.5,2\n'
    fig, _ = pyplot().subplots()
    assert figure_png(fig)[:4] == b"\x89PNG"


def test_the_bundled_llm_comes_from_its_cache_only_when_the_stamp_matches(tmp_path, monkeypatch):
    from aimfair_ray import llm

    monkeypatch.setenv("AIMFAIR_CACHE", str(tmp_path))
    gguf, folder, stamp = llm._bundled()
    assert llm.resolve_llm(None) == (str(gguf.parent), gguf.name)  # no cache: the GGUF
    folder.mkdir(parents=True)
    (folder / "aimfair-source.json").write_text(json.dumps(dict(stamp, bytes=1)))
    assert llm.resolve_llm(None)[1] == gguf.name  # a stale copy is not used
    (folder / "aimfair-source.json").write_text(json.dumps(stamp))
    assert llm.resolve_llm(None) == (str(folder), None)
    assert llm.resolve_llm("some/model.gguf") == ("some", "model.gguf") and llm.resolve_llm("org/id") == ("org/id", None)
