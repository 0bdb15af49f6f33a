"""EGT min–max fine-tuning of generators on the session's Ray cluster (tiny, real runs), and
the results table. The toy problems of the objective itself are in test_minmax.py."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from aimfair_ray.cli import app


def _cfg(tmp_path, *extra):
    from aimfair_ray.config import load_config

    return load_config("cmnist", overrides=[f"output_dir={tmp_path}", "egt.steps=4", "egt.checkpoint_every=2",
                                            "egt.batch_size=8", "train.num_workers=2", *extra])


# The image EGT run of the tiny pipeline (per-group held-out loss, quality, bucket weights, the pipeline folder
# and its card, reuse, a killed driver's resume): tests/test_share_nothing.py, with its run on S3.


def test_sd_lora_minmax_on_ray_train(sd_lora_egt):
    """LoRA EGT of a tiny random Stable-Diffusion pipeline through the Ray Train loop (2 workers, the
    worst-group rule): the model folder holds only the adapters (diffusers format) and names its base;
    it loads as a pipeline whose images differ from the base's."""
    from safetensors.torch import load_file

    from aimfair_ray.egt.image import ADAPTER, LORA_FILE
    from aimfair_ray.generate.images import generate_batch
    from aimfair_ray.generate.t2i import load_pipeline

    _, base, res = sd_lora_egt
    assert res["steps"] == 4 and res["history"][0]["world_size"] == 2
    model = Path(res["model_dir"])
    assert {p.name for p in model.iterdir() if not p.name.startswith("_")} == {ADAPTER, LORA_FILE, "README.md"}
    assert json.loads((model / ADAPTER).read_text()) == {"base_pipeline": base, "lora_rank": 2}
    saved = load_file(str(model / LORA_FILE))
    assert saved and all(k.startswith("unet.") and "lora" in k for k in saved)
    levels = res["group_weights"]["weights"]["levels"]  # the worst rule: one group takes all of a bucket's weight
    assert any(sorted(w["q"]) == [0.0, 1.0] for w in levels)

    def images(pipeline):
        return generate_batch(load_pipeline(pipeline), ["a red digit seven"], [0], 2, 3.0)[0]

    assert images(str(model)).shape == (32, 32, 3)
    assert not np.array_equal(images(str(model)), images(base))


def test_text_sets_split_people_and_follow_the_share():
    from aimfair_ray.config import EGTTextConfig
    from aimfair_ray.egt.text import bold_gender, corpus, text_sets

    bold = corpus(EGTTextConfig())
    assert bold.groups == ["male", "female"]
    tr, ev = text_sets(bold, 200, 0.1, 40, data_seed=0, seed=0)
    assert len(tr.texts) == 200 and int(tr.groups.sum()) == 20
    assert len(ev.texts) == 80 and int(ev.groups.sum()) == 40
    people = {s: p for rows in bold_gender().values() for p, s in rows}
    assert not {people[t] for t in tr.texts} & {people[t] for t in ev.texts}
    tr2, ev2 = text_sets(bold, 200, 0.1, 40, data_seed=0, seed=1)
    assert ev2.texts == ev.texts and tr2.texts != tr.texts  # the evaluation set is the same for every seed


def test_a_users_corpus_gives_its_groups_units_and_one_line_refusals(tmp_path):
    """Your own texts (JSONL, CSV or Parquet): its two groups (the more frequent first unless egt.text.groups says),
    units kept on one side of the split, and every unusable file refused in one line naming the setting."""
    import pandas as pd

    from aimfair_ray import AimfairError
    from aimfair_ray.config import EGTTextConfig
    from aimfair_ray.egt.text import corpus, text_sets

    rows = [{"body": f"note {i} from the {g} office", "region": g, "author": f"{g}-{i % 7}"}
            for g, n in (("north", 60), ("south", 30)) for i in range(n)]
    pd.DataFrame(rows).to_json(tmp_path / "c.jsonl", orient="records", lines=True)
    pd.DataFrame(rows).to_csv(tmp_path / "c.csv", index=False)
    t = EGTTextConfig(data=str(tmp_path / "c.jsonl"), text_column="body", group_column="region", unit_column="author")
    c = corpus(t)
    assert c.groups == ["north", "south"] and len(c.rows["south"]) == 30
    tr, ev = text_sets(c, 40, 0.25, 8, data_seed=0, seed=0)
    assert int(tr.groups.sum()) == 10 and len(ev.texts) == 16
    author = {r["body"]: r["author"] for r in rows}
    assert not {author[x] for x in tr.texts} & {author[x] for x in ev.texts}
    flipped = corpus(t.model_copy(update={"data": str(tmp_path / "c.csv"), "groups": ["south", "north"]}))
    assert flipped.groups == ["south", "north"] and flipped.rows["north"] == c.rows["north"]
    for update, said in [({"text_column": "text"}, "no column 'text' (columns: body, region, author): set egt.text.text_column"),
                         ({"groups": ["north", "east"]}, "two groups in column 'region', found 'north' (60), 'south' (30)"),
                         ({"data": str(tmp_path / "c.txt")}, "give a .jsonl, .csv or .parquet file"),
                         ({"data": str(tmp_path / "gone.csv")}, "does not exist")]:
        with pytest.raises(AimfairError, match=re.escape(said)):
            corpus(t.model_copy(update=update))
    with pytest.raises(AimfairError, match="group 'north': 8 held-out and 51 train texts, fewer than the 8 and 200"):
        text_sets(c, 400, 0.5, 8, data_seed=0, seed=0)


