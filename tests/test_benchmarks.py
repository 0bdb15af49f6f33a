"""The benchmark scripts that need no Ray: the GPU suite runs on CPU at tiny size and prints its table."""

from __future__ import annotations

import json

from conftest import bench_script


def test_gpu_suite_runs_at_tiny_size_on_cpu_and_writes_its_table(tmp_path, capsys):
    suite = bench_script("gpu_suite")
    out = tmp_path / "suite.json"
    # torch.compile is left out here: on CPU it builds C++ kernels for minutes; the GPU run has it
    res = suite.main(["--tiny", "--switches", "base,no-sdpa,channels-last,dpm-20", "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("device: CPU") and "workload" in printed and "images/s" in printed
    saved = json.loads(out.read_text())
    assert saved["columns"] == suite.COLUMNS and saved["rows"] == res["rows"]
    gen = [r for r in res["rows"] if r["unit"] == "images/s"]
    train = [r for r in res["rows"] if r["unit"] == "samples/s"]
    assert [r["switches"] for r in gen] == ["base", "no-sdpa", "channels-last", "dpm-20"]
    assert [r["steps"] for r in gen] == [4, 4, 4, 20]
    assert len(train) == 2 and "full" in train[0]["workload"] and "selective" in train[1]["workload"]
    for r in res["rows"]:
        assert set(r) == set(suite.COLUMNS) and r["per_s"] > 0 and r["ms_per_batch"] > 0 and r["dtype"] == "fp32"
    # selective fine-tuning trains fewer parameters than full
    full, sel = (float(r["workload"].split("(")[1].split("M")[0]) for r in train)
    assert sel < full
