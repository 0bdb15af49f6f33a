"""`aimfair submit`: stages as Ray jobs on the session's head (`ray start --head`, see
conftest.ray_head), with the checkout uploaded as the job's working dir. The pipeline job, the demo's
end-to-end test, runs on the share-nothing cluster (tests/test_share_nothing.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AIMFAIR = os.path.join(os.path.dirname(sys.executable), "aimfair")


def _aimfair(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.run([AIMFAIR, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _sets(items):
    return [x for s in items for x in ("--set", s)]


def test_failing_job_reports_failed_with_the_error_in_its_logs(ray_head):
    res = _aimfair("submit", "baseline", "--address", ray_head["dashboard"], "--working-dir", str(ROOT),
                   "--", "--set", "train.epochs=0", timeout=300)
    assert res.returncode == 1, res.stdout[-3000:]
    assert "FAILED" in res.stdout and "train.epochs" in res.stdout  # the job's own error, streamed from its logs
    jid = [w for w in res.stdout.split() if w.startswith("raysubmit_")][0]
    logs = _aimfair("jobs", "logs", jid, "--address", ray_head["dashboard"])
    assert logs.returncode == 0 and "train.epochs" in logs.stdout


def test_submit_bad_input_exits_2_before_submitting(ray_head, tmp_path):
    res = _aimfair("submit", "nope", "--address", ray_head["dashboard"])
    assert res.returncode == 2 and "unknown stage 'nope'" in res.stdout and "pipeline" in res.stdout
    res = _aimfair("submit", "pipeline", "--address", ray_head["dashboard"], "--working-dir", str(tmp_path))
    assert res.returncode == 2 and "jobs/pipeline.py is not in the working dir" in res.stdout
    res = _aimfair("submit", "pipeline", "--address", "http://127.0.0.1:9", "--working-dir", str(ROOT), timeout=120)
    assert res.returncode == 2 and "cannot reach the Ray job server" in res.stdout
    res = _aimfair("jobs", "logs", "raysubmit_nope", "--address", ray_head["dashboard"])
    assert res.returncode == 2 and "no job 'raysubmit_nope'" in res.stdout
