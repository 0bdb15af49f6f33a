"""The shipped embedded text-to-image model against its quality bar (a reduced sample;
`aimfair generate quality` prints the full 200-per-cell report)."""

import pytest

from aimfair_ray.config import load_config
from aimfair_ray.generate.t2i import embedded_weights



@pytest.mark.skipif(not (embedded_weights() / "model_index.json").is_file(), reason="embedded weights not shipped")
def test_embedded_model_meets_quality_bar(ray_cluster, tmp_path):
    from aimfair_ray.data.prepare import prepare_data
    from aimfair_ray.generate.stage import quality_report

    cfg = load_config("cmnist", overrides=[f"output_dir={tmp_path}"])  # the checker leaves out the generator split
    prepare_data(cfg, log=lambda *_: None)
    res, imgs, req = quality_report(cfg, per_cell=40, log=lambda *_: None)
    assert imgs.shape == (160, 32, 32, 3)
    assert res["target_acc"] >= 0.80, res
    assert res["color_acc"] >= 0.95, res