def test_results_table_and_targets():
    from aimfair_ray.egt.benchmark import row, targets, to_csv, to_markdown

    def q(a, b):
        return {"ppl": {"male": a, "female": b}, "gap": {"ppl": abs(a - b)}, "overall": {"ppl": (a + b) / 2}}

    groups = ["male", "female"]
    table = {"erm": dict(row([q(10, 20), q(10, 22)], "text", groups), setting="unconditional"),
             "minmax": dict(row([q(12, 15), q(12, 16)], "text", groups), setting="unconditional")}
    t = targets(table, "text")["ppl"]
    assert t["gap_cut"] == pytest.approx(1 - 3.5 / 11) and t["gap_target_met"]
    assert t["overall_worse"] == pytest.approx(13.75 / 15.5 - 1) and t["overall_target_met"]
    res = {"task": "text", "model": "m", "seeds": [0, 1], "groups": groups, "steps": 3, "minority_share": 0.1,
           "n_per_group": 4, "table": table, "targets": targets(table, "text")}
    md = to_markdown(res)
    assert "| minmax | unconditional | 12 ± 0 | 15.5 ± 0.71 | 3.5 ± 0.71 |" in md and "gap cut 68.2%" in md
    assert to_csv(res).splitlines()[0].startswith("objective,setting,metric,male_mean,female_mean,gap_mean")
    # precision, recall, density, coverage: higher is better, so "worse" is a drop
    from aimfair_ray.egt.image import ImageTask

    def img(p0, p1):
        per = {m: {"red": p0, "green": p1} for m in ImageTask.metrics}
        return dict(per, gap={m: abs(p0 - p1) for m in ImageTask.metrics}, overall={m: (p0 + p1) / 2 for m in ImageTask.metrics})

    groups = ["red", "green"]
    t = targets({"erm": row([img(0.8, 0.4)], "image", groups), "minmax": row([img(0.7, 0.6)], "image", groups)}, "image")
    assert t["precision"]["gap_cut"] == pytest.approx(0.75) and t["precision"]["overall_worse"] == pytest.approx(-0.65 / 0.6 + 1)
    assert t["fid"]["overall_worse"] == pytest.approx(0.65 / 0.6 - 1)  # lower is better


def test_minmax_cli_rejects_bad_input():
    res = CliRunner().invoke(app, ["egt", "video"])
    assert res.exit_code == 2 and "choose image or text" in res.output
    res = CliRunner().invoke(app, ["benchmark", "egt", "image", "--objectives", "dro"])
    assert res.exit_code == 2 and "unknown --objectives" in res.output
    res = CliRunner().invoke(app, ["egt", "text", "--set", "egt.minority_share=1.5"])
    assert res.exit_code == 2 and "minority_share" in res.output
    res = CliRunner().invoke(app, ["minmax", "image", "--preset", "celeba", "--set", "data.root=/tmp"])  # the old name
    assert res.exit_code == 2 and "from colored_mnist only, not data.dataset celeba" in res.output  # not digits
    assert "note: `aimfair minmax` is now `aimfair egt`" in res.output
    res = CliRunner().invoke(app, ["serve", "--image-pipeline", "/nonexistent/model"])
    assert res.exit_code == 2 and "no diffusers pipeline there" in res.output
