"""The quiet console (issue 23): Ray's output goes to the run's logs/, the project's lines and the
alarms stay on the console, progress moves bars on a terminal only."""

from __future__ import annotations

import io
import logging
import time

from aimfair_ray import progress, ray_logs


def _wait_for(path, needles, timeout=30.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        text = path.read_text() if path.is_file() else ""
        if all(n in text for n in needles):
            return text
        time.sleep(0.2)
    raise AssertionError(f"{needles} not all in {path} after {timeout} s:\n{text[-2000:]}")


def test_ray_output_goes_to_the_run_logs_and_only_project_lines_and_alarms_reach_the_console(ray_cluster, tmp_path,
                                                                                               capsys):
    import ray

    shown, moved = [], []
    logs = tmp_path / "run" / "logs"
    ray_logs.route(str(logs), echo=shown.append)
    progress.set_sink(lambda task, done, total: moved.append((task, done, total)))
    try:
        @ray.remote
        def worker():
            print("Reporting training result 1: TrainingReport(checkpoint=None, metrics={'epoch': 1})")
            print("[aimfair] baseline epoch 1/2  loss 0.5000  val_acc 0.9000")
            print("[aimfair] sweep/s/trials/t1 epoch 1/3  loss 0.5")
            print("Task was killed due to the node running low on memory.")
            return 1

        assert ray.get(worker.remote()) == 1
        text = _wait_for(logs / "workers.log", ["TrainingReport", "baseline epoch 1/2", "low on memory"])
        assert "(worker pid=" in text  # each line says which process printed it
        time.sleep(0.5)
        assert shown[0] == "baseline epoch 1/2  loss 0.5000  val_acc 0.9000", shown
        assert any("warning from Ray" in s and "low on memory" in s for s in shown)
        assert not any("TrainingReport" in s or "trials/t1" in s for s in shown), shown  # noise and trial epochs
        assert ("baseline: epochs", 1, 2) in moved and ("sweep/s/trials/t1: epochs", 1, 3) in moved
        # Ray's error channel (raylet warnings to every driver) is printed by Ray's own function: routed too
        import ray._private.worker as rw

        capsys.readouterr()
        rw.print_to_stdstream({"lines": ["WARNING: 8 PYTHON worker processes have been started on node: n"],
                               "pid": "raylet", "is_err": False}, ignore_prefix=False)
        assert "(raylet pid=raylet) WARNING: 8 PYTHON worker processes" in (logs / "workers.log").read_text()
        assert "worker processes" not in "".join(capsys.readouterr()) and not any("worker processes" in s for s in shown)

        # the driver's Ray loggers: to driver.log, not the console; Ray's errors: echoed too
        logging.getLogger("ray.data").info("Execution plan of Dataset d: InputDataBuffer[Input] -> Write")
        logging.getLogger("ray.train").warning("a Ray Train deprecation")
        logging.getLogger("ray").error("raylet died")
        driver = (logs / "driver.log").read_text()
        assert "Execution plan of Dataset d" in driver and "a Ray Train deprecation" in driver
        assert "raylet died" in driver
        err = capsys.readouterr()
        assert "Execution plan" not in err.err + err.out and "deprecation" not in err.err + err.out
        assert any("raylet died" in s for s in shown)

        # a second run in the same process moves the logs to its own folder
        other = tmp_path / "other" / "logs"
        ray_logs.route(str(other), echo=shown.append)
        assert ray.get(worker.remote()) == 1
        _wait_for(other / "workers.log", ["TrainingReport"])
        assert ray_logs.log_dir() == str(other)
    finally:
        progress.set_sink(None)


def test_bars_show_progress_on_a_terminal_and_go_when_their_task_completes():
    from rich.console import Console

    from aimfair_ray.cli.common import Bars

    out = io.StringIO()
    bars = Bars(Console(file=out, force_terminal=True, width=100))
    bars("images balanced", 3, 10)
    assert bars.bars is not None and "images balanced" in bars.tasks
    bars("baseline: epochs", 1, 2)
    bars("images balanced", 10, 10)
    assert list(bars.tasks) == ["baseline: epochs"]  # a finished task's bar is gone, the other stays
    bars("baseline: epochs", 2, 2)
    assert bars.bars is None and not bars.tasks  # nothing left: the live display stopped
    assert "images balanced" in out.getvalue()


def test_progress_goes_nowhere_without_a_sink():
    progress.set_sink(None)
    progress.update("x", 1, 2)  # no error, nothing to show: CI logs and `ray job logs` stay plain lines
    got = []
    progress.set_sink(lambda *a: got.append(a))
    try:
        progress.update("x", 5, 2)
        progress.update("y", 1, 0)  # no total: nothing
    finally:
        progress.set_sink(None)
    assert got == [("x", 2, 2)]
