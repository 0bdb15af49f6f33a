"""The docs say what the code and the results files say: every figures block is its results file rendered,
the generated references cover every setting and command, the README stays a front door, and a renamed
name's old meaning appears only in the compatibility notice. (`make lint` builds the site, strict.)"""

from __future__ import annotations

import importlib.util
import re

from aimfair_ray.figures import BLOCK, ROOT, synced

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_figures_block_is_its_results_file_rendered():
    """A figure typed by hand, or a results file published without rendering its page again, fails here."""
    names = set()
    for page in PAGES:
        text = page.read_text()
        assert synced(text) == (text, []), f"{page}: run python -m aimfair_ray.figures {page.relative_to(ROOT)}"
        names |= {b[2] for b in BLOCK.findall(text)}
    assert {"benchmarks/results/aimfair-lite0.json", "benchmarks/results/aimfair-cmnist.json",
            "benchmarks/results/egt-image.json", "benchmarks/results/egt-text.json",
            "benchmarks/results/store_cost.json"} <= names
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    tampered = text.replace("| baseline | ", "| baseline | 1", 1)
    assert tampered != text and synced(tampered)[1] == ["benchmarks/results/aimfair-lite0.json"]


def test_the_references_cover_every_setting_and_command():
    import typer

    from aimfair_ray.cli import app
    from aimfair_ray.config import Config

    hooks = _hooks()
    config_page = hooks.config_reference()
    fields = []

    def walk(model, prefix):
        for name, f in model.model_fields.items():
            sub = f.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                walk(sub, f"{prefix}{name}.")
            else:
                fields.append(f"{prefix}{name}")

    walk(Config, "")
    assert len(fields) > 100 and all(f"| `{f}` |" in config_page for f in fields)
    assert '| `finetune.score_mode` | "eval" \\| "train" | `"eval"` |' in config_page  # a Literal, escaped in its cell

    cli_page = hooks.cli_reference()
    root = typer.main.get_command(app)
    visible = [n for n, c in root.commands.items() if not c.hidden]
    assert all(f"### `aimfair {n}" in cli_page for n in visible)
    assert "### `aimfair minmax" not in cli_page  # the hidden old spelling
    assert "### `aimfair finetune`" in cli_page and "`--method`, `-m`" in cli_page


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link


def test_old_meanings_of_renamed_names_only_in_the_notice():
    """`minmax` names only the min–max objective: the old spellings of the EGT command, the Group DRO sweep and
    the EGT job appear in the docs only inside the README's compatibility notice."""
    from aimfair_ray import RENAMED

    old = [*RENAMED, "minmax_finetune", "sweeps/minmax.yaml"]
    for page in PAGES:
        text = page.read_text()
        if page.name == "README.md":
            text = re.sub(r"## Renamed in 0\.1\n.*?(?=\n## )", "", text, flags=re.S)
        for o in old:
            assert o not in text, f"{page}: {o}"
