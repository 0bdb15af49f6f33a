"""The quickstart notebook (notebooks/quickstart.ipynb) runs top to bottom through the Python API, in a Jupyter
kernel of its own joined to the session's cluster, on a copy of the session's tiny run (its data, baseline and
synthetic sets, drawn by the tiny pipeline, are reused; the fine-tuning and the audits run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import TINY, tiny_gen

ROOT = Path(__file__).resolve().parents[1]


def test_the_quickstart_notebook_runs_the_chain_through_the_api(synth, ray_cluster, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from aimfair_ray.config import load_config

    cfg0, _ = synth
    settings = TINY + tiny_gen(cfg0.generate.pipeline) + [f"output_dir={tmp_path}", "train.num_workers=2"]  # synth's
    shutil.copytree(cfg0.run_dir, tmp_path / "cmnist", ignore=shutil.ignore_patterns("ray", "finetune", "wg", "logs",
                                                                                       "dscheck", "sweep"))
    cfg = load_config("cmnist", overrides=settings)
    monkeypatch.setenv("AIMFAIR_NOTEBOOK_SETTINGS", json.dumps(settings))
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster)
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = {i: "".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in c.get("outputs", []))
            for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    *_, compare, by_cell = text.values()
    audit = json.loads((Path(cfg.stage_dir("finetune/selective")) / "audit" / "audit.json").read_text())
    assert "wst" in compare and "baseline" in compare and "ci_low" in compare
    row = next(line.split() for line in by_cell.splitlines() if line.startswith("y1_s1"))
    assert row[1:4] == ["digit>=5", "green", str(audit["cell_counts"]["y1_s1"])]
    assert float(row[4]) == round(audit["group_acc"]["y1_s1"], 2)
    assert (Path(cfg.stage_dir("finetune/selective")) / "model" / "README.md").is_file()  # the audit wrote its card
    assert "train: reusing" in text[5]  # the copied baseline, not trained again
    assert "0 to generate" in "".join(text.values()), text  # nor the copied synthetic sets drawn again
