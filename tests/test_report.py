"""The run report: one self-contained HTML page (images inlined) that headless Chromium opens offline,
with every section's figures; and the samples.png the generation stage writes beside each set."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from aimfair_ray.cli import app


def test_report_opens_in_headless_chromium_with_every_section(synth, tmp_path):
    from aimfair_ray.pipeline import run_audit
    from aimfair_ray.report import write_report

    cfg, _ = synth
    for balance in ("balanced", "imbalanced"):  # the generation stage drew each set's sample grid
        png = Path(cfg.paths.synthetic_set(balance)) / "samples.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    rep = run_audit(cfg, title="baseline", log=lambda *_: None)
    path = write_report(cfg.run_dir)
    html = Path(path).read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html  # nothing fetched
    from browser import dump_dom

    out = dump_dom(f"file://{path}", tmp_path / "profile")
    dom = out.stdout
    for section in ("data", "synthetic", "models", "selection", "results", "provenance"):
        assert f'id="{section}"' in dom, (section, out.stderr[-2000:])
    assert "<td>train</td><td>400</td>" in dom  # the data's cell counts
    assert "<h3>balanced</h3>" in dom and "<h3>imbalanced</h3>" in dom and "backend <b>template</b>" in dom
    assert f"{rep['acc']:.4f}" in dom and f"{rep['wst']:.4f}" in dom  # the baseline's audit, with its interval
    lo, hi = rep["intervals"]["wst"]
    assert f'<small class="ci">[{lo:.3f}, {hi:.3f}]</small>' in dom
    # real grid, one grid per synthetic set, the per-cell comparison chart: all inlined
    assert dom.count('src="data:image/png;base64,') >= 4 and "<img" in dom
    assert "ray</td><td>2.60.0" in dom and "Resolved config" in dom
    assert "audit (started " in dom  # stage times from logs/stages.jsonl


def test_report_of_a_missing_run_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["report", "--set", f"output_dir={tmp_path}", "--name", "nothing"])
    assert res.exit_code == 2 and "no run at" in res.output and "Traceback" not in res.output


def test_audit_page_shows_the_synthetic_samples_a_model_was_tuned_on(tmp_path):
    from aimfair_ray.models import build_model, save_classifier
    from aimfair_ray.serving.cards import audit_page, model_card

    (tmp_path / "balanced").mkdir()
    (tmp_path / "balanced" / "samples.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    meta = {"backbone": "small_cnn", "width": 8, "num_classes": 2, "image_size": 32, "mean": [0.5] * 3,
            "std": [0.5] * 3, "target_names": ["a", "b"], "group_names": ["g0", "g1"], "dataset": "colored_mnist"}
    for name, prov in (("tuned", {"generator": "embedded:cmnist-t2i", "synthetic_set": str(tmp_path / "balanced")}),
                       ("baseline", {"generator": None})):
        save_classifier(build_model("small_cnn", 2, 32, width=8), dict(meta, provenance=prov), str(tmp_path / name / "model"))
    made = {n: model_card(n, str(tmp_path / n / "model"), str(tmp_path)) for n in ("tuned", "baseline")}
    cards = {n: card for n, (card, _) in made.items()}
    assert cards["tuned"]["provenance"]["synthetic_set"] == "balanced"  # relative to the serving root
    page = audit_page(cards, {n: images for n, (_, images) in made.items()})
    assert page.count('alt="synthetic samples of') == 1 and 'alt="synthetic samples of tuned"' in page
